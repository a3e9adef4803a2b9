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

The steps queue last in, first out: by the end of backward the deepest layers are done and the shallow ones
wait, and the shallowest is the one the next forward needs first.

As for the optimizer's share (optimizer/speculate.py), a step that clipped disarms the next backward's
speculation and one that did not arms it. The gradient a layer's hooks deliver is the reduced one the step
reads (weights/offload.py reduces it there), so this applies with any number of ranks; not with gradient
accumulation (a window of several micro-steps), loss scaling or L2 weight decay (the optimizers check).
"""
import concurrent.futures
import queue
import threading

from ..optimizer.cpu_adam import undo_adamw
from ..optimizer.tail_steps import Chunk


class LifoWorker:
    """One thread running submitted calls, the most recent first."""

    def __init__(self, name):
        self._queue = queue.LifoQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn):
        future = concurrent.futures.Future()
        self._queue.put((future, fn))
        return future

    def _loop(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # handed to whoever waits on the future
                    future.set_exception(e)

    def close(self, futures=()):
        for f in futures:
            f.exception()  # wait: a call still queued would otherwise run after the sentinel or never
        self._queue.put(None)
        self._thread.join()


class Spec:
    """One layer's CPU step taken during backward."""

    def __init__(self, runs, future):
        self.runs = runs  # runs => [(a, b, step_before, lr, beta1, beta2, eps, wd)] it was stepped with
        self.future = future  # future => the worker's run; its result: whether it stepped (False: not finite)


class LayerSpeculation:
    """Starts each offloaded layer's CPU step when its gradient is on the host; keeps or takes it back at step()."""

    def __init__(self, weights, use_torch):
        self.weights = weights  # weights => the WeightOffload whose layers are stepped
        self.use_torch = use_torch  # use_torch => the backend is torch's fused AdamW (the undo's constants)
        self.worker = LifoWorker("ds_offload_weight_steps")
        self.armed = True  # armed => this backward's layers are stepped as their gradients arrive
        self.void = False  # void => this backward's steps were taken back (a read between backward and step())
        self.inflight = {}  # inflight => layer index => Spec started this backward, not yet validated
        self.kept = {}  # kept => layer index => Spec that step() kept, whose weights the layer's next fetch waits for
        self.speculated = 0  # speculated => steps in which every layer's step stood
        self.rollbacks = 0  # rollbacks => steps in which some layer's step was taken back
        self._took_back = False  # _took_back => a step of this backward was taken back

    # ------------------------------------------------------------------------------- backward
    def start(self, L, runs, event, finite):
        """L's gradient is on its way to the host (`event`: after its copies; `finite`: a 0-dim host bool landing
        with them, or a bool); step it with `runs` once it is there."""
        if not self.armed or self.void:
            return
        w = self.weights

        def run():
            if event is not None:
                event.synchronize()
            if not bool(finite):
                return False  # an overflow or a NaN: step() skips or redoes; no Adam state is touched
            w.tail_steps.step_on_host(L.bucket_id, L, L.working, lambda a, b: _clip(runs, a, b), Chunk(0, L.numel),
                                      1.0)
            return True
        self.inflight[L.index] = Spec(runs, self.worker.submit(run))

    # ----------------------------------------------------------------------------------- step
    def validate(self, L, runs, inverse_scale):
        """At step(), before L's own job: True when L's step during backward stands (nothing left to do)."""
        spec = self.inflight.pop(L.index, None)
        if spec is None:
            return False
        if inverse_scale == 1.0 and spec.runs == runs:
            self.kept[L.index] = spec
            return True
        self._take_back(L, spec)
        return False

    def end_step(self, clipped):
        """After step()'s jobs: the next backward speculates unless this step clipped or skipped."""
        if self._took_back:
            self.rollbacks += 1
        elif self.kept and len(self.kept) == len(self.weights.layers):
            self.speculated += 1
        self.armed = not clipped
        self.void = self._took_back = False

    def wait_kept(self, L, block=True):
        """Before L's weights are read again: its kept step is done. `block=False`: whether it is, without waiting."""
        spec = self.kept.get(L.index)
        if spec is None:
            return True
        if not block and not spec.future.done():
            return False
        del self.kept[L.index]
        spec.future.result()  # raises a failed step
        return True

    def cancel(self):
        """Take back this backward's steps (a read, a load or a skipped step before step() validated them)."""
        took = bool(self.inflight)
        for index, spec in list(self.inflight.items()):
            self._take_back(self.weights.layers[index], spec)
        self.inflight = {}
        self.void = self.void or took
        return took

    def settle(self):
        """Nothing in flight: steps not yet validated taken back, kept ones done."""
        self.cancel()
        for L in self.weights.layers:
            self.wait_kept(L)

    def _take_back(self, L, spec):
        self._took_back = True
        if spec.future.result():
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
    return {"weights_speculative": s is not None, "weights_speculated_steps": s.speculated if s else 0,
            "weights_rollbacks": s.rollbacks if s else 0}


def _clip(runs, a, b):
    return [(max(a, s), min(b, e), *h) for s, e, *h in runs if s < b and a < e]
