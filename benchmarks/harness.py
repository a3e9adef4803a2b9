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
# MEMBER => state of the case running now when several cases share one process (run.py's case groups):
#   "leftover" => bytes the caching allocator still had allocated when the case began (subtracted from its peak),
#   "rss0" => the process's RSS when the case began (its host memory is reported as growth from there)
MEMBER = {}


class Skip(Exception):
    """A case that cannot run here (a peer's feature missing in the installed version): recorded as skipped."""


def begin_member():
    """Start a case inside a shared process: free what the previous case left, reset the peaks."""
    import gc
    gc.collect()
    TIMES.clear()
    MEMBER.clear()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        try:
            torch._C._host_emptyCache()   # the caching host allocator's free pinned blocks
        except Exception:
            pass
        torch.cuda.reset_peak_memory_stats()
        MEMBER["leftover"] = torch.cuda.memory_allocated()
    MEMBER["rss0"] = proc_status().get("VmRSS", 0)


def shapes():
    from ds_offload.models import GPT_SHAPES
    out = {
        # name: (config, micro-batch, activation layer counts, layer counts of the targets)
        "reference": dict(cfg=GPT_SHAPES["reference-gpt"], mb=8, act_n=(2, 4, 8, 15)),
        "wide": dict(cfg=GPT_SHAPES["wide-gpt"], mb=2, act_n=(2, 4, 7)),
        "tiny": dict(cfg=GPT_SHAPES["tiny-gpt"], mb=2, act_n=(1, 2, 3)),
        # a transformers Llama built from a config (852M: GQA, SwiGLU, RMSNorm, RoPE, untied head)
        "llama": dict(hf=dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                              num_attention_heads=16, num_key_value_heads=4), seq=2048, mb=4, act_n=(4, 8, 15)),
        "llama-tiny": dict(hf=dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2), seq=32, mb=2, act_n=(1, 2)),
    }
    # "-fresh": the same model with a new batch every step, as in training. With one batch repeated, the model
    # memorizes it and its gradient norm grows past `gradient_clipping: 1.0` within two steps (grad_norms.py);
    # with new batches the reference GPT's stays below it. That decides whether a CPU step taken during backward
    # stands (ds_offload/optimizer/speculate.py), so the engine tables show both.
    for name in ("reference", "llama", "tiny"):
        out[name + "-fresh"] = dict(out[name], fresh=True)
    return out


def is_hf(shape):
    return "hf" in shapes()[shape]


def seq_len(shape):
    s = shapes()[shape]
    return s["seq"] if "hf" in s else s["cfg"].seq_len


def num_layers(shape):
    s = shapes()[shape]
    return s["hf"]["num_hidden_layers"] if "hf" in s else s["cfg"].num_layers


def layers_of(model):
    """The transformer layers (the list the offload acts on)."""
    return model.model.layers if hasattr(model, "model") else model.blocks


def loss_of(model, shape, idx, tgt):
    """The training loss of one micro-batch, for our GPT (model(idx, targets)) or a transformers causal LM."""
    if is_hf(shape):
        return model(input_ids=idx, labels=tgt).loss   # transformers shifts the labels itself
    return model(idx, tgt)


