"""The offloaded layers' CPU steps during backward (ds_offload/weights/speculate.py), on CPU.

Against the same engine with `overlap_cpu_optimizer_d2h_h2d` off (each layer stepped after backward): where
nothing clips the step taken during backward is kept and the runs are equal bit for bit; where it clips the
step is taken back and redone, within a few fp32 ulps.
"""
import threading
import time
import warnings

import pytest
import torch

from ds_offload.weights.speculate import LayerSpeculation, ReadyFirstWorker

from test_offload import config, make, run

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("dist")]

NEVER = 1e6  # a gradient_clipping that never clips: the scale step() applies is exactly 1


@pytest.fixture(autouse=True)
def no_trial(monkeypatch):
    monkeypatch.setattr(LayerSpeculation, "trial_steps", None)  # every step it applies to (the trial: its test)


def spec_config(stage, dtype="fp32", clip=NEVER, overlap=True, **kw):
    cfg = config(stage, dtype, clip=clip, **kw)
    if overlap:
        cfg["cpu_offloading"]["optimizer"] = {"overlap_cpu_optimizer_d2h_h2d": True}
    return cfg


def masters(engine):
    engine.ds_offload.wait()  # a raw read of the buffers: the last step's kept steps may still be running
    return [L.master.clone() for L in engine.ds_offload.weights.layers]


def info(engine):
    return engine.optimizer.split_info()


def ulps(a, b):
    """Largest gap between `a` and `b` in fp32 eps of what the step's sum held: the weight plus its update (~lr,
    1e-3: an Adam step moves a weight by about lr); the undo's error scales with both."""
    return ((a - b).abs() / (torch.finfo(torch.float32).eps * (a.abs() + 1e-3))).max().item()


@pytest.mark.parametrize("stage,dtype", [(0, "bf16"), (1, "fp32"), (1, "bf16"), (2, "fp32"), (2, "bf16")])
def test_kept_equals_the_step_after_backward(stage, dtype):
    after = make(spec_config(stage, dtype, overlap=False))
    expected = run(after, 5)
    during = make(spec_config(stage, dtype))
    assert during.ds_offload.weights.speculation is not None
    got = run(during, 5)
    assert got == expected
    assert all(torch.equal(a, b) for a, b in zip(masters(during), masters(after)))
    assert all(torch.equal(a, b) for a, b in zip(during.module.state_dict().values(), after.module.state_dict().values()))
    assert info(during)["weights_speculated_steps"] == 5 and info(during)["weights_rollbacks"] == 0
    assert info(after)["weights_speculative"] is False
    for e in (after, during):
        e.ds_offload.close()


@pytest.mark.parametrize("stage", [1, 2])
def test_clipping_takes_the_step_back(stage):
    after = make(spec_config(stage, clip=0.05, overlap=False))
    during = make(spec_config(stage, clip=0.05))
    run(after, 1)
    run(during, 1)
    assert info(during)["weights_rollbacks"] == 1 and info(during)["weights_speculated_steps"] == 0
    assert max(ulps(a, b) for a, b in zip(masters(after), masters(during))) <= 4
    expected, got = run(after, 5, start=1), run(during, 5, start=1)
    assert max(abs(a - b) for a, b in zip(expected, got)) < 1e-5
    plain = run(make(spec_config(stage, clip=0.05, weights=False, overlap=False)), 6)
    assert max(abs(a - b) for a, b in zip(plain[1:], got)) < 1e-5
    # A clipped step disarms the next backward: one rollback, then the step after backward.
    assert info(during)["weights_rollbacks"] == 1
    for e in (after, during):
        e.ds_offload.close()


def test_the_prediction_rearms_after_a_step_that_did_not_clip():
    during, after = make(spec_config(1)), make(spec_config(1, overlap=False))
    clips = [NEVER, NEVER, 1e-3, NEVER, NEVER, NEVER]
    for step, clip in enumerate(clips):
        for e in (during, after):
            e.optimizer.clip_grad = clip
        assert run(during, 1, start=step) == pytest.approx(run(after, 1, start=step), abs=1e-6)
        if step == 2:  # taken back and redone at 1e-3 of the gradient: the undo's rounding (a few ulps of each
            # moment's sum, undo_adamw) weighs up to ~1e3 times more where a gradient dwarfs its history;
            # measured 7e-7, under 1e-3 of an update (lr) -- Adam's steps after it amplify such gaps further
            assert max((a - b).abs().max().item() for a, b in zip(masters(after), masters(during))) <= 1e-6
    # kept: steps 0, 1, 4, 5; step 2 taken back (it clipped); step 3 not speculated (step 2 clipped)
    assert info(during)["weights_speculated_steps"] == 4 and info(during)["weights_rollbacks"] == 1
    for e in (after, during):
        e.ds_offload.close()


