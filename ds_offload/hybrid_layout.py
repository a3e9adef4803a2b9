"""Where each element of HybridDeviceOptimizer's parameters is stepped, and how its state is stored.

The split walks the parameters backwards (last param group, last parameter first) and sends whole
tensors to the CPU until the budget ``round(f * N)`` would be exceeded; the boundary tensor is split at
an element offset so the CPU share is exact. Backwards because backward produces the last layers'
gradients first (their copies start earliest) and the next forward needs their weights last (their
updates land latest). Splitting inside a tensor is what makes ZeRO-1/2 work: there each param group is
one flat partition, and whole-tensor splitting would offload all or nothing.

Offloaded pieces are packed into flat CPU buckets (fp32 master, gradient, two moments) in the order the
gradients arrive, so one transfer moves many small tensors; a bucket closes once it holds
``bucket_numel`` elements. State dicts always describe whole parameters, in torch.optim.AdamW's format,
so they load under any fraction, into plain AdamW, and with ``torch.load(weights_only=True)``.
"""
import os
import threading
import weakref

import torch

BUCKET_NUMEL = 4 * 1024 * 1024  # 16 MiB of fp32 per bucket: far past the ~1 MiB launch-bound size
_GPU_CHUNK_NUMEL = 64 * 1024 * 1024  # bounds the fp32 gradient temporaries of low-precision params


class Piece:
    """Elements [start, end) of ``param.view(-1)``, stepped on the CPU (in a bucket) or the param's device."""

    __slots__ = ("gi", "index", "param", "start", "end", "on_cpu", "bucket", "offset", "master", "exp_avg",
                 "exp_avg_sq", "step", "step_t")

    def __init__(self, gi, index, param, start, end, on_cpu):
        self.gi, self.index, self.param, self.start, self.end, self.on_cpu = gi, index, param, start, end, on_cpu
        self.bucket = self.offset = self.master = self.exp_avg = self.exp_avg_sq = self.step_t = None
        self.step = 0  # CPU pieces count steps on the host; device pieces in ``step_t`` (fused kernels bump it)

    @property
    def numel(self):
        return self.end - self.start

    def param_view(self):
        return self.param.detach().view(-1)[self.start:self.end]

    def grad_view(self):
        g = self.param.grad
        return None if g is None else g.view(-1)[self.start:self.end]

    def steps_taken(self):
        return self.step if self.on_cpu else int(self.step_t.item())

    def set_steps(self, n):
        if self.on_cpu:
            self.step = int(n)
        else:
            self.step_t.fill_(float(n))


class Bucket:
    """Flat CPU buffers for a run of offloaded pieces, plus the events that order their transfers."""

    def __init__(self, bid, pieces):
        self.id, self.pieces = bid, pieces
        self.numel = sum(p.numel for p in pieces)
        self.master = self.grad = self.exp_avg = self.exp_avg_sq = None
        self.d2h_event = self.h2d_event = None
        self.copied = None  # per piece: (weakref to the grad copied, its version) when the copy was issued
        self.seen = set()  # params whose gradient arrived since the last copy (backward hooks)
        self.num_params = len({id(p.param) for p in pieces})
        self.future = None
        self.early = False  # stepped from the backward hook (step_in_backward)

    def buffers(self):
        return self.master, self.grad, self.exp_avg, self.exp_avg_sq

    def copy_is_current(self):
        if self.copied is None:
            return False
        for piece, rec in zip(self.pieces, self.copied):
            g = piece.param.grad
            if rec is None:
                if g is not None:
                    return False
            elif g is None or rec[0]() is not g or rec[1] != g._version:
                return False
        return True

    def mark_copied(self):
        self.copied = [None if pc.param.grad is None else (weakref.ref(pc.param.grad), pc.param.grad._version)
                       for pc in self.pieces]


