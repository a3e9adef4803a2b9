"""CPU Adam backends for the offloaded share of HybridDeviceOptimizer.

The offloaded share is stepped while the GPU keeps working (rest of backward, the GPU share's step, the
next forward), so the CPU step must not hold the GIL: a GIL-holding step stalls the Python thread that
launches GPU kernels and the two serialize.

* ``torch``: ``torch._fused_adamw_`` / ``torch._fused_adam_`` on CPU tensors; the dispatcher releases
  the GIL, so a plain background thread overlaps.
* ``deepspeed`` in the calling thread: DeepSpeed's CPU Adam kernel (the one behind ``DeepSpeedCPUAdam``),
  built with a binding that releases the GIL (ds_op.py), so a background thread overlaps here too. Where that
  build fails, DeepSpeed's own op, whose binding holds the GIL: then only where nothing else runs (CPU-only
  machines, overlap off).
* ``deepspeed`` in a worker process: the fallback where the GIL-free build failed and a step must overlap. The
  same op in a spawned process that owns no GPU; the flat buffers live in shared memory (page-locked with
  cudaHostRegister by the parent when CUDA is there), so the parent only sends (bucket, ranges,
  hyper-parameters) over a pipe and waits on it, which releases the GIL.

A "run" is a contiguous range of one bucket that shares one param group and one step count:
``(start, end, step_before, lr, beta1, beta2, eps, weight_decay)``.

Which one runs (``pick_worker_mode``): inline without CUDA or with overlap off, else a thread, or a process for
DeepSpeed's kernel where only its GIL-holding op exists or /dev/shm cannot hold the process's buffers.
"""
import contextlib
import functools
import itertools
import math
import multiprocessing as mp
import os
import sys
import threading
import traceback
import warnings

import numpy
import torch

from . import ds_op

_OPT_ID = 7301  # id inside the worker process, which owns its op alone
_inline_ids = itertools.count(7302)  # one per inline backend, clear of DeepSpeedCPUAdam's small ids
HOST_SPAN_NUMEL_UNDO = 1 << 20  # 4 MiB of fp32 per array: the rollback's temporaries stay in cache
_worker_threads = threading.local()  # .sized => this (background) thread's OpenMP team size is set


def size_worker_team():
    """In a background thread that steps while the training thread runs: OpenMP teams of one core fewer than the
    process may use (as the worker process had). A team of every core would share one with the training thread,
    and a parallel loop waits for its slowest member. torch.set_num_threads sets the calling thread's team size
    (and the default of threads created after it); the training thread's stays as it was."""
    if getattr(_worker_threads, "sized", False) or threading.current_thread() is threading.main_thread():
        return
    _worker_threads.sized = True
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    if cores > 2 and torch.get_num_threads() >= cores:  # a smaller team the user chose stays
        torch.set_num_threads(cores - 1)


def shared_memory_fits(nbytes, path="/dev/shm"):
    """Whether ``nbytes`` of shared tensors fit: past the mount's size, touching them is a SIGBUS, not an error."""
    try:
        st = os.statvfs(path)
    except OSError:
        return True  # no /dev/shm mount to run out of (torch then uses other shared memory)
    return st.f_bavail * st.f_frsize >= nbytes + (256 << 20)


def pick_worker_mode(requested, on_cuda, overlap, use_torch):
    """Where the CPU step runs: the caller's choice, else inline unless it can overlap with CUDA work, then a
    thread for a GIL-free kernel (torch's, or DeepSpeed's through ds_op's build), a process for DeepSpeed's
    GIL-holding op where that build failed.

    `overlap` is the optimizer's deferred schedule only: the weight-offloaded layers' steps during backward
    (weights/speculate.py) always run in their own thread with the inline op. Through a process, measured on an
    H200 (reference GPT, N=8), each layer's step took 32 ms (a pipe round trip per span, a second thread pool
    beside the cast's) against ~15 ms inline."""
    if requested:
        return requested
    if not (on_cuda and overlap):
        return "inline"
    return "thread" if use_torch or ds_op.gil_free_op() is not None else "process"


def fit_worker_mode_to_shared_memory(mode, cpu_numel):
    """A process worker needs its 16 bytes per element in /dev/shm; fall back to a thread when they do not fit."""
    if mode == "process" and not shared_memory_fits(16 * cpu_numel):
        warnings.warn("not enough /dev/shm for the CPU Adam worker process's buffers; stepping DeepSpeed's "
                      "CPU Adam in a thread instead (its binding holds the GIL: less overlap)")
        return "thread"
    return mode


def _ds_runs(op, opt_id, bufs, runs):
    master, grad, exp_avg, exp_avg_sq = bufs
    empty = master[:0]
    for start, end, step, lr, b1, b2, eps, wd in runs:
        # The op caches beta**step and advances it by one multiplication when called with step+1, so its
        # numbers would depend on its call history (a resumed run would differ in the last bit). Resetting
        # it to step 0 with an empty update makes every call compute beta**step the same way.
        op.adam_update(opt_id, 0, lr, b1, b2, eps, wd, True, empty, empty, empty, empty)
        op.adam_update(opt_id, step + 1, lr, b1, b2, eps, wd, True, master[start:end], grad[start:end],
                       exp_avg[start:end], exp_avg_sq[start:end])