def test_a_state_dict_between_backward_and_step_sees_no_step():
    from ds_offload.models import synthetic_batch

    from test_offload import CFG
    during, after = make(spec_config(2)), make(spec_config(2, overlap=False))
    run(during, 1)
    run(after, 1)
    x, y = synthetic_batch(CFG, 4, 1)
    for e in (during, after):
        e.backward(e(x, y))
    mid, ref = during.module.state_dict(), after.module.state_dict()
    for k in ref:
        assert ulps(ref[k].float(), mid[k].float()) <= 4, k  # the speculative steps were taken back
    for e in (during, after):
        e.step()
    assert info(during)["weights_rollbacks"] == 1
    assert max(ulps(a, b) for a, b in zip(masters(after), masters(during))) <= 4
    assert run(during, 3, start=2) == pytest.approx(run(after, 3, start=2), abs=1e-6)
    assert info(during)["weights_speculated_steps"] == 4  # steps 0, 2, 3, 4
    for e in (after, during):
        e.ds_offload.close()


def test_a_non_finite_gradient_is_never_stepped():
    engine = make(spec_config(1))
    run(engine, 1)
    engine.ds_offload.wait()
    layers = engine.ds_offload.weights.layers
    before = [(L.master.clone(), L.exp_avg.clone(), L.exp_avg_sq.clone(), L.step) for L in layers]
    poisoned = layers[0].params[0]
    handle = poisoned.register_hook(lambda g: torch.full_like(g, float("nan")))
    run(engine, 1, start=1)  # DeepSpeed skips the step (overflow): nothing of it may stay
    handle.remove()
    assert info(engine)["weights_rollbacks"] == 1
    for L, (m, a, v, step) in zip(layers, before):
        assert L.step == step
        if L is layers[0]:  # its gradient was NaN: never stepped, so bit for bit as before
            assert torch.equal(L.master, m) and torch.equal(L.exp_avg, a) and torch.equal(L.exp_avg_sq, v)
        else:  # stepped during backward, then taken back
            assert ulps(m, L.master) <= 4
            assert torch.allclose(L.exp_avg, a, atol=1e-9) and torch.allclose(L.exp_avg_sq, v, atol=1e-12)
    losses = run(engine, 2, start=2)
    assert all(torch.isfinite(torch.tensor(losses)))
    engine.ds_offload.close()


