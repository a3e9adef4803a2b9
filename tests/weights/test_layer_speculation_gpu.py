"""weights/speculate.py on a GPU: each offloaded layer stepped during backward (gradient copied on the D2H
stream with its finite flag, stepped by the worker thread), kept or taken back at step(); races.

Where nothing clips, the steps during backward use the same kernel on the same gradients as the steps after
backward, so the runs must be equal bit for bit; each race test delays one side so that a missing wait would
make them differ.
"""
import os
import time

import pytest
import torch

import ds_offload
import ds_offload.weights.offload as W
from ds_offload.models import GPT, synthetic_batch

from test_offload_gpu import CFG, N, SLEEP, _close
from test_offload_gpu import config as base_config
from test_offload_gpu import train as _train

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

NO_CLIP = 1e4  # clipping on, never clipping: every step during backward stands


@pytest.fixture(autouse=True)
def deterministic(monkeypatch):
    monkeypatch.setattr(W.LayerSpeculation, "trial_steps", None)  # every step it applies to, no timing trial
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


def config(stage, overlap=True, clip=NO_CLIP, activations=False, weights=True, fraction=None):
    cfg = base_config(stage, weights=weights, activations=activations, fraction=fraction)
    cfg["gradient_clipping"] = clip
    if weights:
        cfg["cpu_offloading"].setdefault("optimizer", {})["overlap_cpu_optimizer_d2h_h2d"] = overlap
    return cfg


def train(cfg, steps=6, init=None):
    return _train(cfg, steps, init)


def masters(engine):
    engine.ds_offload.wait()  # a raw read of the buffers: the last step's kept steps may still be running
    return [L.master.clone() for L in engine.ds_offload.weights.layers]


def info(engine):
    return engine.ds_offload.weights.speculation_info()


@pytest.mark.parametrize("stage,activations", [(0, False), (1, False), (2, False), (1, True)])
def test_kept_equals_the_step_after_backward(dist, stage, activations):
    after, e0 = train(config(stage, overlap=False, activations=activations))
    during, e1 = train(config(stage, activations=activations))
    assert info(e1)["weights_speculated_steps"] == 6 and info(e1)["weights_rollbacks"] == 0
    assert during == after
    assert all(torch.equal(a, b) for a, b in zip(masters(e0), masters(e1)))
    _close(e0, e1)


@pytest.mark.parametrize("gil_free", [True, False])
def test_with_the_optimizer_share_stepped_during_backward_too(dist, monkeypatch, gil_free):
    """Weights of the first layers and half of the rest's optimizer on the CPU, overlap on: the optimizer's
    deferred schedule steps in a thread (the GIL-free build of DeepSpeed's kernel) or, where that build failed, in
    the worker process, which the layers' steps during backward then share (one run at a time, the backend's
    lock) with the optimizer's own steps during backward. Nothing clips: equal bit for bit to the same config
    with the overlap off."""
    from ds_offload.optimizer import ds_op
    from ds_offload.optimizer.zero import HybridZeroOptimizer
    monkeypatch.setattr(HybridZeroOptimizer, "speculation_trial_steps", None)
    if not gil_free:
        monkeypatch.setattr(ds_op, "gil_free_op", lambda: None)
    after, e0 = train(config(1, overlap=False, fraction=0.5))
    during, e1 = train(config(1, fraction=0.5))
    assert e1.optimizer.backend.use_process != gil_free and e1.optimizer.speculation is not None
    assert info(e1)["weights_speculated_steps"] == 6 and e1.optimizer.speculation.speculated == 6
    assert during == after
    assert all(torch.equal(a, b) for a, b in zip(masters(e0), masters(e1)))
    _close(e0, e1)


def test_parity_with_plain_deepspeed_clipping_on(dist):
    """Clipping at 1.0 on the tiny model: steps clip, are taken back and the prediction disarms; the losses
    stay within 1e-3 of plain DeepSpeed, beside the noise floor of two plain runs."""
    import deepspeed
    plain, p0 = train(config(1, clip=1.0, weights=False), steps=10, init=deepspeed.initialize)
    again, p1 = train(config(1, clip=1.0, weights=False), steps=10, init=deepspeed.initialize)
    ours, engine = train(config(1, clip=1.0), steps=10)
    noise = max(abs(a - b) for a, b in zip(plain, again))
    delta = max(abs(a - b) for a, b in zip(plain, ours))
    s = info(engine)
    print(f"\nweights N={N} speculative, ZeRO-1 clip 1.0: max loss delta {delta:.2e} (noise floor {noise:.2e}); "
          f"{s['weights_speculated_steps']} steps kept, {s['weights_rollbacks']} taken back")
    assert noise < 1e-3 and delta < 1e-3
    _close(engine)


