"""Layer-level activation offloading: what transformer layers save for backward waits in host memory.

Why this shape: the copies, not the hooks, decide the speed. A reference-GPT layer saves ~1.2 GiB
and pinned copies move ~55 GB/s, so its copy (~22 ms) outlasts its forward (~3.5 ms) and backward
(~7 ms). So: each saved storage leaves on a side stream the moment it is saved; the compute
stream waits for those copies once, at the end of the layers (the peak comes after, at the loss),
except for a small resident tail that backward uses in place; in backward a layer comes back
`prefetch_depth` layers ahead, or earlier whenever memory is below its end-of-forward level.
Autocast's weight copies are recast from the parameter instead of copied. The step is then about
max(forward, N copies out) + max(backward, N copies in); `benchmarks/activation_probe.py` prints it.

Host copies are per *storage*, so the q/k/v views of one projection move once, and a record
lives exactly as long as autograd holds a packed handle to it: backward frees it node by node,
a forward without backward frees it with the graph, and nothing leaks across steps.
"""
import warnings
import weakref

import torch

from .copier import SavedTensorCopier, _in_backward, _Session, _wait

__all__ = ["install_layer_offload", "LayerOffloadHandle", "layer_offload_installed"]

_LAYER_HANDLES = weakref.WeakSet()  # _LAYER_HANDLES => every LayerOffloadHandle not yet collected


def layer_offload_installed():
    """True while any layer-level handle is installed; the fine-grained API refuses to nest in it."""
    return any(h.installed for h in list(_LAYER_HANDLES))


class _LayerSession(_Session):
    """A forward pass over the layers: throttles copies out, prefetches by `prefetch_depth` and by memory."""

    def throttle(self, j):
        """Before layer `j`: bound the copies still in flight, whose sources hold GPU memory.

        Without this the layers outrun the copies and the forward's end holds every layer at
        once. Allowed in flight: the non-offloaded layers still to run, plus one, times the
        mean layer size; the compute stream then waits only when that is exceeded, which is
        free when copies are the bottleneck (the copy stream stays busy either way).
        """
        self.poll()
        n, total = self.num_groups, self.num_layers
        if not self.pending or min(j, n) == 0:
            return
        allowed = (total - max(j, n - 1)) * self.copier.bytes_this_pass / min(j, n)
        in_flight = sum(rec.nbytes for _, _, rec in self.pending)
        done = []
        while self.pending and in_flight > allowed:
            done.append(self.pending.pop(0))
            in_flight -= done[-1][2].nbytes
        if done:
            _wait(done[-1][1].device, done[-1][0])  # FIFO copy stream: covers the earlier ones
        done.clear()  # sources go only after the wait is queued

    def _may_fetch(self, j, k, n):
        """`prefetch_depth` layers ahead always; further only while memory stays under the
        level of the end of the forward, so a fetch never raises the peak: backward frees a
        layer's activations minus its new weight gradients per layer, and that is the room."""
        if k >= j - (1 if self.double_buffering else self.prefetch_depth):  # two buffer sets: one ahead
            return True
        if self.double_buffering:
            return False
        if self.mem_limit is None:  # no allocator to ask (CPU tests): one per freed layer
            return k >= min(j, n) - (self.num_layers - 1 - max(j, n - 1))
        need = sum(r.nbytes for r in (w() for w in self.groups.get(k, ()))
                   if r is not None and r.gpu is None and r.src is None)
        return torch.cuda.memory_allocated(self.device) + need <= self.mem_limit


