"""HybridDeviceOptimizer as DeepSpeed's client optimizer, on DeepSpeed's CPU accelerator.

ZeRO-1/2 and DeepSpeed's BF16/FP16 wrappers replace the optimizer's params with their own flat fp32
partitions after construction; these tests check that the lazily built split follows, against plain
DeepSpeed AdamW on the same model and data.
"""
import dataclasses

import deepspeed
import pytest
import torch

from ds_offload.config import OptimizerOffloadConfig
from ds_offload.models import GPT, GPTConfig, synthetic_batch
from ds_offload.optimizer import HybridDeviceOptimizer, prepare_hybrid_optimizer

CFG = GPTConfig()
SETTINGS = OptimizerOffloadConfig(optimizer_cpu_offload=True, optimizer_offload_fraction=0.5,
                                  overlap_cpu_optimizer_d2h_h2d=True, use_torch_optimizer_for_cpu_offload=False,
                                  pin_cpu_grads=True, pin_cpu_params=True)

# conftest's one-rank process group; every test trains DeepSpeed engines with DeepSpeed's CPU Adam op.
pytestmark = [pytest.mark.usefixtures("dist"), pytest.mark.slow]


def ds_config(stage, dtype="fp32", gas=1, clip=0.0, lr=1e-3, scale_power=8):
    cfg = {"train_batch_size": 4 * gas, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": gas,
           "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.01}},
           "zero_optimization": {"stage": stage}, "gradient_clipping": clip, "steps_per_print": 10 ** 9}
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": scale_power, "loss_scale_window": 1000}
    return cfg


def engine(cfg, hybrid, fraction=0.5, seed=0):
    torch.manual_seed(seed)
    model = GPT(CFG)
    kw = {}
    if hybrid:
        settings = dataclasses.replace(SETTINGS, optimizer_offload_fraction=fraction)
        opt, cfg = prepare_hybrid_optimizer(cfg, settings, model.parameters())
        kw["optimizer"] = opt
    eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg, **kw)
    return eng


def train(eng, steps, gas=1, start=0, fixed_batch=False):
    losses = []
    for s in range(start, start + steps):
        for m in range(gas):
            x, y = synthetic_batch(CFG, 4, 0 if fixed_batch else s * gas + m, device=eng.device)
            loss = eng(x, y)
            eng.backward(loss)
            eng.step()
            losses.append(loss.item())
    return losses


def hybrid_of(eng):
    opt = eng.optimizer
    while not isinstance(opt, HybridDeviceOptimizer):
        opt = opt.optimizer
    return opt


def parity(cfg, steps=20, gas=1, fraction=0.5):
    ref = train(engine(cfg, False), steps, gas)
    eng = engine(cfg, True, fraction)
    got = train(eng, steps, gas)
    return max(abs(a - b) for a, b in zip(ref, got)), eng


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_loss_parity_fp32(stage):
    delta, eng = parity(ds_config(stage))
    assert delta < 1e-3
    info = hybrid_of(eng).split_info()
    assert info["cpu_numel"] == round(0.5 * info["total_numel"])  # f of this rank's own partition


@pytest.mark.parametrize("stage", [1, 2])
def test_loss_parity_bf16(stage):
    delta, _ = parity(ds_config(stage, "bf16"), steps=10)
    assert delta < 1e-3


def _fp16_supported():
    from deepspeed.accelerator import get_accelerator
    return get_accelerator().is_fp16_supported()


@pytest.mark.skipif(not _fp16_supported(), reason="DeepSpeed refuses fp16 on this CPU (no mkldnn fp16); runs where it has fp16 (CPUs with it, GPUs)")
def test_fp16_overflow_skips_both_shares():
    # 2**30 overflows at first: DeepSpeed halves the scale and skips those steps on the whole optimizer.
    cfg = ds_config(1, "fp16", scale_power=30)
    delta, eng = parity(cfg, steps=12)
    assert delta < 1e-3
    assert eng.skipped_steps > 0
    steps = {float(s["step"]) for s in hybrid_of(eng).state_dict()["state"].values()}
    assert steps == {float(eng.global_steps - eng.skipped_steps)}


@pytest.mark.parametrize("stage", [0, 2])
def test_grad_accumulation_and_clipping(stage):
    delta, _ = parity(ds_config(stage, gas=2, clip=0.05), steps=8, gas=2)
    assert delta < 1e-3


@pytest.mark.parametrize("stage", [0, 2])
def test_save_and_load_checkpoint_resumes(stage, tmp_path):
    cfg = ds_config(stage, lr=1e-2)
    eng = engine(cfg, True)
    train(eng, 5)
    eng.save_checkpoint(str(tmp_path), tag="t")
    expected = train(eng, 5, start=5)
    eng2 = engine(cfg, True, seed=1)  # different init: everything must come from the checkpoint
    train(eng2, 2, start=20)  # and stale masters already exist
    eng2.load_checkpoint(str(tmp_path), tag="t")
    got = train(eng2, 5, start=5)
    assert max(abs(a - b) for a, b in zip(expected, got)) < 1e-5


@pytest.mark.parametrize("stage", [0, 2])
def test_load_module_only_refreshes_masters(stage, tmp_path):
    cfg = ds_config(stage, lr=1e-2)
    eng = engine(cfg, True, fraction=1.0)
    first = train(eng, 25, fixed_batch=True)
    assert first[-1] < first[0] - 1.0  # the fixed batch is being memorised
    eng.save_checkpoint(str(tmp_path), tag="t")
    eng2 = engine(cfg, True, fraction=1.0, seed=1)
    train(eng2, 1, fixed_batch=True)  # masters exist and hold the random init
    eng2.load_checkpoint(str(tmp_path), tag="t", load_module_only=True)
    hybrid_of(eng2).refresh_masters_from_params()  # what ds_offload.initialize's engine does after loading
    after = train(eng2, 3, fixed_batch=True)
    assert max(after) < first[-1] + 0.5, (first[-1], after)
