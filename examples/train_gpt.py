#!/usr/bin/env python
"""Train ds_offload's embedded GPT on synthetic data with a DeepSpeed config and its cpu_offloading block.

    ds-offload launch --num_gpus 2 examples/train_gpt.py --deepspeed_config configs/combined.json
    ds-offload launch --num_gpus 2 examples/train_gpt.py --deepspeed_config configs/combined.json \
        zero_optimization.stage=2 optimizer.optimizer_offload_fraction=0.5
    python examples/train_gpt.py --deepspeed_config configs/combined.json        # one process, no launcher

Every rank takes its slice of one global batch, so a run on N GPUs sees the same data as a run on one GPU
with an N times larger micro-batch: the losses agree (the --losses-out JSON makes that easy to check).
The only ds_offload-specific lines are `add_config_arguments` and `ds_offload.initialize`.
"""
import argparse

import torch

import ds_offload
from ds_offload.arguments import add_config_arguments
from ds_offload.models import GPT, GPT_SHAPES, GPTConfig

from _train_loop import init_ranks, run, train

MODELS = {name: GPT_SHAPES[f"{name}-gpt"] for name in ("tiny", "small", "reference")}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default=None,
                   help="GPT shape (default: tiny without a GPU, small with one)")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--seq-len", type=int, default=None, help="override the sequence length")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--losses-out", default=None, help="write the per-step losses and a summary as JSON (rank 0)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels where torch has them (for loss comparisons; set CUBLAS_WORKSPACE_CONFIG)")
    add_config_arguments(p)  # --deepspeed, --deepspeed_config, --local_rank
    return p.parse_args()


def batch(cfg, global_rows, step, rank, rows, device):
    """Rows [rank*rows, (rank+1)*rows) of the global batch of `step` (deterministic, same on every machine)."""
    g = torch.Generator().manual_seed(1234 + step)
    idx = torch.randint(0, cfg.vocab_size, (global_rows, cfg.seq_len), generator=g)
    tgt = torch.roll(idx, -1, 1)
    sl = slice(rank * rows, (rank + 1) * rows)
    return idx[sl].to(device), tgt[sl].to(device)


def main():
    args = parse_args()
    rank, world = init_ranks()
    cfg = MODELS[args.model or ("small" if torch.cuda.is_available() else "tiny")]
    cfg = GPTConfig(**{**cfg.__dict__, **({"num_layers": args.layers} if args.layers else {}),
                       **({"seq_len": args.seq_len} if args.seq_len else {})})
    torch.manual_seed(args.seed)
    model = GPT(cfg)
    engine, _, _, _ = ds_offload.initialize(args=args, model=model, model_parameters=model.parameters())
    mb, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"train_gpt: {n / 1e6:.1f} M params, {cfg.num_layers} layers, seq {cfg.seq_len}; {world} rank(s), "
              f"micro-batch {mb} x {gas} accumulation x {world} = {mb * gas * world} sequences per step", flush=True)

    def micro_loss(i):
        return engine(*batch(cfg, mb * world, i, rank, mb, engine.device))

    train(engine, micro_loss, args, rank, world)


if __name__ == "__main__":
    run(main)