def torch_adam_runs(adamw_mode, bufs, runs):
    """Fused torch Adam over ranges of flat buffers; works for CPU and CUDA tensors alike."""
    master, grad, exp_avg, exp_avg_sq = bufs
    fn = torch._fused_adamw_ if adamw_mode else torch._fused_adam_
    for start, end, step, lr, b1, b2, eps, wd in runs:
        steps = [torch.tensor(float(step + 1), device=master.device)]  # the kernel reads, not bumps, it
        fn([master[start:end]], [grad[start:end]], [exp_avg[start:end]], [exp_avg_sq[start:end]], [], steps,
           lr=lr, beta1=b1, beta2=b2, weight_decay=wd, eps=eps, amsgrad=False, maximize=False)


def undo_adamw(bufs, start, end, hyper, use_torch=False, span=HOST_SPAN_NUMEL_UNDO):
    """Take back one decoupled-weight-decay Adam step of ``bufs[start:end]``, taken with ``hyper`` = (step_before,
    lr, beta1, beta2, eps, weight_decay) on the gradient still in ``bufs``' grad (speculate.py's rollback).

    The algebraic inverse of the update both backends compute (DeepSpeed's CPU op and torch's fused AdamW):
    ``u = m / (sqrt(v) / sqrt(1 - b2^t) + eps)``, ``p' = p (1 - lr wd) - lr / (1 - b1^t) u``,
    ``m' = b1 m + (1 - b1) g``, ``v' = b2 v + (1 - b2) g^2``, with the kernel's own constants (`_op_constants`:
    DeepSpeed's op rounds ``b2^t`` and the corrections to float, which alone moves an early step's update by
    ~1e-5; torch's kernel keeps them in double). In fp32 it returns the state within a few ulps of the one
    before the step, not bit for bit. Cache-sized spans: the passes read memory about once."""
    master, grad, exp_avg, exp_avg_sq = bufs
    step, lr, b1, b2, eps, wd = hyper
    t = step + 1
    if use_torch:
        one_minus_b1, one_minus_b2 = 1 - b1, 1 - b2
        step_size, inv_bc2, decay = lr / (1 - b1 ** t), 1 / math.sqrt(1 - b2 ** t), 1 - lr * wd
    else:
        one_minus_b1, one_minus_b2, step_size, inv_bc2, decay, eps = _op_constants(t, lr, b1, b2, eps, wd)
    for a in range(start, end, span):
        b = min(a + span, end)
        p, g, m, v = master[a:b], grad[a:b], exp_avg[a:b], exp_avg_sq[a:b]
        denom = v.sqrt().mul_(inv_bc2).add_(eps)
        p.addcdiv_(m, denom, value=step_size)
        if wd:
            p.div_(decay)
        if step == 0:  # before the first step the moments are zero: restored exactly, not by a subtraction whose
            m.zero_()  # rounding (~1e-7 of v') a clipped redo would weigh 1/coef^2 times more than its own g^2
            v.zero_()
            continue
        m.sub_(g, alpha=one_minus_b1).div_(b1)
        v.addcmul_(g, g, value=-one_minus_b2).div_(b2).clamp_(min=0)


@functools.lru_cache(maxsize=64)
def _op_constants(t, lr, b1, b2, eps, wd):
    """DeepSpeed's CPU Adam constants for step t, in float as its kernel holds them (csrc/includes/cpu_adam.h):
    ``b^t`` as the product of float multiplications it keeps from step to step (for t > 256 the correctly
    rounded power: by then ``1 - b^t`` is large enough that the ulp between the two is noise), then
    (1 - b1, 1 - b2, lr / (1 - b1^t), 1 / sqrt(1 - b2^t), 1 - lr wd, eps)."""
    f = numpy.float32
    b1f, b2f, lrf, one = f(b1), f(b2), f(lr), f(1.0)
    if t <= 256:
        b1t = b2t = one
        for _ in range(t):
            b1t, b2t = f(b1t * b1f), f(b2t * b2f)
    else:
        b1t, b2t = f(float(b1f) ** t), f(float(b2f) ** t)
    inv_bc2 = one / numpy.sqrt(one - b2t)
    return (float(one - b1f), float(one - b2f), float(lrf / (one - b1t)), float(inv_bc2),
            float(one - lrf * f(wd)), float(f(eps)))


