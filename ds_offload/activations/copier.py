"""The saved-tensor copier that both activation-offload APIs share.

It packs what autograd saves into per-*storage* host copies (the q/k/v views of one projection
move once), copies them out on one side stream and back on another, and ties each copy's life to
autograd's packed handle: backward frees it node by node, a forward without backward frees it with
the graph, so nothing leaks across steps. Autocast's weight copies are recast from the parameter
instead of copied (`_Recast`).

Users reach the copier as `LayerOffloadHandle.copier` (under `ds_offload.initialize`:
`engine.ds_offload.activation_offload.copier`) or `ActivationOffloader.copier`.
"""
import weakref
from collections import defaultdict

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef

from .host_pool import _HostPool

_RECOMPUTE_OFF = ("`recompute_weight_casts = False` on the copier: `engine.ds_offload.activation_offload.copier` "
                  "under ds_offload.initialize, `handle.copier` on what install_layer_offload returns, "
                  "`offloader.copier` on an ActivationOffloader")


def _wait(device, event):
    """The compute stream waits for `event` (a copy's end); the host never blocks."""
    torch.cuda.current_stream(device).wait_event(event)


def _in_backward():
    # Recomputation during backward (reentrant checkpoint) must not be offloaded again.
    get = getattr(torch._C, "_current_graph_task_id", None)
    return get is not None and get() != -1


class _Record:
    """One storage's trip to the host and back; shared by every saved view of that storage."""

    __slots__ = (
        "copier",  # copier => the SavedTensorCopier whose pool owns `host`
        "host",  # host => the host byte buffer holding the copy (None once released)
        "nbytes",  # nbytes => the storage's size in bytes
        "device",  # device => where the storage lives and comes back to
        "group",  # group => the prefetch group: the layer index, or the storage's save order
        "shared",  # shared => saved by two layers, so it never lands in a double buffer
        "d2h",  # d2h => event at the end of the copy out (None on CPU)
        "h2d",  # h2d => event at the end of the copy back (None until fetched, and on CPU)
        "gpu",  # gpu => the bytes backward reads: the reloaded copy, or `src` (None until fetched)
        "src",  # src => the original storage, kept when it stays resident (see `_Session.drain`)
        "waited",  # waited => the compute stream already waits for `h2d`
        "refs",  # refs => live `_Packed` handles; the last one to go releases the record
        "__weakref__",
    )

    def __init__(self, copier, nbytes, device, group):
        self.copier, self.nbytes, self.device, self.group = copier, nbytes, device, group
        self.host = self.d2h = self.h2d = self.gpu = self.src = None
        self.shared, self.waited, self.refs = False, False, 0

    def release(self):
        if self.h2d is not None and not self.waited:  # fetched, never used: the copy still owns gpu
            _wait(self.device, self.h2d)
        if self.host is not None:
            self.copier.pool.put(self.host, self.h2d or self.d2h)
        self.host = self.gpu = self.src = None


class _Packed:
    """What autograd keeps instead of the tensor; dropping the last one frees the host copy."""

    __slots__ = (
        "rec",  # rec => the `_Record` of the tensor's storage
        "sess",  # sess => the `_Session` (forward pass) that saved it
        "dtype",  # dtype => the saved tensor's dtype
        "offset",  # offset => its storage offset, in elements
        "size",  # size => its shape
        "stride",  # stride => its strides
    )

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

    __slots__ = (
        "param",  # param => the parameter the cast was made from
        "dtype",  # dtype => the cast's dtype
        "offset",  # offset => the saved view's storage offset, in elements
        "size",  # size => the saved view's shape
        "stride",  # stride => the saved view's strides
        "version",  # version => the parameter's version counter at save time
    )

    @classmethod
    def of(cls, t, min_offload_bytes):
        base = t if t._base is None else t._base
        fn = base.grad_fn
        if fn is None or fn.name() != "ToCopyBackward0" or not fn.next_functions:
            return None
        p = getattr(fn.next_functions[0][0], "variable", None)
        if (not isinstance(p, nn.Parameter) or base.shape != p.shape or base.device != p.device
                or not base.is_contiguous() or t.numel() * t.element_size() < min_offload_bytes):
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
                               f"optimizer step, or copy weight casts instead: set {_RECOMPUTE_OFF}")
        return p.detach().to(self.dtype).as_strided(self.size, self.stride, self.offset)


