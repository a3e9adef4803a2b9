"""ds_op: DeepSpeed's CPU Adam kernel with a GIL-free binding gives DeepSpeed's numbers and lets Python run."""
import threading
import time

import pytest
import torch

from ds_offload.optimizer import ds_op

pytestmark = pytest.mark.slow  # builds two JIT extensions


def _state(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g), torch.randn(n, generator=g), torch.zeros(n), torch.zeros(n)]


@pytest.mark.parametrize("adamw_mode", [True, False])
def test_the_gil_free_build_equals_deepspeeds_op(adamw_mode):
    free, ds = ds_op.gil_free_op(), ds_op.deepspeed_op()
    assert free is not None, "the GIL-free build failed on this machine (see the warning)"
    a, b = _state(100_003, 0), _state(100_003, 0)  # not a multiple of the SIMD width: the scalar tail too
    free.create_adam(9101, 1e-3, 0.9, 0.999, 1e-8, 0.0, adamw_mode, False)
    ds.create_adam(9102, 1e-3, 0.9, 0.999, 1e-8, 0.0, adamw_mode, False)
    try:
        for t in range(1, 6):
            free.adam_update(9101, t, 1e-3, 0.9, 0.95, 1e-8, 0.1, True, *a)
            ds.adam_update(9102, t, 1e-3, 0.9, 0.95, 1e-8, 0.1, True, *b)
            a[1].mul_(0.5), b[1].mul_(0.5)
    finally:
        free.destroy_adam(9101)
        ds.destroy_adam(9102)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], _state(100_003, 0)[0])  # it stepped


def _longest_stall(op, opt_id):
    """(the longest the main thread went without executing bytecode while `op` stepped in a thread, the step's
    duration)."""
    op.create_adam(opt_id, 1e-3, 0.9, 0.999, 1e-8, 0.0, True, False)
    bufs = _state(16 << 20, 1)
    span = {}

    def work():
        t0 = time.perf_counter()
        op.adam_update(opt_id, 1, 1e-3, 0.9, 0.999, 1e-8, 0.0, True, *bufs)
        span["t"] = (t0, time.perf_counter())
    th = threading.Thread(target=work)
    ticks = []
    th.start()
    while th.is_alive():
        ticks.append(time.perf_counter())
    th.join()
    op.destroy_adam(opt_id)
    t0, t1 = span["t"]
    inside = [t0] + [t for t in ticks if t0 < t < t1] + [t1]
    return max(b - a for a, b in zip(inside, inside[1:])), t1 - t0


def test_a_step_in_a_thread_lets_python_run():
    """While an update runs in a thread, the main thread keeps executing bytecode; with DeepSpeed's own binding
    (the control: the measure can tell) it stalls for the whole update."""
    stall, duration = _longest_stall(ds_op.gil_free_op(), 9103)
    assert stall < duration / 2, (stall, duration)
    stall, duration = _longest_stall(ds_op.deepspeed_op(), 9104)
    assert stall > duration / 2, (stall, duration)


def test_a_failed_build_falls_back_to_deepspeeds_op_with_one_warning(monkeypatch):
    class Broken:
        def load(self, verbose=False):
            raise RuntimeError("no compiler here")
    ds_op.gil_free_op.cache_clear()
    monkeypatch.setattr(ds_op, "builder", Broken)
    try:
        with pytest.warns(UserWarning, match="(?s)could not build.*no compiler here.*worker process"):
            op = ds_op.load()
        assert ds_op.gil_free_op() is None and op is ds_op.deepspeed_op()
    finally:
        ds_op.gil_free_op.cache_clear()