def plan_split(groups, fraction):
    """Pieces of every trainable parameter; exactly ``round(fraction * N)`` elements are marked on_cpu."""
    flat = []
    index = 0
    for gi, group in enumerate(groups):
        for p in group["params"]:
            if p.requires_grad:
                flat.append((gi, index, p))
            index += 1
    total = sum(p.numel() for _, _, p in flat)
    budget = int(round(fraction * total))
    pieces = []
    for gi, idx, p in reversed(flat):
        n = p.numel()
        if not p.is_contiguous():
            raise ValueError("HybridDeviceOptimizer needs contiguous parameters (it steps flat views of them)")
        if budget >= n:
            pieces.append(Piece(gi, idx, p, 0, n, True))
            budget -= n
        elif budget > 0:
            pieces.append(Piece(gi, idx, p, n - budget, n, True))
            pieces.append(Piece(gi, idx, p, 0, n - budget, False))
            budget = 0
        else:
            pieces.append(Piece(gi, idx, p, 0, n, False))
    return [pc for pc in pieces if pc.numel > 0], total


def make_buckets(cpu_pieces, bucket_numel=BUCKET_NUMEL):
    buckets, cur, size = [], [], 0
    for pc in cpu_pieces:
        cur.append(pc)
        size += pc.numel
        if size >= bucket_numel:
            buckets.append(Bucket(len(buckets), cur))
            cur, size = [], 0
    if cur:
        buckets.append(Bucket(len(buckets), cur))
    return buckets


def shared_memory_fits(nbytes, path="/dev/shm"):
    """Whether ``nbytes`` of shared tensors fit: past the mount's size, touching them is a SIGBUS, not an error."""
    try:
        st = os.statvfs(path)
    except OSError:
        return True  # no /dev/shm mount to run out of (torch then uses other shared memory)
    return st.f_bavail * st.f_frsize >= nbytes + (256 << 20)


def _host_buffer(numel, pin, shared):
    t = torch.zeros(numel, dtype=torch.float32)
    if shared:
        t.share_memory_()
        if pin and torch.cuda.is_available():
            # Shared memory cannot come from the pinned allocator; page-lock it in place instead.
            rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
            if int(rc) != 0:
                raise RuntimeError(f"cudaHostRegister failed ({rc}) for a {numel * 4 >> 20} MiB CPU buffer")
    elif pin and torch.cuda.is_available():
        t = t.pin_memory()
    return t


def allocate_bucket(bucket, pin_params, pin_grads, shared):
    bucket.master = _host_buffer(bucket.numel, pin_params, shared)
    bucket.grad = _host_buffer(bucket.numel, pin_grads, shared)
    bucket.exp_avg = _host_buffer(bucket.numel, False, shared)
    bucket.exp_avg_sq = _host_buffer(bucket.numel, False, shared)
    off = 0
    for pc in bucket.pieces:
        pc.bucket, pc.offset = bucket, off
        pc.master = bucket.master[off:off + pc.numel]
        pc.exp_avg = bucket.exp_avg[off:off + pc.numel]
        pc.exp_avg_sq = bucket.exp_avg_sq[off:off + pc.numel]
        pc.master.copy_(pc.param_view())
        off += pc.numel
    bucket.done = threading.Event()
    bucket.done.set()


def allocate_device_piece(pc):
    view = pc.param_view()
    # fp32 params are their own master; lower precision ones get an fp32 copy that only this optimizer sees.
    pc.master = view if view.dtype == torch.float32 else view.float()
    pc.exp_avg = torch.zeros_like(pc.master)
    pc.exp_avg_sq = torch.zeros_like(pc.master)
    pc.step_t = torch.zeros((), dtype=torch.float32, device=view.device)


def unregister_host_buffers(buckets):
    for b in buckets:
        for t in (b.master, b.grad):
            if t is not None and t.is_shared() and torch.cuda.is_available():
                torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


