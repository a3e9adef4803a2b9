"""`ds_offload.initialize` end to end on a GPU, every mode, against plain DeepSpeed of the same config.

bf16, ZeRO-0 (DeepSpeed's FP16_Optimizer), ZeRO-1 and ZeRO-2, gradient clipping on: the engine path users
train with. Kernels are
deterministic on both sides, and the noise floor (two plain runs) is asserted beside the parity.
"""
import gc
import os

import pytest
import torch

import ds_offload
from ds_offload.models import GPT, GPTConfig, synthetic_batch

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

CFG = GPTConfig(vocab_size=1024, hidden=256, num_layers=6, num_heads=4, seq_len=256)
STEPS = 8
MODES = {
    "activations": {"model": {"cpu_offloading": True, "cpu_offloading_num_layers": 3}},
    "activations_double_buffered_retained": {"model": {
        "cpu_offloading": True, "cpu_offloading_num_layers": 4, "cpu_offloading_double_buffering": True,
        "cpu_offloading_retain_pinned_cpu_buffers": True, "cpu_offloading_prefetch_depth": 2}},
    "optimizer_50_overlap": {"optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5,
                                           "overlap_cpu_optimizer_d2h_h2d": True}},
    "optimizer_100_torch": {"optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 1.0,
                                          "use_torch_optimizer_for_cpu_offload": True}},
    "combined": {"model": {"cpu_offloading": True, "cpu_offloading_num_layers": 3},
                 "optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5,
                               "overlap_cpu_optimizer_d2h_h2d": True}},
}


def ds_config(stage, block=None):
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0, "bf16": {"enabled": True},
           "zero_optimization": {"stage": stage},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}}
    if block is not None:
        cfg["cpu_offloading"] = block
    return cfg


@pytest.fixture(autouse=True)
def deterministic():
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)  # SDPA's backward has no deterministic twin on all builds
    yield
    torch.use_deterministic_algorithms(False)


def train(init, config):
    torch.manual_seed(0)
    engine, *_ = init(model=GPT(CFG), config=config)
    losses = []
    for step in range(STEPS):
        x, y = synthetic_batch(CFG, 4, step, device="cuda")
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    torch.cuda.synchronize()
    return losses, engine


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_matches_plain_deepspeed(dist, stage, mode):
    import deepspeed
    plain, e0 = train(deepspeed.initialize, ds_config(stage))
    again, e1 = train(deepspeed.initialize, ds_config(stage))
    del e0, e1
    noise = max(abs(a - b) for a, b in zip(plain, again))
    ours, engine = train(ds_offload.initialize, ds_config(stage, MODES[mode]))
    delta = max(abs(a - b) for a, b in zip(plain, ours))
    print(f"\n{mode} ZeRO-{stage}: max loss delta {delta:.2e} (noise floor of two plain runs {noise:.2e})")
    assert noise < 1e-3
    assert delta < 1e-3
    state = engine.ds_offload
    if "model" in MODES[mode]:
        stats = state.activation_offload.stats()
        assert stats["bytes_offloaded_last_step"] > 0 and stats["active"]
        assert "pinned CPU memory" in state.summary()
    if "optimizer" in MODES[mode]:
        assert state.optimizer.split_info()["cpu_numel"] > 0
        assert "of the optimizer on the CPU" in state.summary()
    state.close()


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_optimizer_offload_frees_12_bytes_per_offloaded_element(dist, stage):
    """Through initialize under ZeRO-0/1/2 (FP16_Optimizer, ZeRO optimizer): the fp32 masters and both moments of
    the offloaded share leave the GPU."""
    import deepspeed
    held = {}
    for fraction in (None, 0.5):
        block = None if fraction is None else {"optimizer": {"optimizer_cpu_offload": True,
                                                             "optimizer_offload_fraction": fraction}}
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        losses, engine = train(deepspeed.initialize if block is None else ds_offload.initialize,
                               ds_config(stage, block))
        engine.zero_grad()
        torch.cuda.synchronize()
        held[fraction] = torch.cuda.memory_allocated() - before
        offloaded = engine.optimizer.split_info()["cpu_numel"] if block else 0
        if block:
            engine.ds_offload.close()
        del engine
    freed = held[None] - held[0.5]
    print(f"\nZeRO-{stage}: {offloaded} elements offloaded, {freed} bytes freed ({freed / offloaded:.2f} per element)")
    assert freed >= 0.9 * 12 * offloaded
