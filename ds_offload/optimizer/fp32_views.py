"""DeepSpeed's fp32 views of each parameter (`deepspeed.utils.safe_get_full_fp32_param`, `safe_set_full_fp32_param`,
`safe_get_full_optimizer_state`, `safe_set_full_optimizer_state`) for partitions that ds_offload cut in two and for
the offloaded layers' parameters.

Why: DeepSpeed links every bit16 parameter to its fragment of the rank's flat fp32 partition (`_hp_mapping`), and
its helpers read and write through that link. Once the partition is cut, the fragments point into memory that is
gone; unlinked, the helpers would quietly all-reduce an empty buffer and return zeros (and writes would do
nothing). So each parameter gets its own get/set, bound where DeepSpeed binds its own, that go to where the
fragment lives now: the GPU head and its optimizer state, the CPU tail's master and moments, or an offloaded
layer's CPU state. A deferred CPU step is landed first. Gradients (`safe_get_full_grad`) are not served: the
offloaded share's gradients leave the GPU inside `step()`; asking is an error, never zeros.
"""
import types

import torch
from deepspeed import comm as dist

_STATE_KEYS = (None, "exp_avg", "exp_avg_sq")   # the fp32 master, then Adam's moments


def record_fragments(opt):
    """Before DeepSpeed's links are dropped: each local parameter's (param start, partition start, numel)."""
    for i, group in enumerate(opt.bit16_groups):
        for p in group:
            m = getattr(p, "_hp_mapping", None)
            if m is not None:       # a reload that did not re-link keeps what was recorded (the layout is fixed)
                p._ds_offload_fragment = (i, m.lp_fragment_address.start, m.hp_fragment_address.start,
                                          m.lp_fragment_address.numel)
            elif not hasattr(p, "_ds_offload_fragment"):
                p._ds_offload_fragment = None   # none of it is in this rank's partition
            p._ds_offload_group = i


def _pieces(opt, i, hp0, n, key):
    """[(offset in the fragment, tensor)] covering partition elements [hp0, hp0 + n) of group i, for the master
    (`key` None) or a moment; a moment not created yet (before the first step) is None (zeros)."""
    tail = opt.tails[i]
    cut = tail.start if tail is not None else opt.single_partition_of_fp32_groups[i].numel()
    out = []
    if hp0 < cut:
        head = opt.single_partition_of_fp32_groups[i]
        src = head if key is None else opt.optimizer.state.get(head, {}).get(key)
        end = min(hp0 + n, cut)
        out.append((0, None if src is None else src.detach()[hp0:end]))
    if hp0 + n > cut:
        start = max(hp0, cut)
        src = tail.master if key is None else getattr(tail, key)
        out.append((start - hp0, src[start - cut:hp0 + n - cut]))
    return out


def _check_key(key):
    if key not in _STATE_KEYS:
        raise KeyError(f"ds_offload keeps the optimizer states {_STATE_KEYS[1:]} for offloaded parameters, not {key!r}")


def link(opt):
    """Bind the get/set of every parameter of the (cut) ZeRO partitions and of the offloaded layers."""
    for group in opt.bit16_groups:
        for p in group:
            p.get_full_hp_param = types.MethodType(_get_partitioned, p)
            p.set_full_hp_param = types.MethodType(_set_partitioned, p)
            p.get_full_hp_grad = types.MethodType(_no_grad, p)
            p._ds_offload_optimizer = opt
    w = opt.weights
    for L in (w.layers if w is not None else []):
        for p, o in zip(L.params, L.offsets):
            p._hp_mapping = None   # DeepSpeed's helpers dispatch on the attribute's presence
            p._ds_offload_layer, p._ds_offload_offset = L, o
            p.get_full_hp_param = types.MethodType(_get_offloaded, p)
            p.set_full_hp_param = types.MethodType(_set_offloaded, p)
            p.get_full_hp_grad = types.MethodType(_no_grad, p)
            p._ds_offload_optimizer = opt


def _get_partitioned(self, optim_state_key=None):
    _check_key(optim_state_key)
    opt = self._ds_offload_optimizer
    opt.wait()
    buf = torch.zeros(self.numel(), dtype=torch.float32, device=opt.device)
    frag = self._ds_offload_fragment
    if frag is not None:
        i, lp0, hp0, n = frag
        for off, src in _pieces(opt, i, hp0, n, optim_state_key):
            if src is not None:
                buf[lp0 + off:lp0 + off + src.numel()].copy_(src)
    dist.all_reduce(buf, group=opt.real_dp_process_group[self._ds_offload_group])
    return buf.view(self.shape)


def _set_partitioned(self, value, optim_state_key=None):
    _check_key(optim_state_key)
    opt = self._ds_offload_optimizer
    opt.wait()
    frag = self._ds_offload_fragment
    if frag is None:
        return
    i, lp0, hp0, n = frag
    flat = value.detach().reshape(-1)
    for off, dst in _pieces(opt, i, hp0, n, optim_state_key):
        if dst is None:
            raise RuntimeError(f"ds_offload: the optimizer state {optim_state_key!r} does not exist before the "
                               "first step(); set it after one step")
        dst.copy_(flat[lp0 + off:lp0 + off + dst.numel()])


def _offloaded_state(self, key):
    L, o = self._ds_offload_layer, self._ds_offload_offset
    return (L.master if key is None else getattr(L, key))[o:o + self.numel()]


def _get_offloaded(self, optim_state_key=None):
    _check_key(optim_state_key)
    opt = self._ds_offload_optimizer
    opt.wait()   # every rank holds the whole layer (replicated): nothing to gather
    return _offloaded_state(self, optim_state_key).to(opt.device, torch.float32).view(self.shape)


def _set_offloaded(self, value, optim_state_key=None):
    _check_key(optim_state_key)
    opt = self._ds_offload_optimizer
    opt.wait()
    _offloaded_state(self, optim_state_key).copy_(value.detach().reshape(-1))


def _no_grad(self):
    raise RuntimeError("ds_offload: safe_get_full_grad is not available for parameters whose optimizer ds_offload "
                       "runs (the offloaded share's gradients leave the GPU inside step()). Fix: use "
                       "safe_get_full_fp32_param or safe_get_full_optimizer_state, which ds_offload serves, or run "
                       "without the cpu_offloading block.")
