"""How the offloaded share travels: gradients D2H into a bucket, the bucket's CPU step, masters H2D.

``make_transfers`` picks the implementation once, when the layout is built, so the optimizer never asks
where its buckets' parameters live:

* ``HostTransfers`` (no offloaded parameter on CUDA, e.g. CI): plain synchronous copies, nothing to order.
* ``CudaTransfers``: a D2H and an H2D stream, made in one place (``make_streams``), and per bucket a
  ``d2h_event`` (the gradient copy is issued; blocking, so the worker that sleeps on it leaves its core to
  the CPU Adam) and an ``h2d_event`` (the updated weights are back in the params).

Either way a bucket's CPU step runs in the worker thread when there is one (``executor``), else inline,
and ``wait_bucket`` lands it and orders the current stream after it.
"""
import concurrent.futures

import torch


def make_streams(overlap=True):
    """The (d2h, h2d) streams of the offloaded share: side streams, so that copies overlap compute.

    The only place streams are made; the code that uses them also works with ``torch.cuda.current_stream()``
    for both, which is what ``overlap=False`` gives (copies then serialize with compute, Megatron's hybrid
    optimizer without overlap)."""
    if not overlap:
        return torch.cuda.current_stream(), torch.cuda.current_stream()
    return torch.cuda.Stream(), torch.cuda.Stream()


def make_transfers(lay, backend, threaded):
    """The transfers of layout ``lay``: over CUDA streams when an offloaded param is on a GPU; with a worker
    thread for the CPU steps when ``threaded`` and there is a bucket to step."""
    executor = None
    if threaded and lay.buckets:
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ds_offload_cpu_adam")
    cls = CudaTransfers if lay.on_cuda else HostTransfers
    return cls(lay, backend, executor)


class HostTransfers:
    """Every offloaded parameter is on the host: copies are synchronous and need no ordering."""

    on_cuda = False

    def __init__(self, lay, backend, executor):
        self.versions = lay.versions  # versions => the layout's id(param) -> _version, updated after our writes
        self.backend = backend  # backend => the CpuAdamBackend that steps the buckets
        self.executor = executor  # executor => one worker thread for the CPU steps; None: they run inline

    @property
    def lands_later(self):
        """Whether ``step()`` may return before the updates land (a forward pre-hook then waits for them)."""
        return False

    # ----------------------------------------------------------------------------------- D2H
    def copy_grads_to_host(self, b):
        if b.future is not None:  # a parameter used outside any module forward: its update is still landing
            self.wait_bucket(b)
        b.seen.clear()
        b.mark_copied()
        self._copy_grads(b)

    def _copy_grads(self, b):
        for pc in b.pieces:
            g = pc.grad_view()
            if g is not None:
                b.grad[pc.offset:pc.offset + pc.numel].copy_(g)

    def backward_done(self):
        """A marker of the work queued so far (the backward), that the H2D must come after; None on the host."""
        return None

    def order_after_d2h(self, buckets):
        """Make the current stream wait for the gradient copies of ``buckets`` (it may free the gradients)."""

    # ------------------------------------------------------------------------------ CPU step
    def submit(self, b, runs, live, after_backward):
        """Start bucket ``b``'s CPU step and send it back; ``live`` (pieces that had a gradient) is decided
        by the caller, since the gradients may be gone (zero_grad) by the time the worker runs."""
        if self.executor is not None:
            b.future = self.executor.submit(self._cpu_bucket_task, b, runs, live, after_backward)
        else:
            self._cpu_bucket_task(b, runs, live, after_backward)

    def _cpu_bucket_task(self, b, runs, live, after_backward):
        self.backend.run(b.id, runs)
        for pc in live:
            pc.param_view().copy_(pc.master)

    # ----------------------------------------------------------------------------------- H2D
    def wait_bucket(self, b):
        """Land bucket ``b``'s CPU step, if in flight, and order the current stream after its H2D."""
        if b.future is not None:
            fut, b.future = b.future, None
            fut.result()
        self._order_after_h2d(b)

    def order_after_h2d(self, buckets):
        for b in buckets:
            self._order_after_h2d(b)

    def _order_after_h2d(self, b):
        pass

    def close(self):
        """Stop the worker thread (after its queued steps)."""
        if self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None


class CudaTransfers(HostTransfers):
    """Offloaded parameters on a GPU: copies on the D2H and H2D streams, ordered by each bucket's events."""

    on_cuda = True

    def __init__(self, lay, backend, executor):
        super().__init__(lay, backend, executor)
        self.d2h, self.h2d = make_streams()  # d2h, h2d => the streams of the gradient and weight copies
        for b in lay.buckets:
            # The worker sleeps on d2h_event; a blocking event leaves its core to the CPU Adam.
            b.d2h_event, b.h2d_event = torch.cuda.Event(blocking=True), torch.cuda.Event()

    @property
    def lands_later(self):
        return self.executor is not None

    def _copy_grads(self, b):
        d2h = self.d2h
        d2h.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(d2h):
            views = [pc.grad_view() for pc in b.pieces]
            if all(v is not None for v in views):  # one transfer per bucket, cast on the GPU
                staged = torch.cat(views) if len(views) > 1 else views[0]
                b.grad.copy_(staged.float(), non_blocking=True)
            else:
                for pc, v in zip(b.pieces, views):
                    if v is not None:
                        b.grad[pc.offset:pc.offset + pc.numel].copy_(v.float(), non_blocking=True)
            for pc in b.pieces:
                if pc.param.grad is not None:
                    pc.param.grad.record_stream(d2h)
            b.d2h_event.record(d2h)

    def backward_done(self):
        event = torch.cuda.Event()
        event.record()
        return event

    def order_after_d2h(self, buckets):
        for b in buckets:
            torch.cuda.current_stream().wait_event(b.d2h_event)

    def _cpu_bucket_task(self, b, runs, live, after_backward):
        b.d2h_event.synchronize()
        self.backend.run(b.id, runs)
        h2d = self.h2d
        with torch.cuda.device(h2d.device), torch.cuda.stream(h2d):
            h2d.wait_event(after_backward)  # backward kernels still queued may read these params
            dev = torch.empty(b.numel, dtype=torch.float32, device=b.pieces[0].param.device)
            dev.copy_(b.master, non_blocking=True)
            torch._foreach_copy_([pc.param_view() for pc in live],
                                 [dev[pc.offset:pc.offset + pc.numel] for pc in live])
            b.h2d_event.record(h2d)
        for pc in live:  # our own write, not a weight load: keep step()'s refresh check quiet
            self.versions[id(pc.param)] = pc.param._version

    def _order_after_h2d(self, b):
        torch.cuda.current_stream().wait_event(b.h2d_event)
