"""HybridZeroOptimizer: DeepSpeed's ZeRO-1/2 optimizer with each rank's fp32 partition cut in two.

Against plain DeepSpeed of the same config (bf16 and fp32, clipping on and off, gradient accumulation 1
and 4), where each part lives, and what is freed on the device.
"""
import pytest
import torch

import ds_offload
from ds_offload.models import GPT, GPTConfig, synthetic_batch
from ds_offload.optimizer.zero import HybridZeroOptimizer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("dist")]  # DeepSpeed engines, CPU Adam op

CFG = GPTConfig(vocab_size=256, hidden=32, num_layers=3, num_heads=4, seq_len=16)


def config(stage, dtype="fp32", clip=1.0, gas=1, fraction=None, torch_cpu=False, overlap=False):
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": gas, "gradient_clipping": clip,
           "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}}
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 30, "loss_scale_window": 1000}
    if fraction is not None:
        cfg["cpu_offloading"] = {"optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": fraction,
                                               "use_torch_optimizer_for_cpu_offload": torch_cpu,
                                               "overlap_cpu_optimizer_d2h_h2d": overlap}}
    return cfg


def train(cfg, steps=20, gas=1):
    torch.manual_seed(0)
    engine, *_ = ds_offload.initialize(model=GPT(CFG), config=cfg)
    losses = []
    for step in range(steps):
        for micro in range(gas):
            x, y = synthetic_batch(CFG, 4, step * gas + micro, device=engine.device)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    return losses, engine


@pytest.mark.parametrize("gas", [1, 4])
@pytest.mark.parametrize("clip", [0.05, 0.0])  # the tiny model's norm is ~1: 0.05 clips
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [1, 2])
def test_parity_with_plain_deepspeed(stage, dtype, clip, gas):
    # bf16 over 10 steps: beyond, the bf16 rounding of weights that two Adam kernels (DeepSpeed's FusedAdam,
    # its CPU Adam) computed a few ulps apart moves the loss by ~1e-3 either way, for the client-optimizer
    # path as much as for this one; fp32 holds 1e-6 over 20 steps.
    steps = 20 if dtype == "fp32" else 10
    plain, _ = train(config(stage, dtype, clip, gas), steps=steps, gas=gas)
    ours, engine = train(config(stage, dtype, clip, gas, fraction=0.5), steps=steps, gas=gas)
    assert isinstance(engine.optimizer, HybridZeroOptimizer)
    assert max(abs(a - b) for a, b in zip(plain, ours)) < (1e-3 if dtype == "bf16" else 1e-5)
    engine.ds_offload.close()


def test_fraction_zero_is_plain_deepspeed_bit_for_bit():
    plain, _ = train(config(2, "bf16"), steps=5)
    ours, engine = train(config(2, "bf16", fraction=0.0), steps=5)
    assert ours == plain and engine.optimizer.split_info()["cpu_numel"] == 0


@pytest.mark.parametrize("fraction", [0.3, 1.0])
def test_where_each_part_lives(fraction):
    _, engine = train(config(1, "bf16", fraction=fraction), steps=2)
    opt = engine.optimizer
    for head, tail, lp in zip(opt.single_partition_of_fp32_groups, opt.tails,
                              (g[0] for g in opt.parallel_partitioned_bit16_groups)):
        size = lp.numel()
        assert tail.master.numel() == round(fraction * size) and head.numel() == size - tail.master.numel()
        assert head.device == lp.device and head.dtype == torch.float32
        for t in (tail.master, tail.grad, tail.exp_avg, tail.exp_avg_sq):
            assert t.device.type == "cpu" and t.dtype == torch.float32
        state = opt.optimizer.state.get(head, {})
        assert all(state[k].numel() == head.numel() for k in ("exp_avg", "exp_avg_sq") if k in state)
        # The low-precision weights of the tail are the rounded CPU masters.
        assert torch.equal(lp.detach()[tail.start:].cpu(), tail.master.to(lp.dtype))
        assert tail.step == 2
    info = opt.split_info()
    assert info["cpu_numel"] == sum(t.master.numel() for t in opt.tails)
    engine.ds_offload.close()


@pytest.mark.parametrize("backend", [False, True])
def test_both_cpu_backends(backend):
    plain, _ = train(config(2, "bf16"), steps=10)
    ours, engine = train(config(2, "bf16", fraction=1.0, torch_cpu=backend), steps=10)
    assert max(abs(a - b) for a, b in zip(plain, ours)) < 1e-3
    engine.ds_offload.close()


def _fp16_supported():
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().is_fp16_supported()


@pytest.mark.skipif(not _fp16_supported(), reason="DeepSpeed refuses fp16 on this CPU; runs where it has fp16")
def test_fp16_overflow_skips_both_parts():
    plain, ref = train(config(1, "fp16"), steps=12)
    ours, engine = train(config(1, "fp16", fraction=0.5), steps=12)
    assert engine.skipped_steps == ref.skipped_steps > 0
    assert max(abs(a - b) for a, b in zip(plain, ours)) < 1e-3
    assert all(t.step == engine.global_steps - engine.skipped_steps for t in engine.optimizer.tails if t)
    engine.ds_offload.close()