def gather_state(pieces_by_index, params_by_index):
    """Whole-parameter AdamW state (CPU tensors) from the pieces; the master only where it is not the param."""
    state = {}
    for idx, pieces in pieces_by_index.items():
        p = params_by_index[idx]
        m = torch.zeros(p.numel(), dtype=torch.float32)
        v = torch.zeros_like(m)
        master = torch.empty_like(m) if p.dtype != torch.float32 else None
        for pc in pieces:
            m[pc.start:pc.end].copy_(pc.exp_avg)
            v[pc.start:pc.end].copy_(pc.exp_avg_sq)
            if master is not None:
                master[pc.start:pc.end].copy_(pc.master)
        entry = {"step": torch.tensor(float(pieces[0].steps_taken())), "exp_avg": m.view(p.shape),
                 "exp_avg_sq": v.view(p.shape)}
        if master is not None:
            entry["master"] = master.view(p.shape)
        state[idx] = entry
    return state


def scatter_state(pieces_by_index, state):
    """Load whole-parameter AdamW state into the pieces; parameters absent from ``state`` start fresh."""
    for idx, pieces in pieces_by_index.items():
        entry = state.get(idx)
        for pc in pieces:
            if entry is None:
                pc.exp_avg.zero_()
                pc.exp_avg_sq.zero_()
                pc.set_steps(0)
                continue
            pc.exp_avg.copy_(entry["exp_avg"].reshape(-1)[pc.start:pc.end])
            pc.exp_avg_sq.copy_(entry["exp_avg_sq"].reshape(-1)[pc.start:pc.end])
            pc.set_steps(float(entry["step"]))
            if pc.param.dtype != torch.float32:  # fp32 params are their own master
                master = entry.get("master")
                pc.master.copy_(pc.param_view() if master is None else master.reshape(-1)[pc.start:pc.end])


def bucket_runs(b, param_groups):
    """Contiguous ranges of bucket ``b`` sharing a group and a step count (see cpu_adam_worker), pieces
    without a gradient left out as torch does; counts their step."""
    runs = []
    for pc in b.pieces:
        if pc.param.grad is None:
            continue
        g = param_groups[pc.gi]
        beta1, beta2 = g["betas"]
        key = (pc.step, float(g["lr"]), float(beta1), float(beta2), float(g["eps"]), float(g["weight_decay"]))
        if runs and runs[-1][1] == pc.offset and runs[-1][2:] == key:
            runs[-1][1] = pc.offset + pc.numel
        else:
            runs.append([pc.offset, pc.offset + pc.numel, *key])
        pc.step += 1
    return [tuple(r) for r in runs]


def device_adam_step(pieces, param_groups, adamw_mode):
    """The non-offloaded share: torch's fused Adam(W) on the params' device, in chunks so that the fp32
    gradient copies of low-precision params stay small, then masters rounded back into the params."""
    fn = torch._fused_adamw_ if adamw_mode else torch._fused_adam_
    chunks = {}
    for pc in pieces:
        if pc.param.grad is not None:
            chunks.setdefault((pc.gi, pc.param.device), []).append(pc)
    for (gi, _), pcs in chunks.items():
        g = param_groups[gi]
        beta1, beta2 = g["betas"]
        start = 0
        while start < len(pcs):
            end, size = start, 0
            while end < len(pcs) and (end == start or size + pcs[end].numel <= _GPU_CHUNK_NUMEL):
                size += pcs[end].numel
                end += 1
            part = pcs[start:end]
            grads = [pc.grad_view().float() for pc in part]
            steps = [pc.step_t for pc in part]
            torch._foreach_add_(steps, 1)  # fused kernels read the step; torch's wrappers bump it first
            fn([pc.master for pc in part], grads, [pc.exp_avg for pc in part], [pc.exp_avg_sq for pc in part],
               [], steps, lr=float(g["lr"]), beta1=float(beta1), beta2=float(beta2),
               weight_decay=float(g["weight_decay"]), eps=float(g["eps"]), amsgrad=False, maximize=False)
            low = [pc for pc in part if pc.param.dtype != torch.float32]
            if low:
                torch._foreach_copy_([pc.param_view() for pc in low], [pc.master for pc in low])
            start = end
