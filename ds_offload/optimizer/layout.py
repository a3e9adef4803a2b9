"""Where each element of HybridDeviceOptimizer's parameters is stepped, and how its state is stored.

The split walks the parameters backwards (last param group, last parameter first) and sends whole
tensors to the CPU until the budget ``round(f * N)`` would be exceeded; the boundary tensor is split at
an element offset so the CPU share is exact. Backwards because backward produces the last layers'
gradients first (their copies start earliest) and the next forward needs their weights last (their
updates land latest). Splitting inside a tensor is what makes ZeRO-1/2 work: there each param group is
one flat partition, and whole-tensor splitting would offload all or nothing.

Offloaded pieces are packed into flat CPU buckets (fp32 master, gradient, two moments) in the order the
gradients arrive, so one transfer moves many small tensors; a bucket closes once it holds
``bucket_numel`` elements. State dicts describe whole parameters (see state.py).

Building a layout takes these steps, each a function below: ``plan_layout`` (the split, the buckets and
the lookup tables, no memory yet), ``pick_worker_mode`` (where the CPU step runs),
``fit_worker_mode_to_shared_memory`` (the /dev/shm probe; those two live in cpu_adam), then
``allocate_layout`` (host buffers and device state, registered with the CPU Adam backend).
"""
import weakref

import torch

BUCKET_NUMEL = 4 * 1024 * 1024  # 16 MiB of fp32 per bucket: far past the ~1 MiB launch-bound size
_GPU_CHUNK_NUMEL = 64 * 1024 * 1024  # bounds the fp32 gradient temporaries of low-precision params


class Piece:
    """Elements [start, end) of ``param.view(-1)``, stepped on the CPU (in a bucket) or the param's device."""

    __slots__ = ("gi", "index", "param", "start", "end", "on_cpu", "bucket", "offset", "master", "exp_avg",
                 "exp_avg_sq", "step", "step_t")

    def __init__(self, gi, index, param, start, end, on_cpu):
        self.gi = gi  # gi => index of the param group the parameter belongs to
        self.index = index  # index => the parameter's position over all groups (its key in state dicts)
        self.param = param  # param => the parameter this piece is a flat slice of
        self.start = start  # start => first element of the slice in param.view(-1)
        self.end = end  # end => one past the last element of the slice
        self.on_cpu = on_cpu  # on_cpu => stepped on the CPU (in a bucket) rather than on the param's device
        self.bucket = None  # bucket => the Bucket holding this CPU piece's buffers; None for device pieces
        self.offset = None  # offset => where the piece starts inside its bucket's flat buffers (CPU pieces)
        self.master = None  # master => fp32 master elements (a bucket view, the param itself, or an fp32 copy)
        self.exp_avg = None  # exp_avg => Adam's first moment, same place and length as master
        self.exp_avg_sq = None  # exp_avg_sq => Adam's second moment, same place and length as master
        self.step = 0  # step => steps taken by a CPU piece, counted on the host
        self.step_t = None  # step_t => steps taken by a device piece: a 0-d fp32 tensor the fused kernel reads

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
        self.id = bid  # id => position in Layout.buckets, also the bucket's id in the CPU Adam backend
        self.pieces = pieces  # pieces => the CPU pieces packed here, in gradient-arrival order
        self.numel = sum(p.numel for p in pieces)  # numel => elements in each of the four flat buffers
        self.master = None  # master => flat fp32 masters on the host (pinned or shared per the options)
        self.grad = None  # grad => flat fp32 host copy of the pieces' gradients, filled by the D2H copy
        self.exp_avg = None  # exp_avg => flat first moments on the host
        self.exp_avg_sq = None  # exp_avg_sq => flat second moments on the host
        self.d2h_event = None  # d2h_event => CUDA event recorded once the gradient copy is issued; None on host
        self.h2d_event = None  # h2d_event => CUDA event recorded once updated masters are back in the params
        self.copied = None  # copied => per piece: (weakref to the grad copied, its version) when the copy was issued
        self.seen = set()  # seen => ids of params whose gradient arrived since the last copy (backward hooks)
        self.num_params = len({id(p.param) for p in pieces})  # num_params => distinct params among the pieces
        self.future = None  # future => the worker thread's Future of this bucket's CPU step while in flight
        self.early = False  # early => stepped from the backward hook (step_in_backward), not yet by step()

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


