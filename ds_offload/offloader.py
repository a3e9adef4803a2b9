"""Activation offload to host memory: the engine both APIs share, and the fine-grained API.

The engine packs what autograd saves into per-*storage* host copies (the q/k/v views of one
projection move once), copies them out on one side stream and back on another, and ties each
copy's life to autograd's packed handle: backward frees it node by node, a forward without
backward frees it with the graph, so nothing leaks across steps. Autocast's weight copies are
recast from the parameter instead of copied.

`ActivationOffloader` is that engine on any region of any model, no DeepSpeed needed. Without
layer boundaries each offloaded storage is its own prefetch group, so unpacking one brings back
the next `prefetch_ahead` in backward order. It must never nest in layer-level offload (two sets
of hooks would copy the same tensors), hence the ConfigError.
"""
import math
import warnings
import weakref
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef

from .errors import ConfigError

_LAYER_HANDLES = weakref.WeakSet()  # installed layer-level handles (ds_offload.activations)


def layer_offload_installed():
    """True while any layer-level handle is installed; the fine-grained API refuses to nest in it."""
    return any(h.installed for h in list(_LAYER_HANDLES))


def _wait(device, event):
    """The compute stream waits for `event` (a copy's end); the host never blocks."""
    torch.cuda.current_stream(device).wait_event(event)


def _in_backward():
    # Recomputation during backward (reentrant checkpoint) must not be offloaded again.
    get = getattr(torch._C, "_current_graph_task_id", None)
    return get is not None and get() != -1


class _HostPool:
    """Host byte buffers; pinned when possible, reused across steps when `retain` is set."""

    def __init__(self, pin, retain):
        self.pin, self.retain = pin, retain
        self.free = defaultdict(list)  # nbytes -> [(buffer, event of its last copy)]
        self.pinned_bytes = 0

    def get(self, nbytes):
        if self.free.get(nbytes):
            return self.free[nbytes].pop()
        if self.pin:
            try:
                buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
                self.pinned_bytes += nbytes
                return buf, None
            except RuntimeError as exc:  # out of pinnable memory, or no pinned allocator at all
                self.pin = False
                warnings.warn(f"ds_offload: pinned host memory unavailable ({exc}); activation "
                              "offload falls back to pageable memory, whose copies are synchronous.")
        return torch.empty(nbytes, dtype=torch.uint8), None

    def put(self, buf, event):
        if self.retain:
            self.free[buf.numel()].append((buf, event))
        elif buf.is_pinned():
            self.pinned_bytes -= buf.numel()

    def clear(self):
        for bufs in self.free.values():
            self.pinned_bytes -= sum(b.numel() for b, _ in bufs if b.is_pinned())
        self.free.clear()


class _Record:
    """One storage's trip to the host and back; shared by every saved view of that storage."""

    __slots__ = ("engine", "host", "nbytes", "device", "group", "shared", "d2h", "h2d", "gpu",
                 "src", "waited", "refs", "__weakref__")

    def __init__(self, engine, nbytes, device, group):
        self.engine, self.nbytes, self.device, self.group = engine, nbytes, device, group
        self.host = self.d2h = self.h2d = self.gpu = self.src = None
        self.shared, self.waited, self.refs = False, False, 0

    def release(self):
        if self.h2d is not None and not self.waited:  # fetched, never used: the copy still owns gpu
            _wait(self.device, self.h2d)
        if self.host is not None:
            self.engine.pool.put(self.host, self.h2d or self.d2h)
        self.host = self.gpu = self.src = None


class _Packed:
    """What autograd keeps instead of the tensor; dropping the last one frees the host copy."""

    __slots__ = ("rec", "sess", "dtype", "offset", "size", "stride")

    def __init__(self, rec, sess, t):
        self.rec, self.sess = rec, sess
        self.dtype, self.offset, self.size, self.stride = t.dtype, t.storage_offset(), t.size(), t.stride()
        rec.refs += 1

    def __del__(self):
        self.rec.refs -= 1
        if self.rec.refs == 0:
            self.rec.release()


