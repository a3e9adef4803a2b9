"""The global gradient norm plain DeepSpeed sees on the benchmark shapes, step by step.

    python benchmarks/grad_norms.py [--shapes reference,llama] [--steps 20]

Why: a CPU step taken during backward, before the norm is known, is exact only where `gradient_clipping` does
not clip (norm <= clip) and nothing overflows; whether speculation pays on a shape is a question of these
numbers. Plain DeepSpeed, bf16, ZeRO-1, AdamW, `gradient_clipping: 1.0`, the benchmark's batch (the same every
step, as in run.py's engine cases) and then a new synthetic batch every step (as parity50.py). One JSON line
per (shape, batch kind).
"""
import argparse
import gc
import json

import torch

import harness as H


def norms(shape, steps, fresh):
    import deepspeed
    m = H.build_model(shape)
    cfg = H.engine_config(shape, {"stage": 1}, gradient_clipping=1.0)
    engine, *_ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=cfg)
    idx, tgt = H.batch(shape)
    out = []
    for step in range(steps):
        if fresh and not H.is_hf(shape):
            from ds_offload.models import synthetic_batch
            idx, tgt = synthetic_batch(H.shapes()[shape]["cfg"], H.shapes()[shape]["mb"], step=step, device="cuda")
        loss = H.loss_of(engine, shape, idx, tgt)
        engine.backward(loss)
        engine.step()
        out.append(float(engine.get_global_grad_norm()))
    engine.destroy()
    del engine, m
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="reference,llama")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    H.init_dist_env()
    for shape in args.shapes.split(","):
        for fresh in ([False, True] if not H.is_hf(shape) else [False]):
            n = norms(shape, args.steps, fresh)
            print(json.dumps({"shape": shape, "batch": "new each step" if fresh else "the same every step",
                              "clip": 1.0, "norms": [round(v, 4) for v in n],
                              "steps_clipped": sum(v > 1.0 for v in n), "steps": len(n),
                              "device": torch.cuda.get_device_name()}), flush=True)


if __name__ == "__main__":
    main()