class Layout:
    """The split of one set of param groups: pieces, buckets and the tables that find them."""

    def __init__(self, key):
        self.key = key  # key => ids of the params (all groups, in order) the layout was built for
        self.pieces = []  # pieces => every Piece, in split order (last parameter first)
        self.buckets = []  # buckets => the CPU buckets, in gradient-arrival order
        self.device_pieces = []  # device_pieces => pieces stepped on the params' device
        self.pieces_by_index = {}  # pieces_by_index => param index -> its pieces (one, or two when split)
        self.params_by_index = {}  # params_by_index => param index -> the parameter
        self.param_buckets = {}  # param_buckets => id(param) -> the buckets holding its CPU pieces
        self.total = 0  # total => trainable elements over all groups
        self.cpu_numel = 0  # cpu_numel => elements stepped on the CPU: round(fraction * total)
        self.owns_model_params = False  # owns_model_params => every piece is of a param the optimizer was built with
        self.on_cuda = False  # on_cuda => some offloaded piece's param lives on a CUDA device (copies go over streams)
        self.versions = {}  # versions => id(param) -> its _version when masters last matched it


def plan_layout(key, param_groups, fraction, bucket_numel, model_param_ids):
    """The split, the buckets and the lookup tables; allocates nothing."""
    lay = Layout(key)
    lay.pieces, lay.total = plan_split(param_groups, fraction)
    cpu_pieces = [pc for pc in lay.pieces if pc.on_cpu]
    lay.device_pieces = [pc for pc in lay.pieces if not pc.on_cpu]
    lay.cpu_numel = sum(pc.numel for pc in cpu_pieces)
    lay.owns_model_params = all(id(pc.param) in model_param_ids for pc in lay.pieces)
    lay.on_cuda = any(pc.param.is_cuda for pc in cpu_pieces)
    lay.buckets = make_buckets(cpu_pieces, bucket_numel)
    for b in lay.buckets:
        for pc in b.pieces:
            lay.param_buckets.setdefault(id(pc.param), []).append(b)
    for pc in lay.pieces:
        lay.pieces_by_index.setdefault(pc.index, []).append(pc)
        lay.params_by_index[pc.index] = pc.param
    return lay


def allocate_layout(lay, backend, pin_params, pin_grads, shared):
    """Host buffers of every bucket (registered with ``backend``) and the state of every device piece."""
    for b in lay.buckets:
        allocate_bucket(b, pin_params, pin_grads, shared)
        backend.register(b.buffers())
    for pc in lay.device_pieces:
        allocate_device_piece(pc)


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


def host_buffer(numel, pin, shared):
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
    bucket.master = host_buffer(bucket.numel, pin_params, shared)
    bucket.grad = host_buffer(bucket.numel, pin_grads, shared)
    bucket.exp_avg = host_buffer(bucket.numel, False, shared)
    bucket.exp_avg_sq = host_buffer(bucket.numel, False, shared)
    off = 0
    for pc in bucket.pieces:
        pc.bucket, pc.offset = bucket, off
        pc.master = bucket.master[off:off + pc.numel]
        pc.exp_avg = bucket.exp_avg[off:off + pc.numel]
        pc.exp_avg_sq = bucket.exp_avg_sq[off:off + pc.numel]
        pc.master.copy_(pc.param_view())
        off += pc.numel


def allocate_device_piece(pc):
    view = pc.param_view()
    # fp32 params are their own master; lower precision ones get an fp32 copy that only this optimizer sees.
    pc.master = view if view.dtype == torch.float32 else view.float()
    pc.exp_avg = torch.zeros_like(pc.master)
    pc.exp_avg_sq = torch.zeros_like(pc.master)
    pc.step_t = torch.zeros((), dtype=torch.float32, device=view.device)


def unregister_host_buffers(buckets):
    """Undo `host_buffer`'s cudaHostRegister of the buckets' (anything with `.master`, `.grad`) shared buffers."""
    if not torch.cuda.is_available():
        return
    for b in buckets:
        for t in (b.master, b.grad):
            if t is not None and t.is_shared() and t.is_pinned():  # page-locked in place by host_buffer
                torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


def bucket_runs(b, param_groups):
    """Contiguous ranges of bucket ``b`` sharing a group and a step count (see cpu_adam), pieces
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