class _Recast:
    """Autocast's cast of a parameter, saved as "cast the parameter again": the cast is exact and
    costs a fraction of a millisecond on the GPU, while copying it out and back costs bandwidth."""

    __slots__ = ("param", "dtype", "offset", "size", "stride", "version")

    @classmethod
    def of(cls, t, min_bytes):
        base = t if t._base is None else t._base
        fn = base.grad_fn
        if fn is None or fn.name() != "ToCopyBackward0" or not fn.next_functions:
            return None
        p = getattr(fn.next_functions[0][0], "variable", None)
        if (not isinstance(p, nn.Parameter) or base.shape != p.shape or base.device != p.device
                or not base.is_contiguous() or t.numel() * t.element_size() < min_bytes):
            return None
        self = cls()
        self.param, self.dtype, self.version = p, base.dtype, p._version
        self.offset, self.size, self.stride = t.storage_offset(), t.size(), t.stride()
        return self

    def load(self):
        p = self.param
        if p._version != self.version:
            raise RuntimeError("ds_offload: a parameter changed in place between forward and backward, "
                               "so its autocast copy cannot be recomputed; run backward before the "
                               "optimizer step, or set engine.recompute_weight_casts = False")
        return p.detach().to(self.dtype).as_strided(self.size, self.stride, self.offset)


class _Session:
    """One forward pass (a micro-batch): its records by group, and the copies still in flight."""

    def __init__(self, engine, num_groups=None, num_layers=None, depth=1, double_buffering=False):
        self.engine, self.depth, self.double_buffering = engine, depth, double_buffering
        self.num_groups, self.num_layers = num_groups, num_layers
        self.groups = defaultdict(list)  # group -> [weakref(_Record)] in save order
        self.by_ptr = {}  # storage address -> (StorageWeakRef, weakref(_Record))
        self.pending = []  # (d2h event, source bytes, record) kept alive until the copy is done
        self.fetched, self.drained, self.last_idx = set(), False, -1
        self.next_group, self.device, self.mem_limit = 0, None, None
        engine.bytes_this_pass = engine.tensors_this_pass = engine.tensors_recast = 0

    def poll(self):
        """Free the sources whose copies have finished, without waiting for the others."""
        while self.pending and self.pending[0][0].query():
            self.pending.pop(0)

    def drain(self, keep_fraction=0.0):
        """Order the compute stream after the copies out, then let their sources go.

        The newest `keep_fraction` of this pass's bytes may stay on the GPU instead: the compute
        stream does not wait for their copies, and backward uses them in place (they are the
        first it needs), which saves that share of both copy directions at a small memory cost.
        """
        keep, budget = [], keep_fraction * self.engine.bytes_this_pass
        while self.pending and self.pending[-1][2].nbytes <= budget:
            budget -= self.pending[-1][2].nbytes
            keep.append(self.pending.pop())
        for _, src, rec in keep:
            rec.src = src
        if self.pending:
            ev, src, _ = self.pending[-1]
            _wait(src.device, ev)
        self.pending.clear()
        self.drained = True

    def on_backward_layer(self, j):
        """Backward reached group `j`: fetch it, and every group that depth or memory allows."""
        if not self.drained:
            self.drain()
        n = self.num_groups if self.num_groups is not None else self.next_group
        for k in range(min(j, n - 1), -1, -1):
            if k in self.fetched:
                continue
            if not self._may_fetch(j, k, n):
                break
            self.fetched.add(k)
            self.engine.fetch_group(self, k)

    def _may_fetch(self, j, k, n):
        """Depth only: without layers there is no memory model to fetch further on."""
        return k >= j - self.depth