class LayerCopier(SavedTensorCopier):
    """The saved-tensor copier plus double buffering: two GPU buffer sets, alternating by layer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bufsets = [None, None]  # layer parity => (layout: record sizes, [GPU byte buffers]) or None

    def _buffers(self, sess, group, recs):
        """Reuse the parity's set when the layer's layout matches, else replace it (per-layer
        fallback, so layers of different shapes work); records shared by two layers never enter."""
        recs = [r for r in recs if not r.shared] if sess.double_buffering else []
        if not recs or recs[0].device.type != "cuda":
            return {}
        layout = tuple(r.nbytes for r in recs)
        cur = self.bufsets[group % 2]
        if cur is None or cur[0] != layout:  # per-layer fallback: shapes differ, new set
            cur = (layout, [torch.empty(n, dtype=torch.uint8, device=recs[0].device) for n in layout])
            self.bufsets[group % 2] = cur
        return {id(r): b for r, b in zip(recs, cur[1])}


def _first_grad_tensor(out):
    if isinstance(out, torch.Tensor):
        return out if out.requires_grad else None
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    return next((t for t in map(_first_grad_tensor, items) if t is not None), None)


class LayerOffloadHandle:
    """What `install_layer_offload` returns: `remove()` undoes it, `stats()` reports it."""

    def __init__(self, layers, num_layers, copier, prefetch_depth, double_buffering, active,
                 resident_tail_fraction=0.0):
        self.layers = list(layers)  # layers => every layer, in forward order
        self.num_layers = num_layers  # num_layers => how many of them (the first) are offloaded
        self.copier = copier  # copier => the LayerCopier doing the copies
        self.prefetch_depth = prefetch_depth  # prefetch_depth => layers fetched ahead in backward
        self.double_buffering = double_buffering  # double_buffering => reload into two buffer sets
        # resident_tail_fraction => the newest share of a pass's bytes that may stay on the GPU
        self.resident_tail_fraction = resident_tail_fraction
        self.active = active  # active => hooks installed (False: the no-CUDA no-op)
        self.installed = True  # installed => not removed yet
        self._hooks = []  # _hooks => the forward pre/post hook handles on the layers
        # _stack => [(layer index, its saved_tensors_hooks context or None, its session or None)]
        self._stack = []
        self._sess = None  # _sess => the `_LayerSession` of the forward pass under way
        # _last => {"bytes", "tensors": what the last finished pass copied out}
        self._last = {"bytes": 0, "tensors": 0}
        if active:
            for idx, layer in enumerate(self.layers):
                self._hooks.append(layer.register_forward_pre_hook(self._pre_hook(idx)))
                self._hooks.append(layer.register_forward_hook(self._post_hook(idx), always_call=True))
        _LAYER_HANDLES.add(self)

    def _pre_hook(self, idx):
        def hook(module, args):
            on = torch.is_grad_enabled() and module.training and not _in_backward()
            if on and (self._sess is None or idx <= self._sess.last_idx):
                self._new_session()
            if on:
                self._sess.last_idx = idx
                self._sess.throttle(idx)
            ctx = None
            if on and idx < self.num_layers:
                sess, copier = self._sess, self.copier
                ctx = torch.autograd.graph.saved_tensors_hooks(lambda t: copier.pack(t, sess, idx),
                                                               copier.unpack)
                ctx.__enter__()
            self._stack.append((idx, ctx, self._sess if on else None))
        return hook

    def _post_hook(self, idx):
        def hook(module, args, output):
            if not self._stack:
                return
            _, ctx, sess = self._stack.pop()
            if ctx is not None:
                ctx.__exit__(None, None, None)
            if sess is None:
                return
            t = _first_grad_tensor(output)
            if t is not None:
                t.register_hook(lambda g, s=sess: s.on_backward_layer(idx))
            if idx == len(self.layers) - 1:  # end of the layers: wait for copies before the loss
                sess.drain(self.resident_tail_fraction)
                if sess.device is not None:
                    sess.mem_limit = torch.cuda.memory_allocated(sess.device)
                self._end_session()
        return hook

    def _new_session(self):
        self._end_session()
        self._sess = _LayerSession(self.copier, self.num_layers, len(self.layers), self.prefetch_depth,
                                   self.double_buffering)

    def _end_session(self):
        if self._sess is not None:
            self._sess.drain()  # an abandoned pass (exception, early exit) leaves nothing pending
            self._last = {"bytes": self.copier.bytes_this_pass, "tensors": self.copier.tensors_this_pass}
            self._sess = None

    def stats(self):
        """Bytes and tensors offloaded by the last forward, pinned bytes held now, records alive."""
        last = self._last if self._sess is None else {"bytes": self.copier.bytes_this_pass,
                                                      "tensors": self.copier.tensors_this_pass}
        return {"active": self.active, "num_layers": self.num_layers,
                "bytes_offloaded_last_step": last["bytes"], "tensors_offloaded_last_step": last["tensors"],
                "tensors_recast_last_step": self.copier.tensors_recast,
                "pinned_bytes_held": self.copier.pool.pinned_bytes,
                "records_alive": len(self.copier.records_alive)}

    def remove(self):
        """Uninstall the hooks and drop every retained host or GPU buffer."""
        self._end_session()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        while self._stack:
            ctx = self._stack.pop()[1]
            if ctx is not None:
                ctx.__exit__(None, None, None)
        self.copier.pool.clear()
        self.copier.bufsets = [None, None]
        self.installed = False
        _LAYER_HANDLES.discard(self)


def install_layer_offload(layers, num_layers, *, min_offload_bytes=1 << 20, prefetch_depth=1,
                          double_buffering=False, retain_pinned_buffers=False, pin_memory=True,
                          resident_tail_fraction=0.05, offload_cpu_tensors=False):
    """Offload what the first `num_layers` of `layers` (forward order) save for backward.

    In backward a layer's copies come back `prefetch_depth` layers ahead of use (counted over all
    of `layers`), and earlier whenever GPU memory is below its level at the end of the forward.
    `min_offload_bytes` keeps small tensors on the GPU; parameters never move, and autocast's
    weight copies are recast in backward instead of copied.

    `resident_tail_fraction` of the offloaded bytes (the newest, which backward needs first) may
    stay on the GPU when their copies have not finished by the end of the forward: the forward
    does not wait for them and the backward does not copy them back, for a peak-memory cost of
    at most that fraction of what offloading saves.

    Without CUDA this is a no-op with one warning, so the same script runs in CI;
    `offload_cpu_tensors=True` instead copies CPU activations into separate host buffers, which
    runs the real pack/unpack/prefetch logic on CPU for tests.
    """
    layers = list(layers)
    if not isinstance(num_layers, int) or not 0 <= num_layers <= len(layers):
        raise ValueError(f"num_layers must be an int in [0, {len(layers)}], got {num_layers!r}")
    if not isinstance(prefetch_depth, int) or prefetch_depth < 1:
        raise ValueError(f"prefetch_depth must be an int >= 1, got {prefetch_depth!r}")
    if not 0.0 <= resident_tail_fraction <= 1.0:
        raise ValueError(f"resident_tail_fraction must be in [0, 1], got {resident_tail_fraction!r}")
    if min_offload_bytes < 0:
        raise ValueError(f"min_offload_bytes must be >= 0, got {min_offload_bytes!r}")
    active = num_layers > 0 and (torch.cuda.is_available() or offload_cpu_tensors)
    if not torch.cuda.is_available() and not offload_cpu_tensors:
        warnings.warn("ds_offload: no CUDA device, so layer-level activation offloading is a no-op.")
    copier = LayerCopier(min_offload_bytes, pin_memory, retain_pinned_buffers, offload_cpu_tensors)
    return LayerOffloadHandle(layers, num_layers, copier, prefetch_depth, double_buffering, active,
                              resident_tail_fraction)
