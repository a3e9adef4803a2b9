"""What the three optimizers with a cut fp32 copy share (zero.py: DeepSpeed's ZeRO-1/2 optimizer, fused.py: its
FP16_Optimizer, bf16.py: its BF16_Optimizer): checkpoints in DeepSpeed's layout, and the split's figures.

Why whole tensors in checkpoints: a checkpoint must load with or without the block and with another fraction,
so what is saved is DeepSpeed's own layout (each group's whole fp32 copy and whole moments), put together from
the GPU head and the CPU tail for the save and taken apart again after a load.
"""
import contextlib
import warnings

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")


def decoupled(adamw_mode, param_groups):
    """Weight decay that `cpu_adam.undo_adamw` can take back: decoupled (AdamW), or none."""
    return adamw_mode or all(float(g["weight_decay"]) == 0 for g in param_groups)


def warn_overlap_does_nothing():
    """Weights offloaded, no optimizer share, and the layers' steps during backward impossible: the key is idle."""
    warnings.warn("cpu_offloading.optimizer.overlap_cpu_optimizer_d2h_h2d: the offloaded layers' CPU step can start "
                  "during backward only without loss scaling and with decoupled weight decay (AdamW), and without "
                  "optimizer_cpu_offload there is nothing else to overlap: the key changes nothing here. Fix: leave "
                  "it out, or use bf16/fp32 with AdamW.", stacklevel=3)


@contextlib.contextmanager
def whole_state(inner, heads, tails):
    """Swap whole fp32 tensors (CPU: head, then tail master) and whole moments into `inner` (the torch optimizer
    DeepSpeed wraps) for each cut group; yields the list of wholes (the head itself where a group is not cut)."""
    wholes = list(heads)
    saved = {}  # head => its optimizer state, out of the way while the whole stands in
    for i, (head, tail) in enumerate(zip(heads, tails)):
        if tail is None:
            continue
        wholes[i] = torch.cat([head.detach().cpu(), tail.master])
        st = inner.state.pop(head, {})
        saved[head] = st
        full = {"step": int(st["step"]) if "step" in st else tail.step}
        for key in MOMENTS:
            part = st[key].detach().cpu() if key in st else torch.zeros(head.numel())
            full[key] = torch.cat([part, getattr(tail, key)])
        inner.state[wholes[i]] = full
        inner.param_groups[i]["params"] = [wholes[i]]
    try:
        yield wholes
    finally:
        for i, (head, tail) in enumerate(zip(heads, tails)):
            if tail is None:
                continue
            inner.state.pop(wholes[i], None)
            if head not in inner.state and saved.get(head):  # a load sets the head's state itself
                inner.state[head] = saved[head]
            inner.param_groups[i]["params"] = [head]


def take_apart(inner, whole, head, tail, load_optimizer_states):
    """After a load into `whole`: its head part to the GPU head, its tail part to the CPU tail, and (when the
    optimizer state was loaded) the moments and step count the same way."""
    head.data.copy_(whole[:tail.start])
    tail.master.copy_(whole.detach()[tail.start:])
    st = inner.state.get(whole, {})
    if load_optimizer_states and st:
        tail.step = int(st.get("step", 0))
        kept = {"step": st["step"]} if "step" in st else {}
        for key in MOMENTS:
            getattr(tail, key).copy_(st[key].detach()[tail.start:])
            kept[key] = st[key].detach()[:tail.start].to(head.device).clone()
        if head.numel():
            inner.state[head] = kept


def split_info(heads, tails, offload, deferred):
    """Element counts of the split (what the summary line and the tests read)."""
    total = sum(h.numel() + (t.numel if t is not None else 0) for h, t in zip(heads, tails))
    cpu = sum(t.numel for t in tails if t is not None)
    return {"total_numel": total, "cpu_numel": cpu, "gpu_numel": total - cpu,
            "num_buckets": sum(t is not None for t in tails),
            "fraction": offload.optimizer_offload_fraction, "deferred": deferred}