def test_the_step_waits_for_the_gradient_copy(dist, monkeypatch):
    """Compute stream late when a gradient is complete: the D2H copy, the finite flag and so the worker's step
    must wait for it (the worker waits on the D2H stream's event, not on the host's order)."""
    reference, ref = train(config(1))
    on_grad = W.WeightOffload._on_grad

    def late(self, L, p, i):
        torch.cuda._sleep(SLEEP // 10)
        p.grad = p.grad * 1.0  # the gradient now lives in memory written only after the sleep
        return on_grad(self, L, p, i)
    monkeypatch.setattr(W.WeightOffload, "_on_grad", late)
    delayed, engine = train(config(1))
    assert info(engine)["weights_speculated_steps"] == 6
    assert delayed == reference
    _close(ref, engine)


def test_the_next_forward_waits_for_a_slow_step(dist, monkeypatch):
    """The worker's step during backward made slow: step() returns before it is done, and the next forward's
    fetch of that layer (prefetch skips it, the use blocks) must wait for the written weights."""
    reference, ref = train(config(2))
    import ds_offload.optimizer.tail_steps as T
    real = T.TailSteps.step_on_host

    def slow(self, *a, **k):
        if getattr(a[1], "index", None) == 0:  # the layer the next forward needs first
            time.sleep(0.2)
        return real(self, *a, **k)
    monkeypatch.setattr(T.TailSteps, "step_on_host", slow)
    delayed, engine = train(config(2))
    assert info(engine)["weights_speculated_steps"] == 6
    assert delayed == reference
    assert all(torch.equal(a, b) for a, b in zip(masters(ref), masters(engine)))
    _close(ref, engine)


def test_the_next_forward_copies_a_running_step_span_by_span(dist, monkeypatch):
    """A dozen spans per layer, layer 0's slowed after each: its step is still running when the next forward
    needs it, so the fetch copies each span as it is written (copy_while_running). A copy ahead of the writes
    would give that forward old weights: losses and masters must equal the same run without the delay."""
    import ds_offload.optimizer.tail_steps as T
    monkeypatch.setattr(T, "HOST_SPAN_NUMEL", 1 << 16)  # on both runs: the same spans, the same arithmetic
    reference, ref = train(config(2))
    real, real_copy, streamed = T.TailSteps.step_on_host, W.LayerSpeculation.copy_while_running, []

    def slow_spans(self, *a, on_span=None, **k):
        if getattr(a[1], "index", None) == 0 and on_span is not None:
            def late(b):
                on_span(b)
                time.sleep(0.01)  # after reporting span k, before writing span k + 1
            return real(self, *a, on_span=late, **k)
        return real(self, *a, on_span=on_span, **k)

    def counted(self, L, spec, dest):
        streamed.append(L.index)
        return real_copy(self, L, spec, dest)
    monkeypatch.setattr(T.TailSteps, "step_on_host", slow_spans)
    monkeypatch.setattr(W.LayerSpeculation, "copy_while_running", counted)
    delayed, engine = train(config(2))
    assert streamed and set(streamed) == {0}
    assert delayed == reference
    assert all(torch.equal(a, b) for a, b in zip(masters(ref), masters(engine)))
    _close(ref, engine)


def test_forward_fetches_cast_the_fp32_master_on_the_device(dist, monkeypatch):
    """The worker never gets to the deferred casts (dropped here): every fetch of a kept layer (for forward and
    for backward) sends the fp32 master and casts it on the device; the host's cast happens when the layer's next
    step starts, or at a read. The device's rounding must be the host's: losses and masters equal to the run
    with the overlap off, bit for bit."""
    import concurrent.futures
    from ds_offload.weights.speculate import ReadyFirstWorker
    after, e0 = train(config(1, overlap=False))
    real_submit, real_copy, on_device = ReadyFirstWorker.submit, W.LayerSpeculation.copy_while_running, []

    def no_idle_casts(self, fn, ready=None, urgent=True):
        return real_submit(self, fn, ready, urgent) if urgent else concurrent.futures.Future()

    def counted(self, L, spec, dest):
        on_device.append(spec.deferred and not spec.cast_done.is_set())
        return real_copy(self, L, spec, dest)
    monkeypatch.setattr(ReadyFirstWorker, "submit", no_idle_casts)
    monkeypatch.setattr(W.LayerSpeculation, "copy_while_running", counted)
    during, e1 = train(config(1))
    assert on_device and all(on_device) and len(on_device) >= N * 4  # every kept layer's fetches
    assert during == after
    assert all(torch.equal(a, b) for a, b in zip(masters(e0), masters(e1)))
    _close(e0, e1)


def test_reads_after_step_see_the_update(dist, monkeypatch):
    """step() returns with layer 0's step still running: a state_dict right after must hold the stepped weights."""
    import ds_offload.optimizer.tail_steps as T
    real = T.TailSteps.step_on_host

    def slow(self, *a, **k):
        time.sleep(0.1)
        return real(self, *a, **k)
    _, ref = train(config(1, overlap=False), steps=2)
    monkeypatch.setattr(T.TailSteps, "step_on_host", slow)
    _, engine = train(config(1), steps=2)
    sd, want = engine.module.state_dict(), ref.module.state_dict()
    assert all(torch.equal(sd[k].cpu(), want[k].cpu()) for k in want)
    _close(ref, engine)


def test_pinned_bytes_flat_over_50_steps(dist):
    torch.manual_seed(0)
    engine, *_ = ds_offload.initialize(model=GPT(CFG), config=config(1))
    held = []
    for step in range(50):
        x, y = synthetic_batch(CFG, 4, step, device="cuda")
        engine.backward(engine(x, y))
        engine.step()
        if step in (4, 49):
            torch.cuda.synchronize()
            held.append(torch.cuda.host_memory_stats().get("allocated_bytes.all.current", 0))
    assert info(engine)["weights_speculated_steps"] == 50
    assert held[1] == held[0]
    _close(engine)
