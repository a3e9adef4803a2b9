"""The offloaded layers' CPU steps taken during backward, before the gradient norm is known.

Why: the first layers are the first the next forward needs, so their CPU step has nothing to hide behind after
backward: run there (the step after backward) it is paid in full, between `step()` and the next forward. Their
gradients, though, leave the GPU during backward, layer by layer, the deepest offloaded layer first. Each layer
is therefore stepped (scale 1) as soon as its gradient is on the host, while backward goes on; `step()` then
validates: where the scale DeepSpeed multiplies gradients by is 1 (nothing clipped, loss scale 1) and the
hyper-parameters are the ones stepped with, the step stands and `step()` returns without waiting for it (the
layer's next fetch does). Otherwise the step is taken back (`cpu_adam.undo_adamw`, exact to a few fp32 ulps) and
the layer takes the step after backward with the real scale. A layer whose gradient is not finite is never
stepped.

The worker takes the newest step whose gradient has landed (ReadyFirstWorker): during backward that is each
layer as it lands; at the end of backward, of those still waiting, the shallowest, which the next forward
needs first. On a GPU the CPU steps take about as long as a whole step and backward produces these layers'
gradients last, so the shallowest layers' steps still run when the next forward needs them. Two things shorten
that wait: the fetch copies each span as soon as it is stepped (`copy_while_running`), and the step leaves its
bf16 cast of the working copy for later (`Spec.cast_once`, run when the worker has no step to take, or by the
first reader): until then the fetch sends the fp32 master and casts on the device, with the same rounding.

As for the optimizer's share (optimizer/speculate.py), a step that clipped disarms the next backward's
speculation and one that did not arms it, and the first steps time both schedules and keep the faster (its
CPU threads compete with the ones launching backward's kernels; where backward is short, that can cost more
than it hides). The gradient a layer's hooks deliver is the reduced one the step
reads (weights/offload.py reduces it there), so this applies with any number of ranks; not with gradient
accumulation (a window of several micro-steps), loss scaling or L2 weight decay (the optimizers check).
"""
import concurrent.futures
import functools
import logging
import threading
import time

import torch
import torch.distributed as tdist

from ..optimizer.cpu_adam import undo_adamw
from ..optimizer.speculate import Trial
from ..optimizer import tail_steps
from ..optimizer.tail_steps import Chunk
from .layer import clip_runs

logger = logging.getLogger("ds_offload")


class ReadyFirstWorker:
    """One thread running submitted calls: the most recent urgent one whose input is ready, else the most recent
    ready non-urgent one (the deferred casts, which fill the time spent waiting for gradients; the newest is the
    shallowest layer's, which the next forward needs first), else the oldest urgent one.

    Why not plain last-in-first-out: the host runs ahead of the GPU, so by the time the worker is free every
    offloaded layer's step may be queued while only the deepest layers' gradients have landed; the newest (the
    shallowest layer) would then wait for the end of backward while the ready ones wait behind it. The D2H
    stream is FIFO, so the ready calls are the oldest ones: the newest of them runs first, and with none ready
    the oldest, which is the next to be."""

    def __init__(self, name):
        self._items = []  # _items => [(future, fn, ready, urgent)] in submission order; ready: a callable or None
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn, ready=None, urgent=True):
        future = concurrent.futures.Future()
        with self._cond:
            self._items.append((future, fn, ready, urgent))
            self._cond.notify()
        return future

    def _next(self):
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if not self._items:
                return None
            items = self._items
            ready = [i for i, it in enumerate(items) if it[2] is None or it[2]()]
            urgent = [i for i in ready if items[i][3]]
            pick = (urgent[-1] if urgent else ready[-1] if ready else
                    next((i for i, it in enumerate(items) if it[3]), 0))
            return items.pop(pick)

    def _loop(self):
        while True:
            item = self._next()
            if item is None:
                return
            future, fn = item[:2]
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # handed to whoever waits on the future
                    future.set_exception(e)

    def close(self):
        """Run what is queued, then stop."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()


class Spec:
    """One layer's CPU step taken during backward."""

    def __init__(self, runs):
        self.runs = runs  # runs => [(a, b, step_before, lr, beta1, beta2, eps, wd)] it was stepped with
        self.future = None  # future => the worker's run; its result: whether it stepped (False: not finite)
        self.written = 0  # written => elements [0, written) hold the step (the working copy's; if deferred, the master's)
        self.deferred = False  # deferred => the run leaves the bf16 cast of the working copy to cast_once
        self.cast_done = threading.Event()  # cast_done => the working copy holds the step (or nothing to cast)
        self._cond = threading.Condition()
        self._cast_lock = threading.Lock()

    def cast_once(self, L):
        """Cast L's master into its working copy, once, in whichever thread asks first (the worker when it is
        idle; a read, a fetch for backward, a take-back or L's next step otherwise); the others wait for it."""
        if self.cast_done.is_set():
            return 0.0
        if not self.future.done():  # every caller waited for the run (the worker ran it before): a bug otherwise
            raise RuntimeError(f"layer {L.index}'s working copy cast before its CPU step ended; this is a bug")
        with self._cast_lock:
            t0 = time.perf_counter()
            if not self.cast_done.is_set():
                if self.deferred and self.future.exception() is None and self.future.result():
                    L.working.copy_(L.master)
                self.cast_done.set()
            return time.perf_counter() - t0

    def advance(self, b):
        """The worker wrote the step into elements [0, b)."""
        with self._cond:
            self.written = b
            self._cond.notify_all()

    def ended(self, _future=None):
        with self._cond:
            self._cond.notify_all()

    def wait_written(self, a):
        """Until more than the first `a` elements are written, or the run ended; returns how many are."""
        with self._cond:
            while self.written <= a and not self.future.done():
                self._cond.wait()
            return self.written


