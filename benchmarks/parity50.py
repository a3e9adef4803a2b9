"""Loss parity over 50 steps through ds_offload.initialize against plain DeepSpeed, with the noise floor beside it.

    python benchmarks/parity50.py [--steps 50] [--shape reference] [--modes weights_n8,optimizer_f50_overlap]

Reference GPT (or another benchmark shape), bf16, ZeRO-1, gradient clipping 1.0, deterministic kernels on both
sides (warn-only where a kernel has no deterministic twin), a new synthetic batch every step. Runs plain
DeepSpeed twice (the noise floor), then each mode, in one process, and prints one JSON line per run as it ends.
"""
import argparse
import gc
import json
import os

import torch

import harness as H

MODES = {
    "weights_n8": {"model": {"cpu_offloading": True, "cpu_offloading_num_layers": 8,
                             "cpu_offloading_activations": False, "cpu_offloading_weights": True}},
    "weights_n8_overlap": {"model": {"cpu_offloading": True, "cpu_offloading_num_layers": 8,
                                     "cpu_offloading_activations": False, "cpu_offloading_weights": True},
                           "optimizer": {"overlap_cpu_optimizer_d2h_h2d": True}},  # layers stepped during backward
    "optimizer_f50_overlap": {"optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5,
                                            "overlap_cpu_optimizer_d2h_h2d": True}},
    "optimizer_f100": {"optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 1.0}},
    "activations_n4": {"model": {"cpu_offloading": True, "cpu_offloading_num_layers": 4}},
}


def run(init, shape, steps, block=None, facts=None):
    facts = {} if facts is None else facts  # facts => filled with what the engine reports (speculated steps)
    from ds_offload.models import synthetic_batch
    m = H.build_model(shape)
    cfg = H.engine_config(shape, {"stage": 1}, gradient_clipping=1.0, **({"cpu_offloading": block} if block else {}))
    engine, *_ = init(model=m, model_parameters=m.parameters(), config=cfg)
    s = H.shapes()[shape]
    losses = []
    for step in range(steps):
        x, y = synthetic_batch(s["cfg"], s["mb"], step=step, device="cuda")
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    out = [v.item() for v in losses]
    st = getattr(engine, "ds_offload", None)
    if st is not None:
        facts.update(H.offload_facts(engine))
        facts.pop("summary", None)
        st.close()
    del engine, m
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--shape", default="reference")
    ap.add_argument("--modes", default="weights_n8,weights_n8_overlap,optimizer_f50_overlap")
    args = ap.parse_args()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    H.init_dist_env()
    import deepspeed

    import ds_offload
    plain = run(deepspeed.initialize, args.shape, args.steps)
    again = run(deepspeed.initialize, args.shape, args.steps)
    noise = max(abs(a - b) for a, b in zip(plain, again))
    print(json.dumps({"run": "plain x2", "noise_floor": noise, "first": plain[0], "last": plain[-1]}), flush=True)
    for mode in args.modes.split(","):
        facts = {}
        ours = run(ds_offload.initialize, args.shape, args.steps, MODES[mode], facts)
        delta = max(abs(a - b) for a, b in zip(plain, ours))
        print(json.dumps({"run": mode, "max_loss_delta": delta, "noise_floor": noise, "steps": args.steps,
                          "device": torch.cuda.get_device_name(), "last": ours[-1], **facts}), flush=True)


if __name__ == "__main__":
    main()
