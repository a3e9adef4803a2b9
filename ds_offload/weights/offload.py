"""Weight offloading of the first N transformer layers: between uses, their parameters hold no GPU memory.

Why this shape: nobody else has it in training (Transformer Engine removed it, DeepSpeed's `offload_param`
needs ZeRO-3), and under ZeRO-1/2 DeepSpeed flattens every parameter it optimizes into GPU buffers. So the
offloaded layers' trainable parameters are kept out of DeepSpeed's optimizer altogether, and this module owns
what DeepSpeed would have done for them: their data-parallel reduction, their share of the gradient norm
(clipping, fp16 overflow) and their Adam step, which `HybridZeroOptimizer` runs on the same CPU Adam backend
and through the same `TailSteps` as the offloaded share of its partitions.

Per offloaded layer, in CPU memory: the fp32 master, Adam's two moments, an fp32 gradient accumulator, and
the working copy in the model's dtype (the parameters' `.data` between uses, so `parameters()`,
`state_dict()` and checkpoints read the last update; for fp32 models it is the master itself).

A layer's working copy comes to the GPU on a side stream ahead of its forward (`prefetch_depth` layers
ahead) and again ahead of its backward (from the gradient hook of the layer after it); the forward saves
the weights for backward as references (saved-tensor hooks), so nothing of them stays on the GPU between
forward and backward. Each gradient leaves as soon as it is complete (a post-accumulate-grad hook): reduced
across ranks, cast to fp32 and squared-summed on the side stream, copied to the host and freed; over several
micro-steps a worker thread accumulates them on the host and takes the norm of the sum at the boundary.
With `overlap_cpu_optimizer_d2h_h2d`, each layer's CPU step starts as soon as its gradient is on the host,
during backward, and `step()` keeps or redoes it (speculate.py).
"""
import concurrent.futures
import functools

import torch
import torch.distributed as tdist

from ..activations.layer_hooks import _first_grad_tensor
from ..errors import ConfigError
from ..optimizer.layout import host_buffer
from ..optimizer.tail_steps import Chunk, chunk_spans, land_before_state_dicts
from ..optimizer.transfers import make_streams
from .layer import OffloadedLayer, SavedOuter, SavedWeight, clip_runs
from .speculate import LayerSpeculation, speculation_info


def _same_storage(t, flat):
    try:
        return t.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor without storage (a subclass, a fake tensor): not ours
        return False


