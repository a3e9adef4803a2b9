"""Where a step's time goes on the GPU, through ds_offload.initialize: compute-stream busy time and idle gaps.

    python benchmarks/timeline_probe.py --mode w8 [--stage 1] [--warm 8] [--steps 3] [--out DIR]

Modes: plain, w8 (weights N=8, overlap on), w8_acts, opt50 (optimizer f=0.5, overlap on). Reference GPT with a
new batch every step (the `reference-fresh` shape), bf16, clip 1.0. Profiles `--steps` steps with
torch.profiler after `--warm` and prints per step: wall time, the compute stream's busy time, and its idle gaps
over 0.5 ms with the phase (forward / backward / step: a spin kernel on the compute stream marks where each
starts on the GPU) in which each gap started. For finding what to make faster, not for the report: the benchmark's cases time the step itself.
"""
import argparse
import json
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

import harness as H
import ds_offload

BLOCKS = {
    "plain": None,
    "w8": {"model": {"cpu_offloading": True, "cpu_offloading_num_layers": 8, "cpu_offloading_activations": False,
                     "cpu_offloading_weights": True}, "optimizer": {"overlap_cpu_optimizer_d2h_h2d": True}},
    "w8_acts": {"model": {"cpu_offloading": True, "cpu_offloading_num_layers": 8, "cpu_offloading_activations": True,
                          "cpu_offloading_weights": True}, "optimizer": {"overlap_cpu_optimizer_d2h_h2d": True}},
    "opt50": {"optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5,
                            "overlap_cpu_optimizer_d2h_h2d": True}},
}


def intervals(events, pred):
    return sorted((e.time_range.start, e.time_range.end) for e in events if pred(e))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="w8", choices=sorted(BLOCKS))
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--warm", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    H.init_dist_env()
    from ds_offload.models import synthetic_batch
    shape = "reference-fresh"
    s = H.shapes()[shape]
    m = H.build_model(shape)
    block = BLOCKS[args.mode]
    cfg = H.engine_config(shape, {"stage": args.stage}, gradient_clipping=1.0,
                          **({"cpu_offloading": block} if block else {}))
    init = ds_offload.initialize if block else __import__("deepspeed").initialize
    eng, *_ = init(model=m, model_parameters=m.parameters(), config=cfg)
    data = [synthetic_batch(s["cfg"], s["mb"], step=i, device="cuda") for i in range(args.warm + args.steps)]

    host = []  # host => per profiled step, perf_counter when forward, backward, step start and step returns
    spec = getattr(getattr(getattr(eng, "ds_offload", None), "weights", None), "speculation", None)

    def step(i):  # a spin kernel on the compute stream marks where each phase starts on the GPU
        x, y = data[i]
        t = [time.perf_counter()]
        torch.cuda._sleep(1)
        loss = eng(x, y)
        t.append(time.perf_counter())
        torch.cuda._sleep(1)
        eng.backward(loss)
        t.append(time.perf_counter())
        torch.cuda._sleep(1)
        eng.step()
        t.append(time.perf_counter())
        host.append(t)

    for i in range(args.warm):
        step(i)
    torch.cuda.synchronize()
    host.clear()
    if spec is not None:
        spec.events = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(args.warm, args.warm + args.steps):
            step(i)
        torch.cuda._sleep(1)
        torch.cuda.synchronize()
    ev = prof.events()
    kernels = [e for e in ev if e.device_type == torch.autograd.DeviceType.CUDA]
    marks = sorted(e.time_range.start for e in kernels if "spin" in e.name.lower())
    assert len(marks) == 3 * args.steps + 1, f"found {len(marks)} phase marks"
    streams = {}
    for e in kernels:
        if "spin" not in e.name.lower():
            streams.setdefault(getattr(e, "device_resource_id", None), []).append(e)
    compute = max(streams, key=lambda k: sum(e.time_range.elapsed_us() for e in streams[k]))
    busy = intervals(streams[compute], lambda e: True)
    report = {"mode": args.mode, "stage": args.stage, "compute_stream": compute, "steps": []}
    for k in range(args.steps):
        a, b = marks[3 * k], marks[3 * k + 3]
        bounds = marks[3 * k:3 * k + 4]
        inside = [(max(x, a), min(y, b)) for x, y in busy if y > a and x < b]
        merged = []
        for x, y in inside:
            if merged and x <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], y)
            else:
                merged.append([x, y])
        gaps, last = [], a
        for x, y in merged:
            if x - last > 500:
                where = ("forward", "backward", "step")[max(j for j in range(3) if bounds[j] <= last)]
                gaps.append({"at_ms": round((last - a) / 1e3, 2), "ms": round((x - last) / 1e3, 2), "phase": where})
            last = y
        report["steps"].append({"wall_ms": round((b - a) / 1e3, 2),
                                "phase_ms": [round((bounds[j + 1] - bounds[j]) / 1e3, 2) for j in range(3)],
                                "busy_ms": round(sum(y - x for x, y in merged) / 1e3, 2),
                                "idle_ms_by_phase": {n: round(sum(g["ms"] for g in gaps if g["phase"] == n), 2)
                                                     for n in ("forward", "backward", "step")},
                                "gaps": gaps})
    side = {str(k): round(sum(e.time_range.elapsed_us() for e in v) / 1e3 / args.steps, 2)
            for k, v in streams.items() if k != compute}
    report["other_streams_ms_per_step"] = side
    if spec is not None:  # the layers' CPU steps on the host clock, ms from the start of the step they fall in
        for k, t in enumerate(host):
            end = host[k + 1][0] if k + 1 < len(host) else float("inf")
            report["steps"][k]["host_phase_ms"] = [round((x - t[0]) * 1e3, 1) for x in t[1:]]
            report["steps"][k]["layer_events"] = [(w, i, round((x - t[0]) * 1e3, 1)) for w, i, x in spec.events
                                                  if t[0] <= x < end]
    top = prof.key_averages().table(sort_by="cpu_time_total", row_limit=25)
    print(json.dumps(report, indent=1))
    print(top)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"timeline_{args.mode}_z{args.stage}.json"), "w") as f:
            json.dump(report, f, indent=1)
    st = getattr(eng, "ds_offload", None)
    if st is not None:
        st.close()


if __name__ == "__main__":
    main()
