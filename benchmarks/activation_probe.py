"""Probe for layer-level activation offload: step time, peak memory, bytes per layer, and a bound.

Why a bound and not just a ratio: offloading is copy-bound whenever a layer's copy outlasts its
compute, so the honest question is how close the schedule gets to what the copy engines allow.
The model here replays the schedule `ds_offload.activations` uses, on measured inputs:
  forward  - layer k's copies queue on the D2H stream as it runs; before each layer the compute
             stream waits if more than (L - max(j, N-1)) layers are still in flight, and the
             layers end by waiting for all but the resident tail: fwd ~ max(L*t_f, N copies) + head;
  backward - layer k is fetched when backward starts layer j with k >= j - depth, or earlier
             while memory stays under its level at the end of the forward (each finished layer
             frees its activations and allocates its weight gradients); one H2D stream, and
             layer k waits for its fetch. Autocast weight casts are recast, never copied.
The two directions never overlap in this schedule (the forward drains before the loss), so each
direction runs at its one-way bandwidth.

    python benchmarks/activation_probe.py                 # both shapes of the issue
    python benchmarks/activation_probe.py --shapes ref --ref-layers 4 --save-on-cpu
"""
import argparse
import json
import time

import torch

from ds_offload.activations import install_layer_offload
from ds_offload.models import GPT, REFERENCE_GPT, WIDE_GPT, synthetic_batch

SHAPES = {"ref": (REFERENCE_GPT, 8, "4,8,15", {4: 1.15, 8: 2.1, 15: 3.8}),
          "wide": (WIDE_GPT, 2, "2,4,7", {2: 1.10, 4: 1.6, 7: 2.4})}
MiB = 2**20


def _ms(a, b):
    return a.elapsed_time(b)


def copy_bandwidth(nbytes=1 << 30, reps=3):
    """Pinned one-way bandwidth each way, and each way while the other runs (GB/s)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host2 = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev, dev2 = torch.empty(nbytes, dtype=torch.uint8, device="cuda"), torch.empty_like(host, device="cuda")
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / reps

    d2h = nbytes / timed(lambda: host.copy_(dev, non_blocking=True)) / 1e9
    h2d = nbytes / timed(lambda: dev.copy_(host, non_blocking=True)) / 1e9

    def both():
        with torch.cuda.stream(s1):
            host.copy_(dev, non_blocking=True)
        with torch.cuda.stream(s2):
            dev2.copy_(host2, non_blocking=True)
    duplex = nbytes / timed(both) / 1e9
    return {"d2h_GBps": d2h, "h2d_GBps": h2d, "duplex_each_GBps": duplex}


def block_times(model, mb, cfg, reps=5):
    """Forward and backward ms of one transformer layer alone, with the model's autocast."""
    blk = model.blocks[0]
    x = torch.randn(mb, cfg.seq_len, cfg.hidden, device="cuda", requires_grad=True)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    f = b = 0.0
    for i in range(reps + 1):
        ev[0].record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = blk(x)
        ev[1].record()
        y.backward(torch.ones_like(y))
        ev[2].record()
        torch.cuda.synchronize()
        if i:
            f, b = f + _ms(ev[0], ev[1]), b + _ms(ev[1], ev[2])
    model.zero_grad(set_to_none=True)
    return f / reps, b / reps