class WeightOffload:
    """The first `num_layers` layers' weights in CPU memory between uses; built before DeepSpeed's engine."""

    def __init__(self, plan, next_layers, prefetch_depth=1):
        self.plan = plan  # plan => the WeightPlan of the offloaded layers
        self.layers = [OffloadedLayer(i, m, ps, gs) for i, (m, ps, gs) in enumerate(self.plan.layers)]
        self.next_layers = list(next_layers)  # next_layers => the layers after ours, whose backward prefetches ours
        self.prefetch_depth = prefetch_depth
        self.on_cuda = False
        self.tail_steps = None  # tail_steps => the optimizer's TailSteps, which steps our buckets too
        self.boundary = lambda: True  # boundary => whether this backward ends an accumulation window
        self.group = None  # group => the data-parallel process group the gradients are averaged over
        self._hooks = []
        self._stack = []  # _stack => saved_tensors_hooks contexts of the layers whose forward is running
        self._callback_queued = False
        self._executor = None
        self.speculation = None  # speculation => the LayerSpeculation stepping layers during backward, or None
        self.param_groups = None  # param_groups => the optimizer's param groups (hyper-parameters during backward)

    @property
    def numel(self):
        return sum(L.numel for L in self.layers)

    # ------------------------------------------------------------------------------------- set-up
    def allocate(self, shared, pin, group):
        """Move the layers' parameters to CPU memory (called by the optimizer, inside DeepSpeed's engine set-up,
        after the engine placed and cast the model); their GPU storage is released here."""
        self.group = group
        self.on_cuda = any(p.is_cuda for L in self.layers for p in L.params)
        pin = pin and self.on_cuda
        for L in self.layers:
            flat = torch.cat([p.detach().reshape(-1) for p in L.params]).cpu()
            L.master = host_buffer(L.numel, pin, shared)
            L.master.copy_(flat)
            if flat.dtype == torch.float32:
                L.working = L.master
            else:
                L.working = flat.pin_memory() if pin else flat
            L.grad = host_buffer(L.numel, pin, shared)
            L.exp_avg = host_buffer(L.numel, False, shared)
            L.exp_avg_sq = host_buffer(L.numel, False, shared)
            L.point_params_at(L.working)
        if self.on_cuda:
            self.d2h, self.h2d = make_streams()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ds_offload_weight_grads")

    def register(self, backend):
        for L in self.layers:
            L.bucket_id = backend.register((L.master, L.grad, L.exp_avg, L.exp_avg_sq))

    def speculate(self, param_groups, use_torch):
        """Step each layer during backward from now on (the optimizer calls this where the gradient its hooks
        deliver is what step() reads, unscaled: see speculate.py)."""
        self.param_groups = param_groups
        self.speculation = LayerSpeculation(self, use_torch)

    def install(self):
        """Hooks on the layers: fetch and release around forward, references for saved weights, gradients out."""
        for L in self.layers:
            self._hooks.append(L.module.register_forward_pre_hook(self._pre_forward(L)))
            self._hooks.append(L.module.register_forward_hook(self._post_forward(L), prepend=True, always_call=True))
            self._hooks += land_before_state_dicts(L.module, self.land)
            for i, p in enumerate(L.params):
                self._hooks.append(p.register_post_accumulate_grad_hook(lambda p, L=L, i=i: self._on_grad(L, p, i)))
        for j, module in enumerate(self.next_layers):
            self._hooks.append(module.register_forward_hook(self._after_next_layer(len(self.layers) + j)))

    # -------------------------------------------------------------------------------- transfers
    def _fetch(self, L, block=True):
        """Start bringing L's working copy to the device (after its last CPU update is written). `block=False`
        (a prefetch): not if that update is a step taken during backward still running; the use fetches it,
        span by span as the worker writes them (the copy ends a span after the step instead of a layer)."""
        if L.device_copy is not None:
            return
        spec = self.speculation
        running = spec.running(L) if spec is not None and self.on_cuda else None
        if running is not None and not block and not running.future.done():
            return
        if running is None and spec is not None:
            spec.finish(L)
        self.tail_steps.wait_for(L.update_keys)
        if not self.on_cuda:
            L.device_copy = L.working.clone()
            return
        compute = torch.cuda.current_stream()
        buf = torch.empty(L.numel, dtype=L.working.dtype, device=compute.device)
        self.h2d.wait_stream(compute)  # the block may have been freed by kernels still queued there
        with torch.cuda.stream(self.h2d):
            if running is not None:
                spec.copy_while_running(L, running, buf)
            else:
                buf.copy_(L.working, non_blocking=True)
            L.fetched = torch.cuda.Event()
            L.fetched.record()
        L.device_copy = buf

    def _use(self, L):
        self._fetch(L)
        if L.fetched is not None:
            torch.cuda.current_stream().wait_event(L.fetched)
        L.point_params_at(L.device_copy)

    def _release(self, L):
        L.point_params_at(L.working)
        L.device_copy = L.fetched = None

    def _prefetch(self, first, last):
        for j in range(max(first, 0), min(last, len(self.layers))):
            self._fetch(self.layers[j], block=False)

    # ------------------------------------------------------------------------------------ forward
    def _pre_forward(self, L):
        def hook(module, args):
            self._use(L)
            self._prefetch(L.index + 1, L.index + 1 + self.prefetch_depth)
            ctx = None
            if torch.is_grad_enabled():
                outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
                ctx = torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(L, t, outer), self._unpack)
                ctx.__enter__()
            self._stack.append(ctx)
        return hook

    def _post_forward(self, L):
        def hook(module, args, output):
            ctx = self._stack.pop() if self._stack else None
            if ctx is not None:
                ctx.__exit__(None, None, None)
            self._release(L)
            t = _first_grad_tensor(output) if torch.is_grad_enabled() else None
            if t is not None:
                t.register_hook(lambda g: self._before_backward(L.index))
        return hook

    def _after_next_layer(self, j):
        def hook(module, args, output):
            t = _first_grad_tensor(output) if torch.is_grad_enabled() else None
            if t is not None:
                t.register_hook(lambda g: self._before_backward(j))
        return hook

    def _pack(self, L, t, outer):
        dc = L.device_copy
        if dc is not None and t.device == dc.device and t.layout == torch.strided and _same_storage(t, dc):
            return SavedWeight(L, t)
        if outer is not None:
            return SavedOuter(outer[0](t), outer[1])
        return t.detach()   # not `t`: see SavedTensorCopier.pack (a graph dropped without backward must be freed)

    def _unpack(self, packed):
        if isinstance(packed, SavedWeight):
            L = packed.layer
            self._fetch(L)
            if L.fetched is not None:
                torch.cuda.current_stream().wait_event(L.fetched)
            return L.device_copy.as_strided(packed.size, packed.stride, packed.offset)
        if isinstance(packed, SavedOuter):
            return packed.unpack(packed.packed)
        return packed

    # ----------------------------------------------------------------------------------- backward
    def _before_backward(self, j):
        """Layer j's backward is about to start: it (if offloaded) must be resident, the next ones on their way."""
        self._queue_end_of_backward()
        if j < len(self.layers):
            self._use(self.layers[j])
        self._prefetch(j - self.prefetch_depth, j)

    def _queue_end_of_backward(self):
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _on_grad(self, L, p, i):
        """A parameter's gradient is complete: reduce it, send it to the host as fp32 and free it on the GPU.

        Per parameter rather than per layer, so at most one parameter's fp32 copy exists on the GPU at a time."""
        self._queue_end_of_backward()
        if id(p) in L.arrived or p.grad is None:
            return
        if not L.arrived:
            self._open_window(L)
        L.arrived.add(id(p))
        g, p.grad = p.grad, None
        if self.group is not None and tdist.get_world_size(self.group) > 1:
            tdist.all_reduce(g, group=self.group)
            g.div_(tdist.get_world_size(self.group))
        o, n = L.offsets[i], p.numel()
        dest = (L.staging if L.adding else L.grad)[o:o + n]
        if g.is_cuda:
            self.d2h.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.d2h):
                g32 = g.reshape(-1).float()
                if L.gpu_sq is not None:  # the window's only micro-step: its norm on the device, in fp32
                    L.gpu_sq += g32.square().sum()
                dest.copy_(g32, non_blocking=True)
            g.record_stream(self.d2h)
        else:
            g32 = g.reshape(-1).float()
            if L.gpu_sq is not None:
                L.gpu_sq += g32.square().sum()
            dest.copy_(g32)
        if len(L.arrived) == len(L.params):
            self._close_window(L)

    def _open_window(self, L):
        """The first gradient of L in this backward: where its gradients go and how its norm is taken."""
        L.adding = L.accumulated  # an earlier micro-step of this window is in `grad`: add to it
        if L.adding:
            if L.grad_future is not None:
                L.grad_future.result()  # the last add has read `staging`
            if L.staging is None:
                L.staging = host_buffer(L.numel, self.on_cuda, False)
        L.boundary = self.boundary()
        single = L.boundary and not L.adding
        dev = L.device_copy.device if L.device_copy is not None else L.working.device
        L.gpu_sq = torch.zeros((), dtype=torch.float32, device=dev) if single else None

    def _end_of_backward(self):
        """Layers some of whose params got no gradient this backward: theirs count as zero."""
        self._callback_queued = False
        for L in self.layers:
            if L.arrived:
                self._close_window(L)
            elif L.device_copy is not None:
                self._release(L)

    def _close_window(self, L):
        for p, o in zip(L.params, L.offsets):
            if id(p) not in L.arrived:
                (L.staging if L.adding else L.grad)[o:o + p.numel()].zero_()
        L.arrived.clear()
        event = finite = None
        spec = self.speculation is not None and L.gpu_sq is not None  # one micro-step: stepped as it lands
        if self.on_cuda:
            if spec:  # whether the gradient is finite, landing with it (a new tensor: the last may be in use)
                finite = torch.empty((), dtype=torch.bool, pin_memory=True)
                with torch.cuda.stream(self.d2h):
                    finite.copy_(torch.isfinite(L.gpu_sq), non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.d2h)  # FIFO stream: after every copy of this layer
        elif spec:
            finite = bool(torch.isfinite(L.gpu_sq))
        if spec:
            self.speculation.start(L, L.runs(self.param_groups), event, finite)
        L.accumulated = True
        if L.adding or L.boundary:
            L.grad_future = self._executor.submit(self._accumulate, L, event, L.adding, L.boundary and L.adding)
        elif event is not None:
            L.grad_future = None
            L.d2h_event = event
        self._release(L)

    @staticmethod
    def _accumulate(L, event, add, cpu_norm):
        if event is not None:
            event.synchronize()
        if add:
            L.grad.add_(L.staging)
        if cpu_norm:  # accumulated over micro-steps: the norm of the sum, on the host
            L.sq = float(torch.linalg.vector_norm(L.grad)) ** 2

    # --------------------------------------------------------------------------------------- step
    def finish_backward(self):
        """The squared norm of every offloaded gradient (as scaled by the loss scale), once all are on the host."""
        total, on_device = 0.0, []
        for L in self.layers:
            if L.grad_future is not None:
                L.grad_future.result()
                L.grad_future = None
            if L.d2h_event is not None:
                L.d2h_event.synchronize()
                L.d2h_event = None
            if not L.accumulated:
                L.grad.zero_()  # no gradient this window: Adam still steps it with zeros, as DeepSpeed does
            elif L.gpu_sq is not None:
                on_device.append(L.gpu_sq)
            else:
                total += L.sq
            L.gpu_sq = None
        if on_device:
            total += float(torch.stack(on_device).double().sum())  # one device sync for every layer
        return total

    def discard_grads(self):
        """An overflow-skipped step: the window's gradients go, nothing is stepped (nor stays stepped)."""
        if self.speculation is not None:
            self.speculation.cancel()
            self.speculation.end_step(clipped=True)
        for L in self.layers:
            L.accumulated = False

    def jobs(self, param_groups, inverse_scale):
        """TailSteps jobs stepping every layer (first layers first: the next forward needs them first); none for
        a layer whose step during backward stands."""
        out, spec = [], self.speculation
        for L in self.layers:
            runs = L.runs(param_groups)
            if spec is not None:
                if spec.validate(L, runs, inverse_scale):
                    L.update_keys = []  # its next fetch waits for the step still running, not for TailSteps
                    L.step += 1
                    L.accumulated = False
                    continue
                spec.finish(L)  # the last step's, if no fetch waited for it (a layer the forward skipped)
            runs_of = functools.partial(clip_runs, runs)
            chunks = [Chunk(a, b) for a, b in chunk_spans(L.numel)]
            L.update_keys = [(L.bucket_id, k) for k in range(len(chunks))]
            L.step += 1
            L.accumulated = False
            out.append((L.bucket_id, L, L.working, runs_of, chunks, inverse_scale))
        if spec is not None:
            spec.end_step(clipped=inverse_scale != 1.0)
        return out

    def land(self):
        """Every update of the layers in their working copies, nothing in flight (reads, loads, the user's wait)."""
        if self.speculation is not None:
            self.speculation.settle()
        self.tail_steps.land()

    def refresh_masters(self):
        """The masters from the working copies (after a module-only checkpoint load wrote them)."""
        self.land()
        for L in self.layers:
            if L.master is not L.working:
                L.master.copy_(L.working)

    # -------------------------------------------------------------------------------- checkpoints
    def state_dict(self):
        self.land()
        return {"numel": [L.numel for L in self.layers], "layers": [L.state() for L in self.layers]}

    def load_state_dict(self, sd):
        self.land()
        if sd["numel"] != [L.numel for L in self.layers]:
            raise ConfigError([("cpu_offloading.model.cpu_offloading_num_layers",
                                f"the checkpoint's offloaded layers hold {sd['numel']} elements, this run's "
                                f"{[L.numel for L in self.layers]}. Fix: resume with the same "
                                "cpu_offloading_num_layers, or load with load_optimizer_states=False.")])
        for L, s in zip(self.layers, sd["layers"]):
            L.load_state(s)

    # ---------------------------------------------------------------------------------- reporting
    def summary(self):
        n = self.numel
        dtype = self.layers[0].working.dtype if self.layers and self.layers[0].working is not None else None
        per = (dtype.itemsize if dtype is not None else 2) * 2 + 12  # weight + gradient + master + moments
        return (f"weights of the first {len(self.layers)} layers ({n / 1e6:.2f}M parameters, "
                f"{per * n / 2**30:.2f} GiB of weights, gradients, fp32 masters and moments) moved off the GPU"
                + (", each layer's CPU step started during backward as its gradient arrives (kept where step() "
                   "finds nothing clipped, taken back otherwise)" if self.speculation is not None else ""))

    def speculation_info(self):
        return speculation_info(self.speculation)

    def close(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if self.speculation is not None:
            self.speculation.close()
            self.speculation = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
