"""The tails' CPU steps taken during backward, before the gradient norm is known (speculation, then validation).

Why: the clip coefficient and the overflow verdict need the global gradient norm, known only once backward
is over, so an exact step can start only then, and the next forward is all it can hide behind. But the
tails are the last layers' share of each partition, whose gradients backward produces first: stepping each
chunk as soon as its gradients are there hides the CPU step behind the rest of backward, if the step turns
out to be the one plain DeepSpeed takes. `step()` then validates (the scale it multiplies gradients by is 1:
nothing clipped, loss scale 1, the same hyper-parameters) and only the weights go back; otherwise each chunk's
step is taken back (`cpu_adam.undo_adamw`, exact to a few fp32 ulps) and taken again with the real scale,
as without speculation.

Whether to speculate is predicted from the last step: a step that clipped disarms the next backward's
speculation, one that did not arms it (it starts armed). Training with clipping active on most steps thus
pays for one rollback, then runs as without speculation. And whether it pays at all is measured (`Trial`):
its CPU threads compete during backward with the ones launching backward's kernels, which a small CPU share,
hidden behind the next forward anyway, does not repay.

A chunk whose gradient is not finite is not stepped (undoing a step on infinities is impossible); step()
then skips the whole step (the overflow check) or redoes the chunk as plain DeepSpeed would.

Taken only where a parameter's gradient at its accumulation hook is what DeepSpeed's step will read: one
data-parallel rank (no reduction changes it), one micro-step per step, no loss scaling, decoupled weight
decay (or none), `overlap_cpu_optimizer_d2h_h2d` on (zero.py checks).
"""
import logging
import statistics
import time
import warnings

import torch

from . import tail_steps
from .cpu_adam import undo_adamw
from .tail_steps import Chunk, chunk_spans

STAGES_PER_CHUNK = 4  # a chunk's gradient is staged on the GPU a quarter at a time (32 MiB of fp32 by default)
logger = logging.getLogger("ds_offload")


class Trial:
    """Times the first steps with speculation and without, then keeps the faster schedule for the run.

    Measured on an H200 (reference GPT, ZeRO-1, new batches): f=0.25 1.11x with it, 1.05x without (the CPU
    step hides behind the next forward; speculating only adds contention); f=0.5 1.17x and 1.45x. Steps
    0..WARM+n-1 speculate, the next n do not; a step's time is the host time from the previous step() to its
    own (step() synchronizes once, for the clip coefficient), counted when both steps ran the same schedule
    and the earlier is past the first WARM."""

    WARM = 2

    def __init__(self, n, clock=None):
        self.n = n  # n => steps per schedule in the trial; None: no trial, speculate wherever it applies
        self.clock = clock or time.perf_counter
        self.step = 0  # step => steps finished
        self.times = {True: [], False: []}  # times => speculated => seconds of the steps timed with it
        self.choice = None if n else True  # choice => the schedule kept (None while the trial runs)
        self._last = None  # _last => (clock at the end of the last step, whether it speculated)

    def wanted(self):
        """Whether the next backward should speculate."""
        return self.choice if self.choice is not None else self.step < self.WARM + self.n

    def record(self, speculated):
        """A step ended; returns True once, when the trial has just decided."""
        now = self.clock()
        if self.choice is None and self._last is not None and self._last[1] == speculated and \
                self.step > self.WARM:
            self.times[speculated].append(now - self._last[0])
        self._last = (now, speculated)
        self.step += 1
        if self.choice is not None or self.step < self.WARM + 2 * self.n:
            return False
        on, off = (statistics.median(self.times[k]) if self.times[k] else None for k in (True, False))
        self.choice = on is not None and (off is None or on < off)
        return True

    def summary(self):
        on, off = (statistics.median(self.times[k]) if self.times[k] else None for k in (True, False))
        return {"choice": self.choice, "with_s": on, "without_s": off}

    def verdict(self, what):
        """The line logged once the trial has decided; `what`: the steps it timed ("the CPU share's step")."""
        t = self.summary()
        fmt = lambda x: f"{x:.3f} s" if x is not None else "not timed (every step clipped)"  # noqa: E731
        return (f"ds_offload: {what} during backward {'kept' if t['choice'] else 'turned off'} for this run: "
                f"{fmt(t['with_s'])} per step with it, {fmt(t['without_s'])} without")