def _worker_main(conn, adamw_mode, buckets, num_threads):
    """Body of the spawned process: step buckets on request until told to stop."""
    try:
        if num_threads:
            torch.set_num_threads(num_threads)
        op = ds_op.deepspeed_op()  # the parent built it; nothing else runs in this process to need the GIL
        op.create_adam(_OPT_ID, 1e-3, 0.9, 0.999, 1e-8, 0.0, adamw_mode, False)
        conn.send(("ready", None))
    except Exception:  # report instead of leaving the parent blocked
        conn.send(("error", traceback.format_exc()))
        return
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            bucket_id, runs = msg
            try:
                _ds_runs(op, _OPT_ID, buckets[bucket_id], runs)
                conn.send(("ok", None))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    except (EOFError, OSError):
        return  # the parent is gone (killed, crashed): nothing to report to, exit quietly
    op.destroy_adam(_OPT_ID)


_MAIN_LOCK = threading.Lock()


@contextlib.contextmanager
def _child_skips_main():
    """Start a spawned child without re-running the parent's `__main__`.

    spawn re-imports the main script (or `-m` module) in the child so that pickled targets defined there
    resolve; ours lives in this module, so that import is not needed, and for a training script without an
    `if __name__ == "__main__":` guard it would re-run the training in the child (which then dies trying to
    start its own worker). Hiding main's `__file__` and `__spec__` while the child starts skips it.
    """
    main = sys.modules.get("__main__")
    with _MAIN_LOCK:
        saved = {k: main.__dict__.pop(k) for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
        if main is not None:
            main.__spec__ = None
        try:
            yield
        finally:
            if main is not None:
                main.__dict__.pop("__spec__", None)
                main.__dict__.update(saved)


def _died(proc, during):
    proc.join(timeout=5)
    code = proc.exitcode
    how = (f"was killed by signal {-code}" if code is not None and code < 0 else
           f"exited with status {code}" if code is not None else "stopped answering")
    return RuntimeError(f"the CPU Adam worker process {how} {during}. Its messages, if any, are above. Fix: look for "
                        "an out-of-memory kill (dmesg) or a crash of DeepSpeed's CPU Adam op; to step without a worker "
                        "process set cpu_offloading.optimizer.use_torch_optimizer_for_cpu_offload: true.")


class CpuAdamBackend:
    """Steps flat fp32 CPU buckets with one of the backends above; ``run`` blocks until done."""

    def __init__(self, use_torch, adamw_mode, use_process=False):
        self.use_torch = use_torch
        self.adamw_mode = adamw_mode
        self.use_process = use_process and not use_torch
        self.buckets = []
        self._op = None
        self._proc = None
        self._conn = None
        # _lock => one run at a time: the worker pipe and the op's per-id state are not for two threads (the
        # optimizer's worker and the weights' steps during backward may both call)
        self._lock = threading.Lock()

    @staticmethod
    def wants_shared_memory(use_torch, use_process):
        return use_process and not use_torch

    def register(self, bufs):
        """Add a bucket's (master, grad, exp_avg, exp_avg_sq); returns its id. Call before ``start``."""
        self.buckets.append(tuple(bufs))
        return len(self.buckets) - 1

    def start(self):
        if self.use_torch:
            return
        if not self.use_process:
            self._op = ds_op.load()
            self._opt_id = next(_inline_ids)
            self._op.create_adam(self._opt_id, 1e-3, 0.9, 0.999, 1e-8, 0.0, self.adamw_mode, False)
            return
        ds_op.deepspeed_op()  # build (or find) the JIT extension once here, so the child only loads it
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        threads = max(1, (os.cpu_count() or 2) - 1)
        self._proc = ctx.Process(target=_worker_main, args=(child, self.adamw_mode, self.buckets, threads),
                                 daemon=True)
        with _child_skips_main():
            self._proc.start()
        child.close()  # the child holds its end; ours open would hide the child's death from recv()
        try:
            status, err = self._conn.recv()
        except (EOFError, OSError):
            proc, self._proc = self._proc, None
            raise _died(proc, "while starting") from None
        if status != "ready":
            raise RuntimeError(f"CPU Adam worker process failed to start:\n{err}")

    def run(self, bucket_id, runs):
        if not runs:
            return
        size_worker_team()
        with self._lock:
            self._run(bucket_id, runs)

    def _run(self, bucket_id, runs):
        if self.use_torch:
            torch_adam_runs(self.adamw_mode, self.buckets[bucket_id], runs)
        elif self._proc is None:
            _ds_runs(self._op, self._opt_id, self.buckets[bucket_id], runs)
        else:
            try:
                self._conn.send((bucket_id, runs))
                status, err = self._conn.recv()
            except (EOFError, OSError):
                raise _died(self._proc, "during a step") from None
            if status != "ok":
                raise RuntimeError(f"CPU Adam worker process failed:\n{err}")

    def close(self):
        if self._proc is not None:
            try:
                self._conn.send(None)
                self._proc.join(timeout=10)
            except (OSError, EOFError, BrokenPipeError):
                pass
            if self._proc.is_alive():
                self._proc.terminate()
            self._proc = None
        if self._op is not None:
            self._op.destroy_adam(self._opt_id)
            self._op = None