class _Engine:
    """Pack/unpack shared by the layer hooks (`ds_offload.activations`) and `ActivationOffloader`."""

    def __init__(self, min_bytes, pin, retain, offload_cpu_tensors=False):
        self.min_bytes, self.offload_cpu = min_bytes, offload_cpu_tensors
        self.pool = _HostPool(pin and torch.cuda.is_available(), retain)
        self.streams = {}
        self.bytes_this_pass = self.tensors_this_pass = 0
        self.records_alive = weakref.WeakSet()
        self.recompute_weight_casts, self.tensors_recast = True, 0  # see `_Recast`

    def stream(self, device, direction):
        """Side stream 0 copies out, 1 copies back: the two directions overlap on the bus."""
        if (device, direction) not in self.streams:
            self.streams[device, direction] = torch.cuda.Stream(device)
        return self.streams[device, direction]

    def wants(self, t):
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return False
        if type(t) is not torch.Tensor or t.layout != torch.strided or (t.is_leaf and t.requires_grad):
            return False
        if not (t.is_cuda or (self.offload_cpu and t.device.type == "cpu")):
            return False
        return t.numel() * t.element_size() >= self.min_bytes and not _in_backward()

    def pack(self, t, sess, group):
        if self.recompute_weight_casts:
            recast = _Recast.of(t, self.min_bytes)
            if recast is not None:
                self.tensors_recast += 1
                return recast
        if not self.wants(t):
            return t
        st = t.untyped_storage()
        hit = sess.by_ptr.get(st.data_ptr())
        rec = hit[1]() if hit is not None and not hit[0].expired() else None
        if rec is None or rec.host is None or rec.nbytes != st.nbytes():
            if group is None:
                group, sess.next_group = sess.next_group, sess.next_group + 1
            rec = self._copy_out(st, t.device, sess, group)
            sess.by_ptr[st.data_ptr()] = (StorageWeakRef(st), weakref.ref(rec))
            sess.groups[group].append(weakref.ref(rec))
        elif group is not None and group != rec.group:
            rec.shared = True  # saved by two layers: never lives in a double buffer
        return _Packed(rec, sess, t)

    def _copy_out(self, st, device, sess, group):
        rec = _Record(self, st.nbytes(), device, group)
        rec.host, last_use = self.pool.get(rec.nbytes)
        src = torch.empty(0, dtype=torch.uint8, device=device).set_(st)
        if device.type == "cuda":
            side = self.stream(device, 0)
            side.wait_stream(torch.cuda.current_stream(device))
            if last_use is not None:
                side.wait_event(last_use)  # a retained buffer may still feed last step's reload
            with torch.cuda.stream(side):
                rec.host.copy_(src, non_blocking=True)
            rec.d2h = torch.cuda.Event()
            rec.d2h.record(side)
            sess.pending.append((rec.d2h, src, rec))
            sess.device = device
            sess.poll()
        else:
            rec.host.copy_(src)
        self.bytes_this_pass += rec.nbytes
        self.tensors_this_pass += 1
        self.records_alive.add(rec)
        return rec

    def fetch_group(self, sess, group):
        recs = [r for r in (w() for w in sess.groups.get(group, ())) if r is not None and r.gpu is None
                and r.host is not None]
        bufs = self._buffers(sess, group, recs)
        for rec in recs:
            self.fetch(rec, bufs.get(id(rec)))

    def _buffers(self, sess, group, recs):
        """Where a group's copies back land: fresh memory (double buffering overrides this)."""
        return {}

    def fetch(self, rec, buf=None):
        if rec.src is not None:  # never left the GPU (see `_Session.drain`)
            rec.gpu = rec.src
            return
        if rec.device.type != "cuda":
            rec.gpu = rec.host.clone()  # CPU test mode: a separate copy stands in for the reload
            return
        compute = torch.cuda.current_stream(rec.device)
        rec.gpu = buf if buf is not None else torch.empty(rec.nbytes, dtype=torch.uint8, device=rec.device)
        side = self.stream(rec.device, 1)
        side.wait_stream(compute)  # the buffer was allocated on (or last read by) compute
        side.wait_event(rec.d2h)
        with torch.cuda.stream(side):
            rec.gpu.copy_(rec.host, non_blocking=True)
        rec.h2d = torch.cuda.Event()
        rec.h2d.record(side)

    def unpack(self, p):
        if not isinstance(p, _Packed):
            return p.load() if isinstance(p, _Recast) else p
        rec, sess = p.rec, p.sess
        if rec.gpu is None:
            sess.on_backward_layer(rec.group)
        if rec.gpu is None:  # a record shared with a later layer: needed before its own group
            self.fetch(rec)
        if rec.h2d is not None and not rec.waited:
            _wait(rec.device, rec.h2d)
            rec.waited = True
        out = torch.empty(0, dtype=p.dtype, device=rec.gpu.device)
        return out.set_(rec.gpu.untyped_storage(), p.offset, p.size, p.stride)


_CONFLICT = ("fine_grained_activation_offloading cannot be enabled with cpu_offloading. Use one of the "
             "two: either remove the ActivationOffloader context from the model code, or set "
             "cpu_offloading.model.cpu_offloading to false (layer-level offload already covers "
             "the first cpu_offloading_num_layers layers).")


class OffloadedTensor:
    """A tensor parked on the host by `ActivationOffloader.offload`; `prefetch` brings it back."""

    __slots__ = ("_packed", "_tensor", "device")

    def __init__(self, packed=None, tensor=None, device=None):
        self._packed, self._tensor, self.device = packed, tensor, device

    @property
    def offloaded(self):
        """Whether the data really left the device (False for small tensors or without CUDA)."""
        return self._packed is not None

    @property
    def nbytes(self):
        return self._packed.rec.nbytes if self._packed is not None else 0


