#!/usr/bin/env python
"""Train a transformers causal LM, built from a config with random weights (no hub access), with ds_offload.

    ds-offload launch --num_gpus 2 examples/train_hf.py --deepspeed_config configs/combined.json
    ds-offload launch --num_gpus 2 examples/train_hf.py --model-config path/to/config.json \
        --deepspeed_config configs/optimizer_50.json model.cpu_offloading_num_layers=4
    python examples/train_hf.py --deepspeed_config configs/combined.json          # one process, no launcher

Without --model-config it builds a small Llama (GQA, SwiGLU, RMSNorm, RoPE). ds_offload.initialize finds the
transformer layers itself (`model.model.layers`). Data: synthetic token ids, each rank taking its slice of one
global batch, so N GPUs see exactly what one GPU sees with an N times larger micro-batch.
"""
import argparse
import json
import os

import torch

import ds_offload
from ds_offload.arguments import add_config_arguments

from _train_loop import init_ranks, run, train


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-config", default=None,
                   help="a transformers config.json (or its folder); default: a small Llama built here")
    p.add_argument("--layers", type=int, default=4, help="layers of the built-in Llama")
    p.add_argument("--hidden", type=int, default=128, help="hidden size of the built-in Llama")
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary of the built-in Llama")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--losses-out", default=None, help="write the per-step losses and a summary as JSON (rank 0)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels where torch has them (for loss comparisons; set CUBLAS_WORKSPACE_CONFIG)")
    add_config_arguments(p)  # --deepspeed, --deepspeed_config, --local_rank
    return p.parse_args()


def build_model(args):
    import transformers
    if args.model_config:
        path = args.model_config
        path = os.path.join(path, "config.json") if os.path.isdir(path) else path
        with open(path) as fh:
            config = transformers.AutoConfig.for_model(**json.load(fh))
    else:
        h = args.hidden
        config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=h, intermediate_size=int(h * 8 / 3) // 8 * 8,
                                          num_hidden_layers=args.layers, num_attention_heads=max(2, h // 32),
                                          num_key_value_heads=max(1, h // 64), max_position_embeddings=max(args.seq_len, 128),
                                          tie_word_embeddings=False)
    config.use_cache = False
    torch.manual_seed(args.seed)
    return transformers.AutoModelForCausalLM.from_config(config), config


def main():
    args = parse_args()
    rank, world = init_ranks()
    model, config = build_model(args)
    engine, _, _, _ = ds_offload.initialize(args=args, model=model, model_parameters=model.parameters())
    mb, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"train_hf: {config.model_type}, {n / 1e6:.1f} M params, {config.num_hidden_layers} layers, "
              f"seq {args.seq_len}; {world} rank(s), {mb * gas * world} sequences per step", flush=True)

    def micro_loss(i):
        g = torch.Generator().manual_seed(1234 + i)
        ids = torch.randint(0, config.vocab_size, (mb * world, args.seq_len), generator=g)
        ids = ids[rank * mb:(rank + 1) * mb].to(engine.device)
        return engine(input_ids=ids, labels=ids).loss  # transformers shifts the labels itself

    train(engine, micro_loss, args, rank, world)


if __name__ == "__main__":
    run(main)
