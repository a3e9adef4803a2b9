"""Step time and GPU peak of HybridDeviceOptimizer against its own no-offload run (f=0), same process.

    python benchmarks/optimizer_probe.py [--fractions 0 0.25 0.5 1.0] [--backends deepspeed torch]
                                         [--micro-batch 8] [--steps 6] [--warmup 3] [--tiny] [--json OUT]

The model is ds_offload.models.REFERENCE_GPT in bf16 (fp32 masters and moments inside the optimizer,
the memory-saving setting), trained on one fixed synthetic batch. A step is forward + backward +
optimizer step; time is the mean over ``--steps`` after ``--warmup``, ending when all CPU work has
landed. Ratios are to the f=0 row; the peak drop is compared with 12 * f * N bytes (fp32 master and two
moments leave the GPU for the offloaded share). ``probe()`` returns the rows for the benchmark harness.
"""
import argparse
import json
import os
import time

import torch

from ds_offload.models import GPT, REFERENCE_GPT, GPTConfig, synthetic_batch
from ds_offload.optimizer import HybridDeviceOptimizer


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _run(model, opt, idx, tgt, steps):
    for _ in range(steps):
        loss = model(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    opt.wait()  # the offloaded share's update has landed
    _sync()
    return loss.item()


def probe(fractions=(0.0, 0.25, 0.5, 1.0), backends=("deepspeed", "torch"), micro_batch=8, steps=6, warmup=3,
          cfg=REFERENCE_GPT, overlap=True, step_in_backward=False, log=print):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with dev:
        model = GPT(cfg).to(torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    idx, tgt = synthetic_batch(cfg, micro_batch, 0, dev)
    rows, base = [], None
    cases = [(0.0, "deepspeed")] + [(f, b) for b in backends for f in fractions if f > 0]
    for f, backend in cases:
        t0 = time.perf_counter()
        opt = HybridDeviceOptimizer(model.parameters(), offload_fraction=f, lr=1e-5, weight_decay=0.01,
                                    overlap_cpu_optimizer_d2h_h2d=overlap,
                                    use_torch_optimizer_for_cpu_offload=backend == "torch",
                                    step_in_backward=step_in_backward, defer_weight_updates=True)
        opt.split_info()  # build the split and the CPU buffers outside the timing
        setup_s = time.perf_counter() - t0
        _run(model, opt, idx, tgt, warmup)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        loss = _run(model, opt, idx, tgt, steps)
        step_s = (time.perf_counter() - t0) / steps
        peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else 0
        row = {"fraction": f, "cpu_backend": backend if f > 0 else "-", "step_s": round(step_s, 4),
               "peak_gib": round(peak / 2 ** 30, 3), "setup_s": round(setup_s, 1), "loss": round(loss, 4),
               "params": n, "step_in_backward": step_in_backward, "cpu_worker": "process" if getattr(opt._backend, "_proc", None) is not None else
               ("thread" if opt._executor is not None else "inline")}
        if base is None:
            base = row
        row["ratio"] = round(step_s / base["step_s"], 3)
        expected = 12 * f * n
        row["peak_drop_vs_12fN"] = round((base["peak_gib"] * 2 ** 30 - peak) / expected, 3) if expected else None
        rows.append(row)
        log(json.dumps(row))
        opt.close()
        del opt
        model.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0])
    ap.add_argument("--backends", nargs="+", default=["deepspeed", "torch"], choices=["deepspeed", "torch"])
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-overlap", action="store_true")
    ap.add_argument("--step-in-backward", action="store_true",
                    help="start each offloaded bucket's CPU step from the backward hook (no clipping/accumulation)")
    ap.add_argument("--tiny", action="store_true", help="the CPU tests' GPT shape, for a smoke run")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()
    cfg = GPTConfig() if a.tiny else REFERENCE_GPT
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}, host cores: {os.cpu_count()}")
    rows = probe(a.fractions, a.backends, a.micro_batch, a.steps, a.warmup, cfg, overlap=not a.no_overlap,
                 step_in_backward=a.step_in_backward)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