@pytest.mark.parametrize("stage,dtype", [(0, "bf16"), (2, "fp32")])
def test_an_idle_overlap_key_is_said(stage, dtype):
    """L2 weight decay, no optimizer share: the key would do nothing (ZeRO-0's FP16_Optimizer and ZeRO-1/2)."""
    cfg = spec_config(stage, dtype)
    cfg["optimizer"] = {"type": "Adam", "params": {"lr": 1e-3, "weight_decay": 0.01, "adam_w_mode": False}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = make(cfg)
    assert engine.ds_offload.weights.speculation is None
    said = [w for w in caught if "changes nothing" in str(w.message)]
    assert len(said) == 1 and "cpu_offloading.optimizer.overlap_cpu_optimizer_d2h_h2d" in str(said[0].message)
    engine.ds_offload.close()


def test_off_where_the_hooks_gradient_is_not_the_one_stepped():
    off = make(spec_config(1, overlap=False))
    assert off.ds_offload.weights.speculation is None
    off.ds_offload.close()
    cfg = spec_config(1)
    cfg["optimizer"] = {"type": "Adam", "params": {"lr": 1e-3, "weight_decay": 0.01, "adam_w_mode": False}}  # L2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        l2 = make(cfg)
    assert l2.ds_offload.weights.speculation is None
    assert any("overlap_cpu_optimizer_d2h_h2d" in str(w.message) and "changes nothing" in str(w.message)
               for w in caught)
    l2.ds_offload.close()
    # gradient accumulation: the window's sum is stepped, never a micro-step's gradient
    acc, plain = make(spec_config(1, gas=4)), make(spec_config(1, gas=4, overlap=False))
    assert run(acc, 3, gas=4) == run(plain, 3, gas=4)
    assert info(acc)["weights_speculated_steps"] == 0 and info(acc)["weights_rollbacks"] == 0
    for e in (acc, plain):
        e.ds_offload.close()


def test_the_worker_runs_the_newest_ready_call_first():
    gate, order = threading.Event(), []
    worker = ReadyFirstWorker("test")
    first = worker.submit(gate.wait)
    later = [worker.submit(lambda i=i: order.append(i)) for i in range(3)]  # no readiness: ready
    gate.set()
    for f in [first, *later]:
        f.result(timeout=10)
    assert order == [2, 1, 0]
    # with readiness (a gradient's copy landed): the newest ready first; none ready: the oldest (next to be)
    gate.clear()
    order.clear()
    landed = {0: True, 1: True, 2: False}
    first = worker.submit(gate.wait)
    later = [worker.submit(lambda i=i: order.append(i), ready=lambda i=i: landed[i]) for i in range(3)]
    gate.set()
    for f in [first, *later]:
        f.result(timeout=10)
    assert order == [1, 0, 2]
    worker.close()
    failing = ReadyFirstWorker("test")
    f = failing.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        f.result()
    failing.close()


def test_the_trial_turns_it_off_where_it_costs(monkeypatch):
    """Steps during backward made slow (the next forward waits for them): the timing trial keeps the schedule
    that steps after backward, and says so."""
    import logging
    import time

    import ds_offload.optimizer.tail_steps as T
    monkeypatch.setattr(LayerSpeculation, "trial_steps", 2)
    real = T.TailSteps.step_on_host

    def slow(self, *a, **k):
        if threading.current_thread().name == "ds_offload_weight_steps":
            time.sleep(0.3)
        return real(self, *a, **k)
    monkeypatch.setattr(T.TailSteps, "step_on_host", slow)
    engine = make(spec_config(1))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("ds_offload").addHandler(handler)
    logging.getLogger("ds_offload").setLevel(logging.INFO)
    try:
        run(engine, 8)
    finally:
        logging.getLogger("ds_offload").removeHandler(handler)
    t = info(engine)["weights_trial"]
    assert t["choice"] is False and t["with_s"] > t["without_s"]
    assert info(engine)["weights_speculated_steps"] == 4  # steps 0-3 (2 warm-up, 2 timed), 4-5 without, then off
    assert any("turned off" in r.getMessage() for r in records)
    engine.ds_offload.close()


def _running_kept_step(spans, fail_after=None, deferred=False):
    """A LayerSpeculation holding one kept step still running in its worker: it writes `spans` (value k + 1 in
    span k, slowly, in order, reporting each; raising after `fail_after` spans) into the layer's working copy,
    or with `deferred` into its fp32 master, leaving the bf16 working copy to the deferred cast."""
    from types import SimpleNamespace
    from ds_offload.weights.speculate import Spec
    n = spans[-1]
    master = torch.zeros(n)
    L = SimpleNamespace(index=0, numel=n, master=master, working=torch.zeros(n, dtype=torch.bfloat16) if deferred
                        else master)
    ls = LayerSpeculation(SimpleNamespace(layers=[L], group=None, on_cuda=False), use_torch=True)
    spec = Spec([])
    spec.deferred = deferred

    def run():
        a = 0
        for k, b in enumerate(spans):
            if k == fail_after:
                raise RuntimeError("the CPU step failed")
            time.sleep(0.05)
            master[a:b] = k + 1.25
            spec.advance(b)
            a = b
        return True
    spec.future = ls.worker.submit(run)
    spec.future.add_done_callback(spec.ended)
    if not deferred:
        spec.cast_done.set()
    ls.kept[0] = ls.last[0] = spec
    return ls, L, spec


@pytest.mark.parametrize("deferred", [False, True])
def test_a_fetch_copies_spans_as_the_running_step_writes_them(deferred):
    """The next forward's fetch of a layer whose kept step still runs copies each span once it is written (on
    the GPU, while the rest is stepped): every element it copied holds the update, none the value before. With
    the cast deferred it copies the fp32 master and casts (here into a bf16 CPU tensor, on a GPU on the device)."""
    ls, L, spec = _running_kept_step([3, 7, 10], deferred=deferred)
    assert ls.running(L) is spec
    dest = torch.full((10,), -1.0, dtype=L.working.dtype)
    ls.copy_while_running(L, spec, dest)
    assert spec.future.done() and not ls.kept
    want = torch.tensor([1.25] * 3 + [2.25] * 4 + [3.25] * 3).to(dest.dtype)
    assert torch.equal(dest, want)
    if deferred:  # the working copy is not cast yet: the fetch did not need it; the first reader casts it
        assert ls.running(L) is spec and not torch.equal(L.working, want)
        ls.finish(L)
        assert torch.equal(L.working, want) and ls.running(L) is None and spec.cast_done.is_set()
    ls.close()


def test_a_fetch_of_a_failed_running_step_raises_its_error():
    ls, L, spec = _running_kept_step([3, 7, 10], fail_after=1)
    with pytest.raises(RuntimeError, match="the CPU step failed"):
        ls.copy_while_running(L, spec, torch.zeros(10))
    ls.close()


def test_the_worker_takes_ready_steps_before_casts_and_casts_before_waiting():
    """Urgent calls (steps) whose input is ready go first, the newest first; a non-urgent one (a deferred cast)
    runs while no step is ready, rather than the worker blocking on the oldest step's input."""
    gate, order = threading.Event(), []
    worker = ReadyFirstWorker("test")
    hold = threading.Event()
    worker.submit(lambda: hold.wait())  # occupies the worker while the rest is queued
    worker.submit(lambda: (gate.wait(), order.append("step waiting")), ready=gate.is_set)  # waits as a step does
    worker.submit(lambda: order.append("cast"), urgent=False)
    worker.submit(lambda: order.append("step ready 1"))
    last = worker.submit(lambda: order.append("step ready 2"))
    hold.set()
    last.result(timeout=10)
    deadline = time.time() + 10
    while len(order) < 3 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert order == ["step ready 2", "step ready 1", "cast"]  # the waiting step has not run: its input is not ready
    gate.set()
    worker.close()
    assert order[-1] == "step waiting"