class ActivationOffloader:
    """Offload saved activations of a region to (pinned) host memory, prefetch them in backward.

    `offload_threshold_mb` keeps small tensors on the device (their copies cost more in launch
    latency than they save); `prefetch_ahead` is how many offloaded storages are brought back
    ahead of the one backward is using. Without CUDA everything runs and nothing changes;
    `offload_cpu_tensors=True` exists for tests, to run the real logic on CPU tensors.
    """

    def __init__(self, enabled=True, offload_threshold_mb=10.0, prefetch_ahead=2, pin_memory=True, *,
                 retain_pinned_buffers=False, offload_cpu_tensors=False):
        if not _is_number(offload_threshold_mb) or offload_threshold_mb < 0:
            raise ValueError(f"offload_threshold_mb must be a number >= 0, got {offload_threshold_mb!r}")
        if isinstance(prefetch_ahead, bool) or not isinstance(prefetch_ahead, int) or prefetch_ahead < 0:
            raise ValueError(f"prefetch_ahead must be an int >= 0, got {prefetch_ahead!r}")
        self.enabled, self.prefetch_ahead = bool(enabled), prefetch_ahead
        self.offload_threshold_mb, self.pin_memory = float(offload_threshold_mb), bool(pin_memory)
        self._engine = _Engine(int(self.offload_threshold_mb * 2**20), pin_memory, retain_pinned_buffers,
                               offload_cpu_tensors)

    @property
    def active(self):
        return self.enabled and (torch.cuda.is_available() or self._engine.offload_cpu)

    def stats(self):
        eng = self._engine
        return {"bytes_offloaded_last_region": eng.bytes_this_pass,
                "tensors_offloaded_last_region": eng.tensors_this_pass,
                "pinned_bytes_held": eng.pool.pinned_bytes, "records_alive": len(eng.records_alive)}

    @contextmanager
    def offload_context(self):
        """Offload what autograd saves inside the block; backward may run inside or after it."""
        if layer_offload_installed():
            raise ConfigError([("cpu_offloading.model.cpu_offloading", _CONFLICT)])
        if not self.active:
            yield self
            return
        sess = _Session(self._engine, depth=max(self.prefetch_ahead, 0))
        eng = self._engine
        try:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: eng.pack(t, sess, None), eng.unpack):
                yield self
        finally:
            sess.drain()

    def offload(self, tensor):
        """Start copying `tensor` to the host; the returned handle owns the host copy."""
        if not self.active or not self._engine.wants(tensor):
            return OffloadedTensor(tensor=tensor, device=tensor.device)
        sess = _Session(self._engine)
        rec = self._engine._copy_out(tensor.untyped_storage(), tensor.device, sess, 0)
        packed = _Packed(rec, sess, tensor)
        if tensor.is_cuda:  # the caller may free `tensor` now: its memory waits for the copy, not us
            tensor.record_stream(self._engine.stream(tensor.device, 0))
            sess.pending.clear()
        return OffloadedTensor(packed=packed, device=tensor.device)

    def prefetch(self, handle, device=None):
        """Copy the tensor back (asynchronously, ordered before later work on the current stream)."""
        device = torch.device(device) if device is not None else handle.device
        if handle._packed is None:
            return handle._tensor.to(device, non_blocking=True)
        rec = handle._packed.rec
        if rec.gpu is None:
            self._engine.fetch(rec)
        out = self._engine.unpack(handle._packed)
        return out if out.device == device else out.to(device)


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def estimate_offloading_memory_savings(activation_memory_gpu_mb, offload_ratio):
    """What offloading `offload_ratio` of `activation_memory_gpu_mb` activations leaves on the GPU.

    A planning aid: it assumes the offloaded share leaves the GPU entirely and lands in host memory
    one for one (pinned buffers are exactly sized), which is what the engine does.
    """
    if not _is_number(activation_memory_gpu_mb):
        raise TypeError(f"activation_memory_gpu_mb must be a finite number, got {activation_memory_gpu_mb!r}")
    if not _is_number(offload_ratio):
        raise TypeError(f"offload_ratio must be a finite number, got {offload_ratio!r}")
    if activation_memory_gpu_mb < 0:
        raise ValueError(f"activation_memory_gpu_mb must be >= 0, got {activation_memory_gpu_mb}")
    if not 0.0 <= offload_ratio <= 1.0:
        raise ValueError(f"offload_ratio must be in [0.0, 1.0], got {offload_ratio}")
    saved = float(activation_memory_gpu_mb) * offload_ratio
    return {"gpu_memory_mb": float(activation_memory_gpu_mb) - saved, "gpu_savings_mb": saved,
            "cpu_usage_mb": saved, "savings_percent": float(offload_ratio) * 100.0}
