"""The deferred CPU share under ZeRO-1/2, bf16 ZeRO-0 (FP16_Optimizer) and BF16_Optimizer on a GPU: races and
reads.

Each race test delays one side (the compute stream before `step()`, the weight-copy stream, the CPU step)
so that a missing wait would make the deferred run read other numbers than the inline one; the two runs
use the same kernels, so their losses and weights must be equal bit for bit. ZeRO-1/2 run here with the CPU
step after backward (speculation off: a step it takes back is equal only to fp32 ulps); the CPU step during
backward has its own race tests in test_speculate_gpu.py.
"""
import os
import time

import pytest
import torch

import ds_offload
import ds_offload.optimizer.tail_steps as T
from ds_offload.models import GPT, GPTConfig, synthetic_batch

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

CFG = GPTConfig(vocab_size=1024, hidden=256, num_layers=4, num_heads=4, seq_len=128)
SLEEP = int(2e8)  # GPU cycles, ~0.1 s: longer than any copy here


@pytest.fixture(autouse=True)
def deterministic(monkeypatch):
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    monkeypatch.setattr(T, "CHUNK_NUMEL", 256 * 1024)  # ~20 chunks: forwards wait for some, not others
    from ds_offload.optimizer.zero import HybridZeroOptimizer
    monkeypatch.setattr(HybridZeroOptimizer, "speculate", False)
    yield
    torch.use_deterministic_algorithms(False)


def config(overlap, stage=1, fraction=0.75):
    """`stage` "1a": bf16 ZeRO-1 with fp32 gradient accumulation (DeepSpeed's BF16_Optimizer)."""
    accum = {"data_types": {"grad_accum_dtype": "fp32"}} if stage == "1a" else {}
    return {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0, "bf16": {"enabled": True}, **accum,
            "zero_optimization": {"stage": 1 if stage == "1a" else stage}, "steps_per_print": 10 ** 9,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
            "cpu_offloading": {"optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": fraction,
                                             "overlap_cpu_optimizer_d2h_h2d": overlap}}}


def train(cfg, steps=5, before_step=None):
    torch.manual_seed(0)
    engine, *_ = ds_offload.initialize(model=GPT(CFG), config=cfg)
    losses = []
    for step in range(steps):
        x, y = synthetic_batch(CFG, 4, step, device="cuda")
        loss = engine(x, y)
        engine.backward(loss)
        if before_step is not None:
            before_step()
        engine.step()
        losses.append(loss.detach())  # no .item(): that would synchronize and hide the races
    return [v.item() for v in losses], engine


def _close(*engines):
    for e in engines:
        e.ds_offload.close()


@pytest.mark.parametrize("stage", [0, 1, "1a", 2])
def test_deferred_equals_inline(dist, stage):
    inline, ref = train(config(False, stage))
    deferred, engine = train(config(True, stage))
    assert engine.optimizer.split_info()["deferred"]
    assert deferred == inline
    a, b = ref.module.state_dict(), engine.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    _close(ref, engine)


@pytest.mark.parametrize("stage", [0, 1, "1a"])
def test_gradient_copy_waits_for_the_compute_stream(dist, stage):
    """The partition's (group's) gradient is flattened on the compute stream inside step(); the side stream's
    copy of it to the host must wait for that, however late the compute stream runs."""
    inline, ref = train(config(False, stage))
    deferred, engine = train(config(True, stage), before_step=lambda: torch.cuda._sleep(SLEEP))
    assert deferred == inline
    _close(ref, engine)


@pytest.mark.parametrize("stage", [0, 1, "1a"])
def test_forward_waits_for_the_weight_copy_stream(dist, monkeypatch, stage):
    """Weight copies delayed on their stream: the next forward must wait for them on the device."""
    inline, ref = train(config(False, stage))
    run = T.TailSteps._run

    def late_copies(self, jobs):
        with torch.cuda.stream(self.h2d):
            torch.cuda._sleep(SLEEP)
        return run(self, jobs)
    monkeypatch.setattr(T.TailSteps, "_run", late_copies)
    deferred, engine = train(config(True, stage))
    assert deferred == inline
    _close(ref, engine)


def test_forward_waits_for_a_slow_cpu_step(dist, monkeypatch):
    inline, ref = train(config(False, fraction=1.0))
    run = T.TailSteps._run

    def slow(self, jobs):
        time.sleep(0.2)
        return run(self, jobs)
    monkeypatch.setattr(T.TailSteps, "_run", slow)
    deferred, engine = train(config(True, fraction=1.0))
    assert deferred == inline
    engine.ds_offload.wait()
    for p, q in zip(ref.module.parameters(), engine.module.parameters()):
        assert torch.equal(p, q)
    _close(ref, engine)


def test_state_dict_and_checkpoint_see_the_last_step(dist, tmp_path):
    _, ref = train(config(False))
    _, engine = train(config(True))
    # No wait() here: state_dict and save_checkpoint land the in-flight step themselves.
    a, b = ref.module.state_dict(), engine.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    _, engine2 = train(config(True))
    engine2.save_checkpoint(str(tmp_path), tag="t")
    saved = torch.load(tmp_path / "t" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.equal(a[k].cpu(), saved[k].cpu()) for k in a)
    _close(ref, engine, engine2)