class LayerSpeculation:
    """Starts each offloaded layer's CPU step when its gradient is on the host; keeps or takes it back at step()."""

    trial_steps = 3  # steps timed with it and without before keeping the faster (optimizer/speculate.py's Trial)

    def __init__(self, weights, use_torch):
        self.weights = weights  # weights => the WeightOffload whose layers are stepped
        self.use_torch = use_torch  # use_torch => the backend is torch's fused AdamW (the undo's constants)
        self.worker = ReadyFirstWorker("ds_offload_weight_steps")
        self.armed = True  # armed => this backward's layers are stepped as their gradients arrive
        self.void = False  # void => this backward's steps were taken back (a read between backward and step())
        self.inflight = {}  # inflight => layer index => Spec started this backward, not yet validated
        self.kept = {}  # kept => layer index => Spec that step() kept, whose weights the layer's next fetch waits for
        self.last = {}  # last => layer index => the last kept Spec, whose deferred cast a read may still need
        self.speculated = 0  # speculated => steps in which every layer's step stood
        self.rollbacks = 0  # rollbacks => steps in which some layer's step was taken back
        self._took_back = False  # _took_back => a step of this backward was taken back
        self.trial = Trial(self.trial_steps)  # trial => whether stepping during backward pays here, measured
        self.cpu_s = 0.0  # cpu_s => the worker's time stepping layers, summed (from gradient landed to cast done)
        self.wait_s = 0.0  # wait_s => host time the fetches and step() spent waiting for kept steps, summed
        self.events = None  # events => a list to append (what, layer index, perf_counter) to, or None (probes set it)

    # ------------------------------------------------------------------------------- backward
    def start(self, L, runs, event, finite):
        """L's gradient is on its way to the host (`event`: after its copies; `finite`: a 0-dim host bool landing
        with them, or a bool); step it with `runs` once it is there."""
        if not self.armed or self.void:
            return
        w, spec, before = self.weights, Spec(runs), self.last.get(L.index)
        spec.deferred = w.on_cuda and L.working is not L.master and L.master.is_pinned()

        def run():
            if event is not None:
                event.synchronize()
            if before is not None:
                self.cpu_s += before.cast_once(L)  # the last step's cast, if still queued: before the master moves
            if not bool(finite):
                return False  # an overflow or a NaN: step() skips or redoes; no Adam state is touched
            t0 = time.perf_counter()
            w.tail_steps.step_on_host(L.bucket_id, L, L.working, functools.partial(clip_runs, runs),
                                      Chunk(0, L.numel), 1.0, cast=not spec.deferred, on_span=spec.advance)
            t1 = time.perf_counter()
            self.cpu_s += t1 - t0
            if self.events is not None:
                self.events += [("landed", L.index, t0), ("stepped", L.index, t1)]
            return True

        def cast():
            self.cpu_s += spec.cast_once(L)
        if self.events is not None:
            self.events.append(("queued", L.index, time.perf_counter()))
        spec.future = self.worker.submit(run, event.query if event is not None else None)
        spec.future.add_done_callback(spec.ended)
        if spec.deferred:
            self.worker.submit(cast, spec.future.done, urgent=False)
        else:
            spec.cast_done.set()
        self.inflight[L.index] = spec

    # ----------------------------------------------------------------------------------- step
    def validate(self, L, runs, inverse_scale):
        """At step(), before L's own job: True when L's step during backward stands (nothing left to do)."""
        spec = self.inflight.pop(L.index, None)
        if spec is None:
            return False
        if inverse_scale == 1.0 and spec.runs == runs:
            self.kept[L.index] = self.last[L.index] = spec
            return True
        self._take_back(L, spec)
        return False

    def end_step(self, clipped):
        """After step()'s jobs: the next backward speculates unless this step clipped or skipped."""
        complete = not self._took_back and bool(self.kept) and len(self.kept) == len(self.weights.layers)
        self.rollbacks += self._took_back
        self.speculated += complete
        if self.trial.record(complete):
            self._agree()
            logger.info(self.trial.verdict("the offloaded layers' CPU steps"))
        self.armed = not clipped and self.trial.wanted()
        self.void = self._took_back = False

    def _agree(self):
        """Every rank keeps the same schedule (each holds a replica of the layers: a rank that takes a step back
        where another stepped after backward would drift from it by ulps): speculation stays only where all
        ranks' trials chose it."""
        group = self.weights.group
        if group is None or not tdist.is_initialized() or tdist.get_world_size(group) == 1:
            return
        choice = torch.tensor([int(bool(self.trial.choice))], device="cuda" if self.weights.on_cuda else "cpu")
        tdist.all_reduce(choice, op=tdist.ReduceOp.MIN, group=group)
        self.trial.choice = bool(choice.item())

    def wait_kept(self, L):
        """Before L's weights are read again: its kept step is done (raises a failed one)."""
        spec = self.kept.pop(L.index, None)
        if spec is None:
            return
        if not spec.future.done():
            t0 = time.perf_counter()
            spec.future.exception()
            self.wait_s += time.perf_counter() - t0
            if self.events is not None:
                self.events += [("wait", L.index, t0), ("waited", L.index, time.perf_counter())]
        spec.future.result()  # raises a failed step

    def finish(self, L):
        """L's working copy holds its last kept step: the step done, its deferred cast too (here, if still queued)."""
        self.wait_kept(L)
        spec = self.last.pop(L.index, None)
        if spec is not None:
            spec.cast_once(L)

    def running(self, L):
        """L's kept step if its working copy is not final yet (the step still running, or its cast deferred): its
        next fetch copies what is written (copy_while_running); else None."""
        spec = self.last.get(L.index)
        return None if spec is None or spec.future.done() and spec.cast_done.is_set() else spec

    def copy_while_running(self, L, spec, dest):
        """Queue copies into `dest` (a device buffer, on the current CUDA stream) span by span as L's kept step
        `spec` writes them: of the working copy, or, where its cast is deferred, of the fp32 master through a
        staging buffer, cast on the device (the same rounding as the host's cast). Returns with every copy queued
        and the step done (raises a failed step)."""
        span = tail_steps.HOST_SPAN_NUMEL
        a, t0, staging, k = 0, time.perf_counter(), None, 0
        while a < L.numel:
            b = spec.wait_written(a)
            if b <= a:
                break  # the run ended without writing more: failed (wait_kept raises) or nothing to step
            if not spec.deferred or spec.cast_done.is_set():
                dest[a:b].copy_(L.working[a:b], non_blocking=True)
            else:
                for s in range(a, b, span):
                    e = min(s + span, b)
                    if staging is None:  # two slots: the stream orders each slot's reuse after its cast
                        staging = torch.empty(2 * span, dtype=torch.float32, device=dest.device)
                    slot = staging[(k % 2) * span:][:e - s]
                    slot.copy_(L.master[s:e], non_blocking=True)
                    dest[s:e].copy_(slot)
                    k += 1
            a = b
        self.wait_s += time.perf_counter() - t0
        self.wait_kept(L)
        if a < L.numel:  # the run stepped no further (a gradient not finite): the working copy is current
            dest[a:].copy_(L.working[a:], non_blocking=True)

    def cancel(self):
        """Take back this backward's steps (a read, a load or a skipped step before step() validated them)."""
        took = bool(self.inflight)
        for index, spec in list(self.inflight.items()):
            self._take_back(self.weights.layers[index], spec)
        self.inflight = {}
        self.void = self.void or took
        return took

    def settle(self):
        """Nothing in flight: steps not yet validated taken back, kept ones done and cast."""
        self.cancel()
        for L in self.weights.layers:
            self.finish(L)

    def _take_back(self, L, spec):
        self._took_back = True
        stepped = spec.future.result()
        spec.cast_once(L)  # a queued cast must not write the working copy after the undo
        if stepped:
            bufs = (L.master, L.grad, L.exp_avg, L.exp_avg_sq)
            for a, b, *hyper in spec.runs:
                undo_adamw(bufs, a, b, tuple(hyper), self.use_torch)
            if L.working is not L.master:
                L.working.copy_(L.master)

    def close(self):
        try:
            self.settle()
        finally:
            self.worker.close()


def speculation_info(s):
    """`weights_speculative`: whether the layers' CPU steps start during backward (`s`: the LayerSpeculation or
    None); in how many steps all of them stood, in how many some were taken back."""
    out = {"weights_speculative": s is not None, "weights_speculated_steps": s.speculated if s else 0,
           "weights_rollbacks": s.rollbacks if s else 0}
    if s is not None and s.trial.step:  # per step: the worker's CPU time, and how long the host waited for it
        out.update(weights_cpu_step_s=s.cpu_s / s.trial.step, weights_wait_s=s.wait_s / s.trial.step,
                   weights_trial=s.trial.summary())
    return out

