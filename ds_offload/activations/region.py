"""Fine-grained activation offload: the saved-tensor copier on any region of any model, no DeepSpeed.

Without layer boundaries each offloaded storage is its own prefetch group, so unpacking one brings
back the next `prefetch_depth` in backward order. It must never nest in layer-level offload (two
sets of hooks would copy the same tensors), hence the ConfigError.
"""
from contextlib import contextmanager

import torch

from ..errors import ConfigError
from .copier import SavedTensorCopier, _Packed, _Session
from .layer_hooks import layer_offload_installed

__all__ = ["ActivationOffloader", "OffloadedTensor"]

_CONFLICT = ("fine_grained_activation_offloading cannot be enabled with cpu_offloading. Use one of the "
             "two: either remove the ActivationOffloader context from the model code, or set "
             "cpu_offloading.model.cpu_offloading to false (layer-level offload already covers "
             "the first cpu_offloading_num_layers layers).")


def _is_count(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


class OffloadedTensor:
    """A tensor parked on the host by `ActivationOffloader.offload`; `prefetch` brings it back."""

    __slots__ = (
        "_packed",  # _packed => the `_Packed` handle owning the host copy (None: not offloaded)
        "_tensor",  # _tensor => the tensor itself, kept when it was not offloaded (else None)
        "device",  # device => where `prefetch` brings it back by default
    )

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

    `min_offload_bytes` keeps smaller tensors on the device (their copies cost more in launch
    latency than they save); `prefetch_depth` is how many offloaded storages are brought back
    ahead of the one backward is using. Without CUDA everything runs and nothing changes;
    `offload_cpu_tensors=True` exists for tests, to run the real logic on CPU tensors.
    `copier.recompute_weight_casts = False` copies autocast's weight casts instead of recasting them.
    """

    def __init__(self, enabled=True, min_offload_bytes=10 * 2**20, prefetch_depth=2, pin_memory=True, *,
                 retain_pinned_buffers=False, offload_cpu_tensors=False):
        if not _is_count(min_offload_bytes):
            raise ValueError(f"min_offload_bytes must be an int >= 0 (bytes), got {min_offload_bytes!r}")
        if not _is_count(prefetch_depth):
            raise ValueError(f"prefetch_depth must be an int >= 0, got {prefetch_depth!r}")
        self.enabled = bool(enabled)  # enabled => False: every method passes tensors through
        self.min_offload_bytes = min_offload_bytes  # min_offload_bytes => smaller tensors stay put
        self.prefetch_depth = prefetch_depth  # prefetch_depth => storages fetched ahead in backward
        self.pin_memory = bool(pin_memory)  # pin_memory => host copies in pinned memory when possible
        # copier => the SavedTensorCopier doing the copies (its `recompute_weight_casts` is a switch)
        self.copier = SavedTensorCopier(min_offload_bytes, pin_memory, retain_pinned_buffers, offload_cpu_tensors)

    @property
    def active(self):
        return self.enabled and (torch.cuda.is_available() or self.copier.offload_cpu)

    def stats(self):
        copier = self.copier
        return {"bytes_offloaded_last_region": copier.bytes_this_pass,
                "tensors_offloaded_last_region": copier.tensors_this_pass,
                "pinned_bytes_held": copier.pool.pinned_bytes, "records_alive": len(copier.records_alive)}

    @contextmanager
    def offload_context(self):
        """Offload what autograd saves inside the block; backward may run inside or after it."""
        if layer_offload_installed():
            raise ConfigError([("cpu_offloading.model.cpu_offloading", _CONFLICT)])
        if not self.active:
            yield self
            return
        copier = self.copier
        sess = _Session(copier, prefetch_depth=self.prefetch_depth)
        try:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: copier.pack(t, sess, None), copier.unpack):
                yield self
        finally:
            sess.drain()

    def offload(self, tensor):
        """Start copying `tensor` to the host; the returned handle owns the host copy."""
        if not self.active or not self.copier.wants(tensor):
            return OffloadedTensor(tensor=tensor, device=tensor.device)
        sess = _Session(self.copier)
        rec = self.copier._copy_out(tensor.untyped_storage(), tensor.device, sess, 0)
        packed = _Packed(rec, sess, tensor)
        if tensor.is_cuda:  # the caller may free `tensor` now: its memory waits for the copy, not us
            tensor.record_stream(self.copier.stream(tensor.device, 0))
            sess.pending.clear()
        return OffloadedTensor(packed=packed, device=tensor.device)

    def prefetch(self, handle, device=None):
        """Copy the tensor back (asynchronously, ordered before later work on the current stream)."""
        device = torch.device(device) if device is not None else handle.device
        if handle._packed is None:
            return handle._tensor.to(device, non_blocking=True)
        rec = handle._packed.rec
        if rec.gpu is None:
            self.copier.fetch(rec)
        out = self.copier.unpack(handle._packed)
        return out if out.device == device else out.to(device)
