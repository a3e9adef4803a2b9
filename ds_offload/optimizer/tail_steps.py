"""The CPU share's round trip under DeepSpeed's ZeRO-1/2 optimizer: gradient D2H, CPU Adam, weights H2D.

Everything goes chunk by chunk (``CHUNK_NUMEL``), so the three stages pipeline (chunk k+1 crosses PCIe while
chunk k is stepped) and a forward that needs some weights waits only for the chunks they are in.

Two schedules, one code path (the streams come from ``make_streams``, the current stream when not overlapped):

* inline (``deferred=False``): ``step()`` runs the chunks and returns with every update landed;
* deferred (``overlap_cpu_optimizer_d2h_h2d``, one data-parallel rank): ``step()`` queues the gradient copies
  on a side stream and hands the chunks to a worker thread, so the CPU step overlaps the next forward. The
  forward of a module that owns a parameter of a chunk waits for that chunk (``wait_for``); every other read
  of the weights goes through ``land()`` first (the optimizer calls it from ``step``, its state dicts and
  the modules' ``state_dict`` and ``load_state_dict``; users call ``engine.ds_offload.wait()`` for any other read).

The arithmetic is the inline path's in both: the gradient is unscaled and clipped in fp32 on its device (the
same multiplication DeepSpeed applies to the GPU share), then stepped by the same CPU Adam runs.
"""
import concurrent.futures
import threading

import torch

from .cpu_adam import undo_adamw
from .layout import host_buffer
from .transfers import make_streams

CHUNK_NUMEL = 32 * 1024 * 1024  # 128 MiB of fp32 per transfer
HOST_SPAN_NUMEL = 4 * 1024 * 1024  # 16 MiB of fp32: a span the CPU scales, steps and casts while in its cache


class CpuTail:
    """The offloaded tail of one param group's flat fp32 weights (a ZeRO partition, an FP16_Optimizer group),
    in CPU memory."""

    def __init__(self, start, numel, pin_params, pin_grads, shared):
        self.start = start  # start => first offloaded element of the flat (P - c)
        self.master = host_buffer(numel, pin_params, shared)  # master => fp32 master weights of the tail
        self.grad = host_buffer(numel, pin_grads, shared)  # grad => the tail's fp32 gradient, unscaled and clipped
        self.exp_avg = host_buffer(numel, False, shared)  # exp_avg => Adam's first moment
        self.exp_avg_sq = host_buffer(numel, False, shared)  # exp_avg_sq => Adam's second moment
        self.step = 0  # step => Adam steps taken (overflow-skipped steps are not)

    @property
    def numel(self):
        return self.master.numel()


class Chunk:
    """Elements [a, b) of one tail, in flight during one step."""

    def __init__(self, a, b):
        self.a, self.b = a, b  # a, b => the chunk's range in its tail
        self.d2h_event = None  # d2h_event => CUDA event after its gradient reached the host (None on CPU)
        self.h2d_event = None  # h2d_event => CUDA event after its updated weights are in the model (None on CPU)
        self.landed = threading.Event()  # landed => set once its weights are written or queued (or the run failed)
        self.speculated = None  # speculated => hyper-parameters of a step taken during backward (speculate.py)
        self.spec_future = None  # spec_future => the worker's run of that step
        self.finite = None  # finite => 0-dim bool host tensors: each part of its gradient is finite (set with the copy)
        self.stepped = False  # stepped => the worker took the speculative step (not for a non-finite gradient)
        self.redo = False  # redo => step() found the speculative step wrong: take it back, step again


def chunk_spans(numel):
    return [(a, min(a + CHUNK_NUMEL, numel)) for a in range(0, numel, CHUNK_NUMEL)]


def chunk_keys_of_params(lp, tail, tail_id, params):
    """id(param) => [(tail id, chunk index)] of the chunks holding a part of it, for `params` that live in the
    flat low-precision tensor `lp` whose elements from `tail.start` on are `tail`'s."""
    spans = chunk_spans(tail.numel)
    where = {}
    for p in params:
        off = (p.data_ptr() - lp.data_ptr()) // p.element_size()
        lo, hi = max(off, tail.start) - tail.start, min(off + p.numel(), lp.numel()) - tail.start
        if lo < hi:
            where[id(p)] = [(tail_id, k) for k, (a, b) in enumerate(spans) if a < hi and lo < b]
    return where


