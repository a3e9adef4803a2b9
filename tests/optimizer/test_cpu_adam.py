"""The CPU Adam backends on flat buffers: torch's kernel against torch.optim, DeepSpeed's op inline and in
its worker process against each other, and the choice between them."""
import pytest
import torch

from ds_offload.optimizer import cpu_adam
from ds_offload.optimizer.cpu_adam import CpuAdamBackend, fit_worker_mode_to_shared_memory, pick_worker_mode

N = 1000
# Two runs of one bucket with different hyper-parameters (two param groups): (start, end, lr, b1, b2, eps, wd).
GROUPS = [(0, 600, 1e-2, 0.9, 0.999, 1e-8, 0.1), (600, N, 3e-3, 0.8, 0.99, 1e-6, 0.0)]


def buffers(shared=False):
    torch.manual_seed(0)
    bufs = (torch.randn(N), torch.zeros(N), torch.zeros(N), torch.zeros(N))
    if shared:
        for t in bufs:
            t.share_memory_()
    return bufs


def grads(step):
    return torch.randn(N, generator=torch.Generator().manual_seed(100 + step))


def step_backend(backend, bufs, steps):
    for s in range(steps):
        bufs[1].copy_(grads(s))
        backend.run(0, [(a, b, s, lr, b1, b2, eps, wd) for a, b, lr, b1, b2, eps, wd in GROUPS])
    return bufs[0]


def reference(cls, steps):
    master = buffers()[0]
    ps = [torch.nn.Parameter(master[a:b].clone()) for a, b, *_ in GROUPS]
    opt = cls([{"params": [p], "lr": lr, "betas": (b1, b2), "eps": eps, "weight_decay": wd}
               for p, (_, _, lr, b1, b2, eps, wd) in zip(ps, GROUPS)])
    for s in range(steps):
        g = grads(s)
        for p, (a, b, *_) in zip(ps, GROUPS):
            p.grad = g[a:b].clone()
        opt.step()
    return torch.cat([p.detach() for p in ps])


@pytest.mark.parametrize("adamw_mode,cls", [(True, torch.optim.AdamW), (False, torch.optim.Adam)])
def test_torch_backend_matches_torch_optim(adamw_mode, cls):
    backend = CpuAdamBackend(use_torch=True, adamw_mode=adamw_mode)
    bufs = buffers()
    backend.register(bufs)
    backend.start()
    try:
        got = step_backend(backend, bufs, 10)
    finally:
        backend.close()
    torch.testing.assert_close(got, reference(cls, 10), rtol=0, atol=1e-6)


def test_torch_backend_skips_an_empty_run_list():
    backend = CpuAdamBackend(use_torch=True, adamw_mode=True)
    bufs = buffers()
    backend.register(bufs)
    before = [t.clone() for t in bufs]
    backend.run(0, [])
    assert all(torch.equal(a, b) for a, b in zip(before, bufs))


@pytest.mark.slow
@pytest.mark.parametrize("adamw_mode", [True, False])
def test_deepspeed_inline_and_process_give_the_same_numbers(adamw_mode):
    results = []
    for use_process in (False, True):
        assert CpuAdamBackend.wants_shared_memory(False, use_process) == use_process
        backend = CpuAdamBackend(use_torch=False, adamw_mode=adamw_mode, use_process=use_process)
        bufs = buffers(shared=use_process)
        backend.register(bufs)
        backend.start()
        try:
            assert (backend._proc is not None) == use_process
            step_backend(backend, bufs, 10)
            results.append([t.clone() for t in bufs])
        finally:
            backend.close()
    inline, process = results
    assert all(torch.equal(a, b) for a, b in zip(inline, process))
    torch.testing.assert_close(inline[0], reference(torch.optim.AdamW if adamw_mode else torch.optim.Adam, 10),
                               rtol=0, atol=1e-5)


def _worker_that_fails_to_start(conn, adamw_mode, buckets, num_threads):
    cpu_adam._worker_main(conn, adamw_mode, buckets, "not a thread count")  # set_num_threads raises in the child


def test_worker_start_failure_is_an_error_not_a_hang(monkeypatch):
    monkeypatch.setattr(cpu_adam.ds_op, "deepspeed_op", lambda: None)  # the parent's build step: not under test
    monkeypatch.setattr(cpu_adam, "_worker_main", _worker_that_fails_to_start)
    backend = CpuAdamBackend(use_torch=False, adamw_mode=True, use_process=True)
    backend.register(buffers(shared=True))
    try:
        with pytest.raises(RuntimeError, match="(?s)CPU Adam worker process failed to start.*set_num_threads"):
            backend.start()
    finally:
        backend.close()
    assert backend._proc is None


@pytest.mark.parametrize("requested,on_cuda,overlap,use_torch,gil_free,mode", [
    (None, False, True, False, True, "inline"),  # no CUDA: nothing to overlap with
    (None, True, False, False, True, "inline"),  # overlap off
    (None, True, True, True, False, "thread"),  # torch's kernel releases the GIL
    (None, True, True, False, True, "thread"),  # so does DeepSpeed's kernel through ds_op's build
    (None, True, True, False, False, "process"),  # where that build failed, DeepSpeed's binding holds it
    ("process", False, False, True, True, "process"),  # the caller's choice wins
])
def test_pick_worker_mode(monkeypatch, requested, on_cuda, overlap, use_torch, gil_free, mode):
    monkeypatch.setattr(cpu_adam.ds_op, "gil_free_op", lambda: object() if gil_free else None)
    assert pick_worker_mode(requested, on_cuda, overlap, use_torch) == mode


def test_worker_process_falls_back_to_a_thread_without_shared_memory(monkeypatch):
    assert fit_worker_mode_to_shared_memory("process", 10) == "process"
    monkeypatch.setattr(cpu_adam, "shared_memory_fits", lambda nbytes: False)
    with pytest.warns(UserWarning, match="/dev/shm"):
        assert fit_worker_mode_to_shared_memory("process", 10) == "thread"
    assert fit_worker_mode_to_shared_memory("inline", 10) == "inline"


def test_shared_memory_fits():
    assert cpu_adam.shared_memory_fits(1 << 20, path="/no/such/mount")  # nothing to run out of
    assert not cpu_adam.shared_memory_fits(1 << 62)


def test_a_worker_thread_steps_with_one_core_fewer(monkeypatch):
    """A background thread's OpenMP team leaves a core to the training thread; the training thread keeps its own."""
    import threading
    monkeypatch.setattr(cpu_adam.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    main_before = torch.get_num_threads()
    seen = []
    try:
        torch.set_num_threads(8)
        t = threading.Thread(target=lambda: (cpu_adam.size_worker_team(), seen.append(torch.get_num_threads())))
        t.start()
        t.join()
        assert seen == [7] and torch.get_num_threads() == 8
        cpu_adam.size_worker_team()  # the training thread itself: untouched
        assert torch.get_num_threads() == 8
    finally:
        torch.set_num_threads(main_before)