def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(shape, dtype=torch.float32):
    """The same initial weights in every case of a shape: seed 0, built directly on the device."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(0)
    s = shapes()[shape]
    if "hf" in s:
        import transformers
        cfg = transformers.LlamaConfig(max_position_embeddings=s["seq"], tie_word_embeddings=False, use_cache=False,
                                       attn_implementation="sdpa", **s["hf"])
        with torch.device(device()):
            m = transformers.LlamaForCausalLM(cfg)
    else:
        from ds_offload.models import GPT
        with torch.device(device()):
            m = GPT(s["cfg"])
    if dtype != torch.float32:
        m = m.to(dtype)
    _sync()
    TIMES["model_build_s"] = round(time.perf_counter() - t0, 2)
    return m


def batch(shape, step=0):
    s = shapes()[shape]
    if "hf" in s:
        g = torch.Generator().manual_seed(1234 + step)
        ids = torch.randint(0, s["hf"]["vocab_size"], (s["mb"], s["seq"]), generator=g).to(device())
        return ids, ids
    from ds_offload.models import synthetic_batch
    return synthetic_batch(s["cfg"], s["mb"], step=step, device=device())


def batches(shape, n):
    """The batches of `n` steps: one repeated, or for a "-fresh" shape a new one each step (made before timing)."""
    if shapes()[shape].get("fresh"):
        return [batch(shape, k) for k in range(n)]
    return [batch(shape)] * n


def tokens_per_step(shape):
    return shapes()[shape]["mb"] * seq_len(shape)


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
        left = MEMBER.get("leftover", 0)
        res["peak_alloc_gib"] = round((torch.cuda.max_memory_allocated() - left) / 2**30, 3)
        res["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
        if MEMBER:
            res["leftover_gib"] = round(left / 2**30, 3)
    ps = proc_status()
    res["cpu_rss_gib"] = round(ps.get("VmRSS", 0) / 2**30, 3)
    res["cpu_rss_peak_gib"] = round(ps.get("VmHWM", 0) / 2**30, 3)
    if MEMBER:   # a shared process: the peak is the process's, the growth is this case's
        res["cpu_rss_growth_gib"] = round((ps.get("VmRSS", 0) - MEMBER.get("rss0", 0)) / 2**30, 3)
    res["locked_gib"] = round(max(ps.get("VmLck", 0), ps.get("VmPin", 0)) / 2**30, 3)
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


def deepspeed_engine_case(init, shape, warm, steps, zero, extra=None, prepare=None, layer_bytes=False, **config):
    """Build a bf16 DeepSpeed engine with `init` (deepspeed.initialize or ds_offload.initialize), time it, then
    close it (ds_offload's teardown and DeepSpeed's destroy), so that the next case of a shared process starts
    from an empty GPU. `prepare(model)` runs on the model before the engine is built (a peer's wrapping);
    `layer_bytes` also measures the bytes each layer saves for backward (the activation bound's input)."""
    m = build_model(shape)
    if prepare is not None:
        prepare(m)
    cfg = engine_config(shape, zero, **config)
    t0 = time.perf_counter()
    eng, _, _, _ = init(model=m, model_parameters=m.parameters(), config=cfg)
    init_s = time.perf_counter() - t0
    data = batches(shape, warm + steps)
    idx, tgt = data[0]
    taken = []

    def step():
        x, y = data[len(taken) % len(data)]
        taken.append(1)
        loss = loss_of(eng, shape, x, y)
        eng.backward(loss)
        eng.step()
        return loss.detach()
    try:
        res = measure(step, shape, warm, steps, extra=dict(init_s=round(init_s, 1), **(extra or {}),
                                                          batches="new each step" if shapes()[shape].get("fresh")
                                                          else "the same every step"))
        res.update(offload_facts(eng))
        if layer_bytes:
            res["saved_bytes_per_layer"] = saved_bytes_per_layer(eng, shape, idx, tgt)
        return res
    finally:
        st = getattr(eng, "ds_offload", None)
        if st is not None:
            st.close()
        eng.destroy()


def offload_facts(eng):
    """What ds_offload moved off the GPU in this engine (the bounds' inputs), from its own objects."""
    st = getattr(eng, "ds_offload", None)
    if st is None:
        return {}
    out = {"summary": st.summary()}
    if st.weights is not None:
        out["weights_offloaded_params"] = st.weights.numel
        out.update(st.weights.speculation_info())  # the layers' CPU steps during backward: on, kept, taken back
    if st.optimizer is not None and hasattr(st.optimizer, "split_info"):
        info = st.optimizer.split_info()
        out["optimizer_cpu_numel"] = info["cpu_numel"]
        for key in ("speculative", "rollbacks", "speculation_trial"):
            if key in info:
                out[key] = info[key]
        s = getattr(st.optimizer, "speculation", None)
        if s is not None:
            out["speculated_steps"] = s.speculated
    if st.activation_offload is not None:
        a = st.activation_offload.stats()
        out["activation_bytes_offloaded"] = a.get("bytes_offloaded_last_step")
    return out


def saved_bytes_per_layer(eng, shape, idx, tgt):
    """Bytes each transformer layer saves for backward (storages, counted once, parameters left out), from one
    forward whose graph is dropped unused (no backward: nothing reaches the gradients)."""
    layers = list(layers_of(eng.module))
    params = {p.untyped_storage().data_ptr() for p in eng.module.parameters()}
    counts, seen, cur = [0] * len(layers), set(), [None]
    hooks = [L.register_forward_pre_hook(lambda m, a, i=i: cur.__setitem__(0, i)) for i, L in enumerate(layers)]
    hooks += [L.register_forward_hook(lambda m, a, o: cur.__setitem__(0, None)) for L in layers]

    def pack(t):
        if cur[0] is not None and not isinstance(t, torch.nn.Parameter):
            try:
                key = t.untyped_storage().data_ptr()
                if key not in params and key not in seen:
                    seen.add(key)
                    counts[cur[0]] += t.untyped_storage().nbytes()
            except RuntimeError:   # a tensor without storage
                pass
        return t.detach()   # not `t`: an output saved by its own node would keep the dropped graph alive
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_of(eng.module, shape, idx, tgt)
        del loss
    finally:
        for h in hooks:
            h.remove()
    return counts


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
