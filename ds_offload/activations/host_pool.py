"""Host byte buffers for the copies out: pinned when possible, reused across steps on request.

Pinned buffers make the copies asynchronous; when pinning fails (out of pinnable memory, or no
pinned allocator) the pool says so once and falls back to pageable memory.
"""
import warnings
from collections import defaultdict

import torch


class _HostPool:
    """Host byte buffers; pinned when possible, reused across steps when `retain` is set."""

    def __init__(self, pin, retain):
        self.pin = pin  # pin => pin new buffers (turned off for good after the first failure)
        self.retain = retain  # retain => keep released buffers for reuse instead of freeing them
        self.free = defaultdict(list)  # nbytes => [(buffer, event of its last copy)]
        self.pinned_bytes = 0  # pinned_bytes => pinned host bytes this pool holds (in use or free)

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