def saved_bytes_per_layer(model, mb, cfg):
    """What one layer saves for backward (unique storages), with and without autocast weight casts."""
    from ds_offload.activations.copier import _Recast
    seen, casts = {}, set()

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and not isinstance(t._base, torch.nn.Parameter):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
            if _Recast.of(t, 0) is not None:
                casts.add(st.data_ptr())
        return t

    x = torch.randn(mb, cfg.seq_len, cfg.hidden, device="cuda", requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cuda", dtype=torch.bfloat16):
        model.blocks[0](x)
    total = sum(seen.values())
    return total, total - sum(seen[p] for p in casts)


def model_bound(L, N, tf, tb, hf, hb, B, bw_out, bw_in, depth=1, double_buffering=False, tail=0.0,
                A=None, G=0.0, H0=0.0):
    """Step ms the schedule allows (see the module docstring); B in bytes, bandwidths in GB/s.

    A: bytes a non-offloaded layer frees in backward, G: its weight-gradient bytes, H0: memory
    above the end-of-forward level when backward reaches the layers (head gradients)."""
    A = B if A is None else A
    c_out, c_in = B / bw_out / 1e6, B / bw_in / 1e6
    t, done, end = 0.0, 0.0, []
    for j in range(L):  # throttle: in flight <= (L - max(j, N-1)) layers, as in `_Session.throttle`
        allowed = L - max(j, N - 1)
        while len([e for e in end if e > t]) > allowed:
            t = min(e for e in end if e > t)
        if j < N:
            done = max(done, t + 0.5 * tf) + c_out
            end.append(done)
        t += tf
    fwd = max(t, done - tail * N * c_out) + hf
    kept = {k: min(1.0, max(0.0, tail * N - (N - 1 - k))) for k in range(N)}
    t, free, ready, fetched, level = fwd + hb, 0.0, {}, set(), H0
    for j in range(L - 1, -1, -1):
        for k in range(min(j, N - 1), -1, -1):
            if k in fetched:
                continue
            need = B * (1 - kept[k])
            if not (k >= j - depth or (not double_buffering and level + need <= 0)):
                break
            fetched.add(k)
            level += need
            free = max(free, t) + c_in * (1 - kept[k])
            ready[k] = free
        if j < N:
            t = max(t, ready[j])
        t += tb
        level -= (A if j >= N else B) - G
    return fwd, t - fwd, t


def measure(model, batch, steps, warmup):
    """Mean forward / backward / step ms over `steps`, and the peak memory of the last step."""
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    f = b = 0.0
    for i in range(warmup + steps):
        if i == warmup + steps - 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        ev[0].record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(*batch)
        ev[1].record()
        loss.backward()
        ev[2].record()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            f, b = f + _ms(ev[0], ev[1]), b + _ms(ev[1], ev[2])
    peak = torch.cuda.max_memory_allocated() - base
    return f / steps, b / steps, (f + b) / steps, peak


def run_shape(name, layers, args, bw):
    cfg, mb, _, targets = SHAPES[name]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = GPT(cfg)
    batch = synthetic_batch(cfg, mb, device="cuda")
    L = cfg.num_layers
    tf, tb = block_times(model, mb, cfg)
    all_b, act_b = saved_bytes_per_layer(model, mb, cfg)
    G = 4 * sum(p.numel() for p in model.blocks[0].parameters())  # fp32 weight gradients
    head_grads = 4 * (sum(p.numel() for p in model.parameters()) - L * G // 4 + mb * cfg.seq_len * cfg.hidden)
    f0, b0, s0, p0 = measure(model, batch, args.steps, args.warmup)
    hf, hb = max(f0 - L * tf, 0.0), max(b0 - L * tb, 0.0)
    print(f"[{name}] hidden {cfg.hidden} layers {L} mb {mb} seq {cfg.seq_len}: layer fwd {tf:.2f} ms "
          f"bwd {tb:.2f} ms; saved per layer {all_b / MiB:.0f} MiB ({act_b / MiB:.0f} MiB without "
          f"autocast weight casts); no offload: fwd {f0:.1f} bwd {b0:.1f} step {s0:.1f} ms, peak {p0 / MiB:.0f} MiB")
    rows = [{"shape": name, "N": 0, "fwd_ms": f0, "bwd_ms": b0, "step_ms": s0, "peak_MiB": p0 / MiB}]
    for n in layers:
        h = install_layer_offload(model.blocks, n, prefetch_depth=args.depth, retain_pinned_buffers=True,
                                  double_buffering=args.double_buffering, resident_tail_fraction=args.tail)
        h.copier.recompute_weight_casts = not args.copy_weight_casts
        f, b, s, p = measure(model, batch, args.steps, args.warmup)
        per = h.stats()["bytes_offloaded_last_step"] / n
        h.remove()
        mf, mbw, ms = model_bound(L, n, tf, tb, hf, hb, per, bw["d2h_GBps"], bw["h2d_GBps"], args.depth,
                                  args.double_buffering, args.tail, A=all_b, G=G,
                                  H0=head_grads - n * (all_b - act_b))
        drop = (p0 - p) / (n * all_b)
        row = {"shape": name, "N": n, "fwd_ms": f, "bwd_ms": b, "step_ms": s, "peak_MiB": p / MiB,
               "offloaded_per_layer_MiB": per / MiB, "ratio": s / s0, "target_ratio": targets.get(n),
               "bound_step_ms": ms, "bound_fwd_ms": mf, "bound_bwd_ms": mbw, "achieved_over_bound": s / ms,
               "peak_drop_over_N_layers": drop}
        print(f"[{name}] N={n:2d}: fwd {f:.1f} bwd {b:.1f} step {s:.1f} ms = {s / s0:.2f}x (target "
              f"<= {targets.get(n)}x); bound {ms:.1f} ms (fwd {mf:.1f} bwd {mbw:.1f}) achieved/bound "
              f"{s / ms:.2f}; offloaded {per / MiB:.0f} MiB/layer; peak {p / MiB:.0f} MiB, drop "
              f"{(p0 - p) / MiB:.0f} MiB = {drop:.2f} x N x {all_b / MiB:.0f} MiB")
        if args.save_on_cpu:
            row["save_on_cpu_ratio"] = save_on_cpu_ratio(model, batch, n, args, s0)
            print(f"[{name}] N={n:2d}: torch save_on_cpu {row['save_on_cpu_ratio']:.2f}x")
        rows.append(row)
    del model
    torch.cuda.empty_cache()
    return rows


def save_on_cpu_ratio(model, batch, n, args, s0):
    """torch's own `save_on_cpu` on the first n layers, for comparison (synchronous copies back)."""
    hooks, stack = [], []

    def pre(m, a):
        ctx = torch.autograd.graph.save_on_cpu(pin_memory=True)
        ctx.__enter__()
        stack.append(ctx)

    def post(m, a, o):
        stack.pop().__exit__(None, None, None)
    for blk in list(model.blocks)[:n]:
        hooks += [blk.register_forward_pre_hook(pre), blk.register_forward_hook(post)]
    s = measure(model, batch, args.steps, args.warmup)[2]
    for hk in hooks:
        hk.remove()
    return s / s0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="ref,wide")
    ap.add_argument("--ref-layers", default=SHAPES["ref"][2])
    ap.add_argument("--wide-layers", default=SHAPES["wide"][2])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--tail", type=float, default=0.05, help="resident_tail_fraction")
    ap.add_argument("--double-buffering", action="store_true")
    ap.add_argument("--save-on-cpu", action="store_true")
    ap.add_argument("--copy-weight-casts", action="store_true",
                    help="copy autocast's bf16 weight copies out and back instead of recasting them")
    ap.add_argument("--json", help="write every row here")
    args = ap.parse_args(argv)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    bw = copy_bandwidth()
    print("pinned copies: " + ", ".join(f"{k} {v:.1f}" for k, v in bw.items()))
    rows = []
    for name in args.shapes.split(","):
        layers = [int(x) for x in getattr(args, f"{name}_layers").split(",") if x]
        rows += run_shape(name, layers, args, bw)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "bandwidth": bw, "rows": rows}, fh, indent=1)
    return rows


if __name__ == "__main__":
    if not torch.cuda.is_available():
        raise SystemExit("activation_probe needs a CUDA GPU")
    main()