def test_chunked_transfers_match_one_chunk(monkeypatch):
    import ds_offload.optimizer.tail_steps as T
    whole, _ = train(config(2, "bf16", fraction=1.0), steps=5)
    monkeypatch.setattr(T, "CHUNK_NUMEL", 1000)  # the tail's ~33k elements in 34 chunks
    monkeypatch.setattr(T, "HOST_SPAN_NUMEL", 333)  # each stepped in spans on the host
    chunked, engine = train(config(2, "bf16", fraction=1.0), steps=5)
    assert chunked == whole
    engine.ds_offload.close()


# ------------------------------------------------------------- overlap: step() returns before the tail lands
@pytest.mark.parametrize("gas", [1, 4])
@pytest.mark.parametrize("stage", [1, 2])
def test_deferred_tail_is_the_inline_one_bit_for_bit(stage, gas, monkeypatch):
    import ds_offload.optimizer.tail_steps as T
    monkeypatch.setattr(T, "CHUNK_NUMEL", 3000)  # several chunks, so forwards wait for some and not others
    inline, ref = train(config(stage, "bf16", gas=gas, fraction=0.6), steps=6, gas=gas)
    deferred, engine = train(config(stage, "bf16", gas=gas, fraction=0.6, overlap=True), steps=6, gas=gas)
    assert engine.optimizer.split_info()["deferred"] and not ref.optimizer.split_info()["deferred"]
    assert deferred == inline
    a, b = ref.module.state_dict(), engine.module.state_dict()  # the state_dict pre-hook lands the last step
    assert all(torch.equal(a[k], b[k]) for k in a)
    for e in (ref, engine):
        e.ds_offload.close()


def test_forward_waits_for_a_slow_cpu_step(monkeypatch):
    """A CPU step that lags behind: the next forward must still see its weights (on CPU the worker thread writes
    them; without the waits the forward reads the old ones and the losses differ)."""
    import time

    import ds_offload.optimizer.tail_steps as T
    monkeypatch.setattr(T, "CHUNK_NUMEL", 2000)
    inline, ref = train(config(1, "fp32", fraction=1.0), steps=4)
    run = T.TailSteps._run

    def slow_run(self, jobs):
        time.sleep(0.3)
        return run(self, jobs)
    monkeypatch.setattr(T.TailSteps, "_run", slow_run)
    deferred, engine = train(config(1, "fp32", fraction=1.0, overlap=True), steps=4)
    assert deferred == inline
    engine.ds_offload.wait()
    for p, q in zip(ref.module.parameters(), engine.module.parameters()):
        assert torch.equal(p, q)
    for e in (ref, engine):
        e.ds_offload.close()


def test_a_failed_cpu_step_is_an_error_at_the_next_use():
    _, engine = train(config(2, "fp32", fraction=0.5, overlap=True), steps=1)
    backend = engine.optimizer.backend

    def broken(*_):
        raise RuntimeError("CPU Adam exploded")
    backend.run = broken
    x, y = synthetic_batch(CFG, 4, 99, device=engine.device)
    engine.backward(engine(x, y))
    engine.step()  # returns: the failure is in the worker thread
    with pytest.raises(RuntimeError, match="CPU Adam exploded"):
        engine(x, y)
    engine.ds_offload.close()


@pytest.mark.parametrize("how", ["load_checkpoint", "load_state_dict"])
def test_a_load_waits_for_a_slow_cpu_step(how, tmp_path, monkeypatch):
    """A load while the last step's CPU share is still being written: the load must land it first, or the
    worker overwrites the loaded weights afterwards (on CPU the worker thread writes them)."""
    import time

    import ds_offload.optimizer.tail_steps as T
    _, engine = train(config(1, "fp32", fraction=1.0, overlap=True), steps=2)
    engine.save_checkpoint(str(tmp_path), tag="t")
    saved = {k: v.clone() for k, v in engine.module.state_dict().items()}
    run = T.TailSteps._run

    def slow_run(self, jobs):
        time.sleep(0.5)
        return run(self, jobs)
    monkeypatch.setattr(T.TailSteps, "_run", slow_run)
    x, y = synthetic_batch(CFG, 4, 99, device=engine.device)
    engine.backward(engine(x, y))
    engine.step()  # returns with the CPU step still asleep
    if how == "load_checkpoint":
        engine.load_checkpoint(str(tmp_path), tag="t", load_module_only=True)
    else:
        engine.module.load_state_dict(saved)
    time.sleep(0.7)  # a worker the load did not wait for has written by now
    for k, v in engine.module.state_dict().items():
        assert torch.equal(v, saved[k]), k
    engine.ds_offload.close()
