"""speculate.py on a GPU: the CPU share stepped during backward (gradients staged on the compute stream, copied
on the D2H stream, stepped by the worker), kept or taken back at step(); races.

Each race test delays one side (the compute stream during backward, the worker's speculative steps, the
weight-copy stream) so that a missing wait would make the run read other numbers than with speculation off;
where nothing clips the two use the same kernels on the same gradients, so they must be equal bit for bit.
"""
import os
import time

import pytest
import torch

import ds_offload
import ds_offload.optimizer.tail_steps as T
from ds_offload.models import GPT, GPTConfig, synthetic_batch
from ds_offload.optimizer.zero import HybridZeroOptimizer

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

CFG = GPTConfig(vocab_size=1024, hidden=256, num_layers=4, num_heads=4, seq_len=128)
SLEEP = int(2e8)  # GPU cycles, ~0.1 s: longer than any copy here
NO_CLIP = 1e4  # clipping on, never clipping: every speculative step stands


@pytest.fixture(autouse=True)
def deterministic(monkeypatch):
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    monkeypatch.setattr(T, "CHUNK_NUMEL", 256 * 1024)  # ~20 chunks, several open at once during backward
    yield
    torch.use_deterministic_algorithms(False)


def config(stage, clip=NO_CLIP, fraction=0.75, fp16=False):
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": clip, "bf16": {"enabled": not fp16},
           "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
           "cpu_offloading": {"optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": fraction,
                                            "overlap_cpu_optimizer_d2h_h2d": True}}}
    if fp16:
        cfg["fp16"] = {"enabled": True}
    return cfg


def train(cfg, speculate, monkeypatch, steps=5, on_loss=None):
    monkeypatch.setattr(HybridZeroOptimizer, "speculate", speculate)
    monkeypatch.setattr(HybridZeroOptimizer, "speculation_trial_steps", None)  # every step, no timing trial
    torch.manual_seed(0)
    engine, *_ = ds_offload.initialize(model=GPT(CFG), config=cfg)
    losses = []
    for step in range(steps):
        x, y = synthetic_batch(CFG, 4, step, device="cuda")
        loss = engine(x, y)
        if on_loss is not None:
            on_loss(loss)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())  # no .item(): that would synchronize and hide the races
    return [v.item() for v in losses], engine


def _same(ref, engine):
    a, b = ref.module.state_dict(), engine.module.state_dict()
    return all(torch.equal(a[k], b[k]) for k in a)


def _close(*engines):
    for e in engines:
        e.ds_offload.close()


@pytest.mark.parametrize("stage", [1, 2])
def test_kept_equals_the_step_after_backward(dist, monkeypatch, stage):
    after, ref = train(config(stage), False, monkeypatch)
    ours, engine = train(config(stage), True, monkeypatch)
    s = engine.optimizer.speculation
    assert s is not None and s.speculated == 5 and s.rollbacks == 0
    assert ours == after and _same(ref, engine)
    _close(ref, engine)


@pytest.mark.parametrize("stage", [1, 2])
def test_the_gradient_copy_waits_for_backward(dist, monkeypatch, stage):
    """The compute stream is held at the start of backward: the staged gradients are written late, and the D2H
    stream's copies of them must wait."""
    after, ref = train(config(stage), False, monkeypatch)

    def late_backward(loss):
        loss.register_hook(lambda g: (torch.cuda._sleep(SLEEP), g)[1])
    ours, engine = train(config(stage), True, monkeypatch, on_loss=late_backward)
    assert engine.optimizer.speculation.speculated == 5
    assert ours == after and _same(ref, engine)
    _close(ref, engine)


def test_a_slow_speculative_step_is_waited_for(dist, monkeypatch):
    """The worker's speculative steps lag past the end of backward: step() and the next forward must wait."""
    after, ref = train(config(1, fraction=1.0), False, monkeypatch)
    speculate = T.TailSteps.speculate

    def slow(self, bucket_id, tail, c, before):
        time.sleep(0.02)
        return speculate(self, bucket_id, tail, c, before)
    monkeypatch.setattr(T.TailSteps, "speculate", slow)
    ours, engine = train(config(1, fraction=1.0), True, monkeypatch)
    assert ours == after and _same(ref, engine)
    _close(ref, engine)


def test_the_last_weight_copy_lands_before_the_next_speculative_step(dist, monkeypatch):
    """The weight copies of one step held on their stream: the next backward's CPU steps rewrite the masters those
    copies read, so they must come after."""
    after, ref = train(config(1), False, monkeypatch)
    run = T.TailSteps._run

    def late_copies(self, jobs):
        with torch.cuda.stream(self.h2d):
            torch.cuda._sleep(SLEEP)
        return run(self, jobs)
    monkeypatch.setattr(T.TailSteps, "_run", late_copies)
    ours, engine = train(config(1), True, monkeypatch)
    assert ours == after and _same(ref, engine)
    _close(ref, engine)


@pytest.mark.parametrize("stage", [1, 2])
def test_clipping_takes_the_step_back(dist, monkeypatch, stage):
    """clip 0.01 clips every step: the first speculates and is taken back, then the prediction keeps the step
    after backward. Taken back to fp32 ulps, so equal to the run without speculation within bf16 noise."""
    after, ref = train(config(stage, clip=0.01), False, monkeypatch)
    ours, engine = train(config(stage, clip=0.01), True, monkeypatch)
    s = engine.optimizer.speculation
    assert s.rollbacks == 1 and s.speculated == 1
    assert max(abs(a - b) for a, b in zip(ours, after)) < 1e-3
    _close(ref, engine)


def test_off_with_fp16_loss_scaling(dist, monkeypatch):
    _, engine = train(config(1, fp16=True), True, monkeypatch, steps=2)
    assert engine.optimizer.speculation is None and not engine.optimizer.split_info()["speculative"]
    _close(engine)