def install_waits(module, steps, where):
    """Forward pre-hooks that make each submodule of `module` wait for the chunks its own parameters are in
    (`where` from `chunk_keys_of_params`), and (load_)state_dict pre-hooks that land everything; returns the
    handles."""
    handles = []
    for m in module.modules():
        keys = [k for p in m._parameters.values() if p is not None for k in where.get(id(p), ())]
        if keys:
            handles.append(m.register_forward_pre_hook(lambda _m, _a, keys=keys: steps.wait_for(keys)))
            handles += land_before_state_dicts(m, steps.land)
    return handles + land_before_state_dicts(module, steps.land)


def land_before_state_dicts(module, land):
    """Hooks that call `land` (a TailSteps' land) before `module.state_dict()` reads its weights and before
    `load_state_dict()` writes them: a load the worker did not wait for would be overwritten by the step in flight."""
    return [module.register_state_dict_pre_hook(lambda *_: land()),
            module.register_load_state_dict_pre_hook(lambda *_: land())]


class TailSteps:
    """Runs the tails' round trips; owns the streams and the worker thread of the deferred schedule."""

    def __init__(self, backend, deferred, on_cuda):
        self.backend = backend  # backend => the CpuAdamBackend the tails are registered with
        self.deferred = deferred  # deferred => step() returns before the CPU share's weights have landed
        self.on_cuda = on_cuda
        self.d2h, self.h2d = make_streams(overlap=deferred) if on_cuda else (None, None)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ds_offload_cpu_adam") \
            if deferred else None
        self._future = None  # _future => the worker's run of this step's chunks, until land() collected it
        self._chunks = []  # _chunks => this step's chunks, every tail's, until land()
        self.pending = {}  # pending => (tail id, chunk index) => Chunk whose weights no forward has waited for

    # -------------------------------------------------------------------------------------- D2H
    def send_grads(self, tail, grad, inverse_scale):
        """Queue `grad` (the tail's reduced gradient, any float dtype) to `tail.grad`, times `inverse_scale`,
        and return the chunks. On CUDA the copies follow everything queued on the compute stream so far."""
        spans = chunk_spans(tail.numel)
        chunks = [Chunk(a, b) for a, b in spans]
        if not grad.is_cuda:
            for c in chunks:
                tail.grad[c.a:c.b].copy_(grad[c.a:c.b])
                if inverse_scale != 1.0:
                    tail.grad[c.a:c.b].mul_(inverse_scale)
            return chunks
        self.d2h.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.d2h):
            # One fp32 staging buffer: its reuse by the next chunk is ordered after this chunk's copy by the stream.
            staging = torch.empty(spans[0][1], dtype=torch.float32, device=grad.device)
            for c in chunks:
                s = staging[:c.b - c.a]
                s.copy_(grad[c.a:c.b])
                if inverse_scale != 1.0:
                    s.mul_(inverse_scale)
                tail.grad[c.a:c.b].copy_(s, non_blocking=True)
                c.d2h_event = torch.cuda.Event()
                c.d2h_event.record()
        if self.d2h is not torch.cuda.current_stream():
            grad.record_stream(self.d2h)  # its memory is not reused before the copies have read it
        return chunks

    # ------------------------------------------------------------------------------- CPU + H2D
    def speculate(self, bucket_id, tail, c, before):
        """Queue chunk `c`'s CPU step with `c.speculated` on the gradient `tail.grad` is receiving, once its copy
        and the weight copy of `before` (the previous step's Chunk of the same range: it reads the master) are
        done. The worker runs jobs in order, so `before`'s event exists by then."""
        def run():
            if c.d2h_event is not None:
                c.d2h_event.synchronize()
            if before is not None and before.h2d_event is not None:
                before.h2d_event.synchronize()
            if c.finite is not None and not all(bool(f) for f in c.finite):
                return  # an overflow: step() skips the step or redoes it; no Adam state is touched
            self.backend.run(bucket_id, [(c.a, c.b, *c.speculated)])
            c.stepped = True
        if self._executor is None:
            raise RuntimeError("a speculative CPU step needs the deferred schedule's worker; this is a bug")
        return self._executor.submit(run)

    def start(self, jobs):
        """Step and send back every job's chunks: `(bucket id, bufs, lp, runs_of(a, b), chunks, scale)`; `bufs`
        has `.master` and `.grad` (a tail, an offloaded layer), `lp` is where the updated weights go, `scale`
        multiplies a gradient that is already on the host (1.0 when `send_grads` scaled it). A chunk stepped
        during backward (`speculated`, speculate.py) keeps that step unless `redo`: then it is taken back and
        stepped again with `scale`.

        Inline, returns when done; deferred, returns at once. The weight copies wait for the compute stream's
        work queued so far (the backward still reading the old weights)."""
        if not jobs:
            return
        if self.on_cuda:
            self.h2d.wait_stream(torch.cuda.current_stream())
        self._chunks = [c for job in jobs for c in job[4]]
        self.pending = {(job[0], k): c for job in jobs for k, c in enumerate(job[4])}
        if self._executor is None:
            self._run(jobs)
            self.land()
        else:
            self._future = self._executor.submit(self._run, jobs)

    def _run(self, jobs):
        try:
            staging = None
            for bucket_id, tail, lp_tail, runs_of, chunks, scale in jobs:
                for c in chunks:
                    if c.d2h_event is not None:
                        c.d2h_event.synchronize()
                    kept = False  # kept => the step taken during backward stands: only the weights go back
                    if c.speculated is not None:
                        c.spec_future.result()  # raises a failed speculative step
                        if c.redo and c.stepped:
                            undo_adamw((tail.master, tail.grad, tail.exp_avg, tail.exp_avg_sq), c.a, c.b,
                                       c.speculated, self.backend.use_torch)
                        kept = c.stepped and not c.redo
                    if not lp_tail.is_cuda:
                        self.step_on_host(bucket_id, tail, lp_tail, runs_of, c, scale, kept)
                        c.landed.set()
                        continue
                    if not kept:
                        if scale != 1.0:
                            tail.grad[c.a:c.b].mul_(scale)
                        self.backend.run(bucket_id, runs_of(c.a, c.b))
                    with torch.cuda.device(lp_tail.device), torch.cuda.stream(self.h2d):
                        if staging is None:
                            staging = torch.empty(CHUNK_NUMEL, dtype=torch.float32, device=lp_tail.device)
                        s = staging[:c.b - c.a]
                        s.copy_(tail.master[c.a:c.b], non_blocking=True)
                        lp_tail[c.a:c.b].copy_(s)  # cast on the device
                        c.h2d_event = torch.cuda.Event()
                        c.h2d_event.record()
                    c.landed.set()
        finally:
            for job in jobs:
                for c in job[4]:
                    c.landed.set()  # a failed run wakes its waiters; they find the error in the future

    def step_on_host(self, bucket_id, bufs, lp, runs_of, c, scale, kept=False, on_span=None, cast=True):
        """Scale, step and cast a chunk whose weights stay in CPU memory, in cache-sized spans: the three
        passes then read memory once instead of three times (the arithmetic is elementwise, so the same).
        `kept`: the chunk was stepped during backward; only the cast is left. `cast=False`: the caller casts
        later. `on_span(b)`: called once `lp[c.a:b]` holds the update (the master's [c.a:b] without the cast;
        spans go in order), so a reader can copy them while the rest is stepped."""
        no_cast = not cast or lp.data_ptr() == bufs.master.data_ptr() and lp.dtype == bufs.master.dtype  # fp32: lp is it
        for a in range(c.a, c.b, HOST_SPAN_NUMEL):
            b = min(a + HOST_SPAN_NUMEL, c.b)
            if not kept:
                if scale != 1.0:
                    bufs.grad[a:b].mul_(scale)
                self.backend.run(bucket_id, runs_of(a, b))
            if not no_cast:
                lp[a:b].copy_(bufs.master[a:b])
            if on_span is not None:
                on_span(b)

    # ------------------------------------------------------------------------------------ waits
    def wait_for(self, keys):
        """Order the current stream after the chunks `keys` (forward pre-hooks); host-blocks only until the
        worker has queued their weight copies."""
        for key in keys:
            c = self.pending.pop(key, None)
            if c is None:
                continue
            c.landed.wait()
            if self._future is not None and self._future.done() and self._future.exception() is not None:
                self.land()  # raises the worker's error
            if c.h2d_event is not None:
                torch.cuda.current_stream().wait_event(c.h2d_event)

    def land(self):
        """Every update of the last step landed (host and device) and nothing in flight; raises a failed run."""
        future, self._future = self._future, None
        chunks, self._chunks = self._chunks, []
        self.pending = {}
        if future is not None:
            future.result()
        if self.deferred:  # inline, the copies are on the current stream already, before anything later
            for c in chunks:
                if c.h2d_event is not None:
                    c.h2d_event.synchronize()

    def close(self):
        try:
            self.land()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
