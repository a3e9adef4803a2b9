"""HybridBF16Optimizer: DeepSpeed's BF16_Optimizer (bf16 ZeRO-1, fp32 gradient accumulation) with each rank's
fp32 partition cut in two.

Against plain DeepSpeed of the same config: the fp32 masters, losses, where each part lives, overlap,
checkpoints both ways, module-only loads and DeepSpeed's fp32 views.
"""
import time

import pytest
import torch

import ds_offload
from ds_offload.models import GPT, GPTConfig, synthetic_batch
from ds_offload.optimizer.bf16 import HybridBF16Optimizer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("dist")]  # DeepSpeed engines, CPU Adam and FusedAdam ops

CFG = GPTConfig(vocab_size=256, hidden=32, num_layers=3, num_heads=4, seq_len=16)


def config(fraction=None, clip=0.05, gas=1, overlap=False, lr=1e-3):
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": gas, "gradient_clipping": clip,
           "zero_optimization": {"stage": 1}, "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"},
           "steps_per_print": 10 ** 9, "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.01}}}
    if fraction is not None:
        cfg["cpu_offloading"] = {"optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": fraction,
                                               "overlap_cpu_optimizer_d2h_h2d": overlap}}
    return cfg


def train(cfg, steps=10, gas=1, seed=0, engine=None, start=0):
    if engine is None:
        torch.manual_seed(seed)
        engine, *_ = ds_offload.initialize(model=GPT(CFG), config=cfg)
    losses = []
    for step in range(start, start + steps):
        for micro in range(gas):
            x, y = synthetic_batch(CFG, 4, step * gas + micro, device=engine.device)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    return losses, engine


def full_masters(engine):
    from deepspeed.utils import safe_get_full_fp32_param
    return {n: safe_get_full_fp32_param(p).detach().cpu().clone() for n, p in engine.module.named_parameters()}


@pytest.mark.parametrize("gas,clip", [(1, 0.05), (4, 0.05), (1, 0.0)])  # the tiny model's norm is ~1: 0.05 clips
@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_parity_with_plain_deepspeed(fraction, gas, clip):
    # The fp32 masters after one step (read through DeepSpeed's safe_get_full_fp32_param, which ds_offload serves
    # on the cut partition) agree to fp32 rounding; losses within 1e-3 over 10 steps (4 with accumulation), the
    # bf16 noise of two Adam kernels on this tiny model (as in test_fused.py).
    _, ref = train(config(clip=clip, gas=gas), steps=1, gas=gas)
    _, engine = train(config(fraction, clip=clip, gas=gas), steps=1, gas=gas)
    assert type(ref.optimizer).__name__ == "BF16_Optimizer" and isinstance(engine.optimizer, HybridBF16Optimizer)
    want, got = full_masters(ref), full_masters(engine)
    assert all(torch.allclose(want[k], got[k], rtol=0, atol=2e-7) for k in want)
    engine.ds_offload.close()
    steps = 10 if gas == 1 else 4
    plain, _ = train(config(clip=clip, gas=gas), steps=steps, gas=gas)
    ours, engine = train(config(fraction, clip=clip, gas=gas), steps=steps, gas=gas)
    assert max(abs(a - b) for a, b in zip(plain, ours)) < 1e-3
    engine.ds_offload.close()


@pytest.mark.parametrize("fraction", [0.3, 1.0])
def test_where_each_part_lives(fraction):
    _, engine = train(config(fraction), steps=2)
    opt = engine.optimizer
    for head, tail, parts in zip(opt.fp32_groups_flat_partition, opt.tails, opt.bf16_partitioned_groups):
        lp = parts[0]
        assert tail.master.numel() == round(fraction * lp.numel()) and head.numel() == lp.numel() - tail.numel
        assert head.device == lp.device and head.dtype == torch.float32
        for t in (tail.master, tail.grad, tail.exp_avg, tail.exp_avg_sq):
            assert t.device.type == "cpu" and t.dtype == torch.float32
        state = opt.optimizer.state.get(head, {})
        assert all(state[k].numel() == head.numel() for k in ("exp_avg", "exp_avg_sq") if k in state)
        assert torch.equal(lp.detach()[tail.start:].cpu(), tail.master.to(lp.dtype))  # rounded CPU masters
        assert tail.step == 2
    assert "fp32 masters and moments are freed" in engine.ds_offload.summary()
    engine.ds_offload.close()


def test_deferred_is_inline_bit_for_bit_and_waits_for_a_slow_step(monkeypatch):
    import ds_offload.optimizer.tail_steps as T
    monkeypatch.setattr(T, "CHUNK_NUMEL", 3000)  # several chunks, so forwards wait for some and not others
    inline, ref = train(config(0.6), steps=5)
    run = T.TailSteps._run

    def slow_run(self, jobs):
        time.sleep(0.2)
        return run(self, jobs)
    monkeypatch.setattr(T.TailSteps, "_run", slow_run)
    deferred, engine = train(config(0.6, overlap=True), steps=5)
    assert engine.optimizer.split_info()["deferred"] and not ref.optimizer.split_info()["deferred"]
    assert deferred == inline
    a, b = ref.module.state_dict(), engine.module.state_dict()  # the state_dict pre-hook lands the last step
    assert all(torch.equal(a[k], b[k]) for k in a)
    for e in (ref, engine):
        e.ds_offload.close()


@pytest.mark.parametrize("saved_with,loaded_with", [(0.5, 0.5), (0.5, None), (None, 0.5), (0.5, 1.0)])
def test_checkpoint_round_trips(saved_with, loaded_with, tmp_path):
    _, engine = train(config(saved_with, lr=1e-2), steps=6)
    engine.save_checkpoint(str(tmp_path), tag="t")
    expected, _ = train(None, steps=4, engine=engine, start=6)
    torch.manual_seed(1)
    resumed, *_ = ds_offload.initialize(model=GPT(CFG), config=config(loaded_with, lr=1e-2))
    resumed.load_checkpoint(str(tmp_path), tag="t")
    got, _ = train(None, steps=4, engine=resumed, start=6)
    if saved_with == loaded_with:
        assert got == expected  # the same split: the same arithmetic
    else:
        assert max(abs(a - b) for a, b in zip(expected, got)) < 1e-3
    for e in (engine, resumed):
        if e.ds_offload.optimizer is not None:
            e.ds_offload.close()


def test_module_only_load_refreshes_the_cpu_masters(tmp_path):
    train(config(1.0, lr=1e-2), steps=6)[1].save_checkpoint(str(tmp_path), tag="t")
    after = []
    for cfg in (config(lr=1e-2), config(1.0, lr=1e-2, overlap=True)):
        _, engine = train(cfg, steps=2, seed=1)
        engine.load_checkpoint(str(tmp_path), tag="t", load_module_only=True)
        after.append(train(None, steps=2, engine=engine, start=6)[0])
    assert after[0][0] == after[1][0]  # the same loaded weights
    assert max(abs(a - b) for a, b in zip(*after)) < 1e-3, after
