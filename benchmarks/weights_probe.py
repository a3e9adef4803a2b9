"""Where a weight-offload step's time goes, through ds_offload.initialize (reference GPT, bf16, ZeRO-1, clip 1.0).

    python benchmarks/weights_probe.py [--layers 8] [--steps 5] [--warm 2]

Wraps the phases with host timers (after a device sync where a phase ends on the device) and prints their
mean per step: forward, backward, the wait for the offloaded layers' gradients and norm (`finish_backward`),
and the CPU work of the step (`TailSteps._run`: gradient scaling, CPU Adam, the working-copy cast) split by
phase. For finding what to make faster, not for the report: the benchmark's cases time the step itself.
"""
import argparse
import collections
import time

import torch

import harness as H
import ds_offload
import ds_offload.optimizer.tail_steps as T
import ds_offload.weights.offload as W


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warm", type=int, default=2)
    args = ap.parse_args()
    H.init_dist_env()
    spent = collections.defaultdict(float)

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t0
        return wrapper

    W.WeightOffload.finish_backward = timed("finish_backward (gradients on the host, norm)",
                                            W.WeightOffload.finish_backward)
    original_run, backend_run = T.TailSteps._run, None

    def patched_run(self, jobs):
        nonlocal backend_run
        if backend_run is None:
            backend_run = self.backend.run
            self.backend.run = timed("  of which CPU Adam", backend_run)
        return timed("TailSteps._run (scale + CPU Adam + cast)", original_run)(self, jobs)
    T.TailSteps._run = patched_run
    m = H.build_model("reference")
    block = {"model": {"cpu_offloading": True, "cpu_offloading_num_layers": args.layers,
                       "cpu_offloading_activations": False, "cpu_offloading_weights": True}}
    cfg = H.engine_config("reference", {"stage": 1}, gradient_clipping=1.0, cpu_offloading=block)
    eng, *_ = ds_offload.initialize(model=m, model_parameters=m.parameters(), config=cfg)
    idx, tgt = H.batch("reference")
    for i in range(args.warm + args.steps):
        if i == args.warm:
            spent.clear()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = eng(idx, tgt)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        eng.backward(loss)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        eng.step()
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        if i >= args.warm:
            spent["forward"] += t1 - t0
            spent["backward"] += t2 - t1
            spent["step"] += t3 - t2
    for k, v in spent.items():
        print(f"{k:<48} {v / args.steps * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