class Speculation:
    """Collects the tails' gradients as backward produces them and starts their chunks' CPU steps."""

    def __init__(self, steps, trial_steps=None, verbose=False):
        self.steps = steps  # steps => the TailSteps whose worker, backend and D2H stream the chunks use
        self.trial = Trial(trial_steps)  # trial => which schedule is faster here, measured on the first steps
        self.verbose = verbose  # verbose => log the trial's verdict (rank 0)
        self.pieces = {}  # pieces => id(param) => [(stage, lo, hi, off)]: its elements [lo, hi) go to stage at off
        self.plan = {}  # plan => (tail id, chunk index) => [tail, a, b, how many of its stages parameters cover]
        self.stages = {}  # stages => (tail id, chunk index, j) => [a, b, elements the parameters cover] in the tail
        self.hyper_of = {}  # hyper_of => tail id => callable giving (step_before, lr, beta1, beta2, eps, wd) now
        self.armed = True  # armed => this backward's chunks are stepped as their gradients arrive
        self.disabled = None  # disabled => why speculation is off for good (None while it may run)
        self.last = {}  # last => key => the previous step's Chunk (its weight copy must finish before a new step)
        self.rollbacks = 0  # rollbacks => steps whose speculative CPU steps were taken back
        self.speculated = 0  # speculated => steps whose every chunk was stepped during backward
        self.this_step = False  # this_step => whether the step being finished was stepped during backward
        self._reset()

    def _reset(self):
        self.open = {}  # open => stage => [staging tensor, elements still to come] of stages being filled
        self.unsent = {}  # unsent => key => stages of the chunk not yet copied to the host
        self.flags = {}  # flags => stage => 0-dim bool host tensor its "gradient is finite" lands in, this backward
        self.sent = {}  # sent => key => Chunk whose speculative step was started this backward
        self.seen = set()  # seen => id(param) whose gradient this backward has delivered
        self.void = False  # void => this backward's speculation was taken back; step() takes the plain path

    def add_tail(self, tail_id, tail, lp, params, hyper_of):
        """Plan tail `tail_id`, the elements from `tail.start` on of the flat low-precision tensor `lp` that
        `params` live in."""
        size = max(1, tail_steps.CHUNK_NUMEL // STAGES_PER_CHUNK)
        spans = []  # (stage key, a, b) over the tail, in order
        for k, (a, b) in enumerate(chunk_spans(tail.numel)):
            self.plan[(tail_id, k)] = [tail, a, b, 0]
            for j, x in enumerate(range(a, b, size)):
                self.stages[(tail_id, k, j)] = [x, min(x + size, b), 0]
                spans.append(((tail_id, k, j), x, min(x + size, b)))
        self.hyper_of[tail_id] = hyper_of
        for p in params:
            off = (p.data_ptr() - lp.data_ptr()) // p.element_size() - tail.start  # p's first element in the tail
            for stage, a, b in spans:
                lo, hi = max(a, off), min(b, off + p.numel())
                if lo < hi:
                    self.pieces.setdefault(id(p), []).append((stage, lo - off, hi - off, lo - a))
                    self.stages[stage][2] += hi - lo
        for stage, a, b in spans:
            if self.stages[stage][2]:
                self.plan[stage[:2]][3] += 1  # the stages parameters cover; the others hold padding only
            else:
                del self.stages[stage]
                tail.grad[a:b].zero_()  # padding: a zero gradient, as DeepSpeed's flat partition has

    # ------------------------------------------------------------------------------ backward
    def grad_ready(self, p):
        """A parameter's gradient is accumulated (its post-accumulate-grad hook, before DeepSpeed's)."""
        pieces = self.pieces.get(id(p))
        if not pieces or not self.armed or self.void or self.disabled:
            return
        if id(p) in self.seen or p.grad is None:  # reentrant checkpointing, two backwards: not the step's gradient
            return self._give_up(f"the gradient of a parameter of the CPU share arrived twice in one backward "
                                 f"(reentrant activation checkpointing, or backward() twice before step())")
        self.seen.add(id(p))
        g = p.grad.detach().reshape(-1)
        for stage, lo, hi, off in pieces:
            entry = self.open.get(stage) or self._open(stage, g.device)
            entry[0][off:off + hi - lo].copy_(g[lo:hi])
            entry[1] -= hi - lo
            if entry[1] == 0:
                self._send(stage, entry[0])

    def _open(self, stage, device):
        a, b, covered = self.stages[stage]
        if device.type == "cuda":
            staging = torch.zeros(b - a, dtype=torch.float32, device=device)  # padding elements: zero gradient
        else:
            staging = self.plan[stage[:2]][0].grad[a:b]
            staging.zero_()
        self.open[stage] = entry = [staging, covered]
        return entry

    def _send(self, stage, staging):
        """Stage complete: its gradient to the host; the chunk's CPU step once its last stage is there."""
        del self.open[stage]
        key = stage[:2]
        tail, a, b, n = self.plan[key]
        x, y, _ = self.stages[stage]
        left = self.unsent[key] = self.unsent.get(key, n) - 1
        # The stage's "gradient is finite", landed beside it (a new tensor per backward: the worker may still
        # read the last one).
        finite = self.flags[stage] = torch.ones((), dtype=torch.bool, pin_memory=staging.is_cuda)
        c = None
        if left == 0:
            c = Chunk(a, b)
            c.finite = [f for st, f in self.flags.items() if st[:2] == key]  # the worker skips a non-finite chunk
        if staging.is_cuda:
            ok = torch.isfinite(staging).all()
            d2h = self.steps.d2h
            d2h.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(d2h):
                tail.grad[x:y].copy_(staging, non_blocking=True)
                finite.copy_(ok, non_blocking=True)
                if c is not None:  # after this chunk's other stages' copies too: one stream, in order
                    c.d2h_event = torch.cuda.Event()
                    c.d2h_event.record()
            staging.record_stream(d2h)
            ok.record_stream(d2h)
        else:
            finite.copy_(torch.isfinite(staging).all())
        if c is None:
            return
        c.speculated = self.hyper_of[key[0]]()
        c.spec_future = self.steps.speculate(key[0], tail, c, self.last.get(key))
        self.sent[key] = c

    # ---------------------------------------------------------------------------------- step
    def finish(self):
        """At step(): key => Chunk for every chunk, all stepped during this backward, or None (nothing was, or
        it was taken back); resets for the next backward."""
        sent, complete = self.sent, not self.void and self.sent and len(self.sent) == len(self.plan)
        if self.seen and not self.void and not complete:  # gradients came, but not for every chunk
            missing = len(self.plan) - len(self.sent)
            self._give_up(f"{missing} chunk(s) of the CPU share got no gradient for some of their parameters in "
                          f"backward (a parameter unused in the forward)")
        self._reset()
        self.speculated += bool(complete)
        self.this_step = bool(complete)
        return sent if complete else None

    def take_back(self, chunks):
        """Undo the speculative steps of `chunks` (key => Chunk) once they are done, in the calling thread."""
        for key, c in chunks.items():
            c.spec_future.result()
            if c.stepped:
                tail = self.plan[key][0]
                undo_adamw((tail.master, tail.grad, tail.exp_avg, tail.exp_avg_sq), c.a, c.b, c.speculated,
                           self.steps.backend.use_torch)
            c.speculated, c.stepped = None, False

    def predict(self, chunks, clipped, rolled_back):
        """After step(): the next backward speculates only if this step did not clip (or skip); `chunks` are
        this step's (key => Chunk), `rolled_back` whether its speculative steps were taken back."""
        self.last = dict(chunks)
        self.rollbacks += bool(rolled_back)
        if self.trial.record(self.this_step) and self.verbose:
            logger.info(self.trial.verdict("the CPU share's step"))
        self.armed = not clipped and self.trial.wanted()
        self.this_step = False

    def cancel(self):
        """Take back what this backward stepped so far (a state dict, a load or a refresh before step())."""
        if self.sent:
            self.take_back(self.sent)
        self.open = {}
        self.sent = {}
        self.unsent = {}
        self.void = bool(self.seen)

    def _give_up(self, why):
        self.cancel()
        self.void = True
        self.disabled = why
        warnings.warn(f"cpu_offloading.optimizer: the CPU step no longer starts during backward: {why}. Training "
                      f"goes on with the step after backward (same numbers, less overlap).", stacklevel=3)