class _Session:
    """One forward pass (a micro-batch): its records by group, and the copies still in flight."""

    def __init__(self, copier, num_groups=None, num_layers=None, prefetch_depth=1, double_buffering=False):
        self.copier = copier  # copier => the SavedTensorCopier doing this pass's copies
        self.prefetch_depth = prefetch_depth  # prefetch_depth => groups fetched ahead of the one in use
        self.double_buffering = double_buffering  # double_buffering => reload into two alternating buffer sets
        self.num_groups = num_groups  # num_groups => offloaded layers (None: one group per storage)
        self.num_layers = num_layers  # num_layers => all layers, offloaded or not (None without layers)
        self.groups = defaultdict(list)  # group => [weakref(_Record)] in save order
        self.by_ptr = {}  # storage address => (StorageWeakRef, weakref(_Record))
        self.pending = []  # [(d2h event, source bytes, record)]: sources kept alive until copied out
        self.fetched = set()  # fetched => groups whose copies back have been issued
        self.drained = False  # drained => the compute stream already waits for the copies out
        self.last_idx = -1  # last_idx => the last layer whose forward started (a lower one: new pass)
        self.next_group = 0  # next_group => the group the next storage gets, without layers
        self.device = None  # device => the CUDA device copied from (None: nothing copied on CUDA)
        self.mem_limit = None  # mem_limit => GPU bytes allocated at the end of the forward
        copier.bytes_this_pass = copier.tensors_this_pass = copier.tensors_recast = 0

    def poll(self):
        """Free the sources whose copies have finished, without waiting for the others."""
        while self.pending and self.pending[0][0].query():
            self.pending.pop(0)

    def drain(self, resident_tail_fraction=0.0):
        """Order the compute stream after the copies out, then let their sources go.

        The newest `resident_tail_fraction` of this pass's bytes may stay on the GPU instead: the
        compute stream does not wait for their copies, and backward uses them in place (they are the
        first it needs), which saves that share of both copy directions at a small memory cost.
        """
        keep, budget = [], resident_tail_fraction * self.copier.bytes_this_pass
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
        """Backward reached group `j`: fetch it, and every group that `prefetch_depth` or memory allows."""
        if not self.drained:
            self.drain()
        n = self.num_groups if self.num_groups is not None else self.next_group
        for k in range(min(j, n - 1), -1, -1):
            if k in self.fetched:
                continue
            if not self._may_fetch(j, k, n):
                break
            self.fetched.add(k)
            self.copier.fetch_group(self, k)

    def _may_fetch(self, j, k, n):
        """`prefetch_depth` only: without layers there is no memory model to fetch further on."""
        return k >= j - self.prefetch_depth


class SavedTensorCopier:
    """Pack/unpack shared by the layer hooks (`layer_hooks`) and `ActivationOffloader` (`region`)."""

    def __init__(self, min_offload_bytes, pin, retain, offload_cpu_tensors=False):
        self.min_offload_bytes = min_offload_bytes  # min_offload_bytes => smaller saved tensors stay put
        self.offload_cpu = offload_cpu_tensors  # offload_cpu => CPU tensors take the trip too (tests)
        self.pool = _HostPool(pin and torch.cuda.is_available(), retain)
        self.streams = {}  # (device, direction) => side stream; direction 0 copies out, 1 back
        self.bytes_this_pass = 0  # bytes_this_pass => bytes copied out by the current or last pass
        self.tensors_this_pass = 0  # tensors_this_pass => storages copied out by that pass
        self.records_alive = weakref.WeakSet()  # records_alive => every `_Record` not yet collected
        self.recompute_weight_casts = True  # recompute_weight_casts => recast autocast weight copies
        self.tensors_recast = 0  # tensors_recast => weight casts saved as `_Recast` by that pass

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
        return t.numel() * t.element_size() >= self.min_offload_bytes and not _in_backward()

    def pack(self, t, sess, group):
        if self.recompute_weight_casts:
            recast = _Recast.of(t, self.min_offload_bytes)
            if recast is not None:
                self.tensors_recast += 1
                return recast
        if not self.wants(t):
            # a detached alias, not `t`: an output saved by its own node would otherwise hold that node through
            # the packed object (tensor -> grad_fn -> saved -> tensor), a cycle Python's collector cannot see, and
            # a graph dropped without backward would keep its saved outputs on the GPU for good
            return t.detach()
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
