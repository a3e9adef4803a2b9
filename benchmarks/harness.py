"""Measurement helpers shared by every benchmark case (runs inside the per-case worker process).

A case builds a model and a step function; `measure` runs warm-up steps, then timed steps, and returns
step times (median of the timed steps), peak GPU memory (allocated and reserved), host RSS, pinned host
bytes, tokens/s and the losses of every step. The same number of steps runs in every case of one shape,
so the final losses are comparable (same seed, same init, same batch, same learning rate).
"""
import os
import statistics
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Optimizer hyper-parameters used by every case (ours and peers), so final losses compare.
LR, WD, BETAS, EPS = 1e-4, 0.01, (0.9, 0.999), 1e-8
TIMES = {}   # set-up times of the case, reported with its result


def shapes():
    from ds_offload.models import GPT_SHAPES
    return {
        # name: (config, micro-batch, activation layer counts, layer counts of the targets)
        "reference": dict(cfg=GPT_SHAPES["reference-gpt"], mb=8, act_n=(2, 4, 8, 15)),
        "wide": dict(cfg=GPT_SHAPES["wide-gpt"], mb=2, act_n=(2, 4, 7)),
        "tiny": dict(cfg=GPT_SHAPES["tiny-gpt"], mb=2, act_n=(1, 2, 3)),
    }


def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(shape, dtype=torch.float32):
    """The same initial weights in every case of a shape: seed 0, built directly on the device."""
    from ds_offload.models import GPT
    cfg = shapes()[shape]["cfg"]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(0)
    with torch.device(device()):
        m = GPT(cfg)
    if dtype != torch.float32:
        m = m.to(dtype)
    _sync()
    TIMES["model_build_s"] = round(time.perf_counter() - t0, 2)
    return m


def batch(shape):
    from ds_offload.models import synthetic_batch
    s = shapes()[shape]
    return synthetic_batch(s["cfg"], s["mb"], step=0, device=device())


def tokens_per_step(shape):
    s = shapes()[shape]
    return s["mb"] * s["cfg"].seq_len


def autocast():
    dev = device().type
    return torch.autocast(dev, dtype=torch.bfloat16)


def proc_status():
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "VmHWM", "VmLck", "VmPin"):
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def pinned_stats():
    """Pinned host bytes held through PyTorch's caching host allocator (tensor.pin_memory(),
    torch.empty(pin_memory=True)); memory pinned with cudaHostRegister is not counted here."""
    if not torch.cuda.is_available():
        return {}
    try:
        st = torch.cuda.host_memory_stats()
    except Exception:  # older torch
        return {}
    keep = {}
    for k, v in st.items():
        if "bytes" in k and (k.endswith(".current") or k.endswith(".peak")):
            keep[k] = int(v)
    return keep


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(step, shape, warm, steps, extra=None):
    """Run `warm` + `steps` calls of step() (each returns a detached loss tensor)."""
    cuda = torch.cuda.is_available()
    losses = []
    _sync()
    t_setup_end = time.perf_counter()
    for _ in range(warm):
        losses.append(step())
    _sync()
    warm_s = time.perf_counter() - t_setup_end
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    host = []
    t0 = time.perf_counter()
    for i in range(steps):
        if cuda:
            events[i].record()
        host.append(time.perf_counter())
        losses.append(step())
        if not cuda:
            _sync()
    if cuda:
        events[steps].record()
    _sync()
    t1 = time.perf_counter()
    host.append(t1)
    if cuda:
        times = [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(steps)]
    else:
        times = [host[i + 1] - host[i] for i in range(steps)]
    step_s = statistics.median(times)
    res = dict(
        step_s=round(step_s, 5), step_s_mean=round((t1 - t0) / steps, 5), step_times=[round(t, 5) for t in times],
        warm=warm, steps=steps, warm_s=round(warm_s, 2),
        tokens_per_s=round(tokens_per_step(shape) / step_s, 1),
        losses=[round(float(x), 5) for x in losses],
    )
    res["loss"] = res["losses"][-1]
    if cuda:
        res["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        res["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    ps = proc_status()
    res["cpu_rss_gib"] = round(ps.get("VmRSS", 0) / 2**30, 3)
    res["cpu_rss_peak_gib"] = round(ps.get("VmHWM", 0) / 2**30, 3)
    pin = pinned_stats()
    if pin:
        cur = pin.get("allocated_bytes.current", pin.get("reserved_bytes.current"))
        peak = pin.get("allocated_bytes.peak", pin.get("reserved_bytes.peak"))
        res["pinned_gib"] = round(cur / 2**30, 3) if cur is not None else None
        res["pinned_peak_gib"] = round(peak / 2**30, 3) if peak is not None else None
        res["pinned_stats"] = pin
    if extra:
        res.update(extra)
    res.update(TIMES)
    return res


def torch_train_step(model, opt, idx, tgt, use_autocast=True):
    def step():
        if use_autocast:
            with autocast():
                loss = model(idx, tgt)
        else:
            loss = model(idx, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def engine_config(shape, zero, **config):
    """The DeepSpeed config of the engine cases: bf16, AdamW with the run's hyperparameters, `zero`."""
    return {"train_micro_batch_size_per_gpu": shapes()[shape]["mb"], "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD, "betas": list(BETAS), "eps": EPS}},
            "bf16": {"enabled": True}, "zero_optimization": zero, "steps_per_print": 10**9, **config}


def deepspeed_engine_case(init, shape, warm, steps, zero, extra=None, **config):
    """Build a bf16 DeepSpeed engine with `init` (deepspeed.initialize or ds_offload.initialize) and time it."""
    m = build_model(shape)
    cfg = engine_config(shape, zero, **config)
    t0 = time.perf_counter()
    eng, _, _, _ = init(model=m, model_parameters=m.parameters(), config=cfg)
    init_s = time.perf_counter() - t0
    idx, tgt = batch(shape)

    def step():
        loss = eng(idx, tgt)
        eng.backward(loss)
        eng.step()
        return loss.detach()
    return measure(step, shape, warm, steps, extra=dict(init_s=round(init_s, 1), **(extra or {})))


def init_dist_env(port=None):
    """One process (ds_offload.single_process); MASTER_PORT defaults to `port`, else $BENCH_PORT, else 29511."""
    from ds_offload.single_process import ensure_single_process_env
    ensure_single_process_env(port=port or os.environ.get("BENCH_PORT", 29511))


def find_in_site(relpath):
    """First sys.path entry that holds relpath (a file inside an installed wheel), without importing it."""
    import sys
    for p in sys.path:
        cand = os.path.join(p or ".", relpath)
        if os.path.isfile(cand):
            return cand
    return None


def load_module_by_path(name, path):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
