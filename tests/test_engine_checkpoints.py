"""Checkpoints across the optimizer offload: with and without the block, in both directions.

A checkpoint made with `cpu_offloading.optimizer` on must resume under plain DeepSpeed (the block removed)
and the reverse; the resumed losses follow the uninterrupted run.
"""
import pytest
import torch

import ds_offload
from ds_offload.models import GPT, GPTConfig, synthetic_batch

pytestmark = pytest.mark.slow  # DeepSpeed's CPU Adam op and several engines

CFG = GPTConfig(vocab_size=256, hidden=32, num_layers=3, num_heads=4, seq_len=16)
BLOCK = {"optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5}}


def config(stage, offload):
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, "zero_optimization": {"stage": stage},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}}
    if offload:
        cfg["cpu_offloading"] = BLOCK
    return cfg


def run(engine, start, steps):
    losses = []
    for step in range(start, start + steps):
        x, y = synthetic_batch(CFG, 2, step, device=engine.device)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def make(stage, offload, seed=0):
    torch.manual_seed(seed)
    engine, *_ = ds_offload.initialize(model=GPT(CFG), config=config(stage, offload))
    return engine


@pytest.mark.parametrize("stage", [0, 1, 2])
@pytest.mark.parametrize("saved_with,loaded_with", [(True, False), (False, True)])
def test_resume_across_the_block(dist, tmp_path, stage, saved_with, loaded_with):
    whole = make(stage, saved_with)
    reference = run(whole, 0, 6)
    whole.ds_offload.close()

    first = make(stage, saved_with)
    run(first, 0, 3)
    first.save_checkpoint(str(tmp_path), tag="t")
    first.ds_offload.close()

    resumed = make(stage, loaded_with, seed=1)  # other weights: everything must come from the checkpoint
    path, _ = resumed.load_checkpoint(str(tmp_path), tag="t")
    assert path is not None
    after = run(resumed, 3, 3)
    resumed.ds_offload.close()
    # Plain DeepSpeed and the hybrid step the same Adam within float rounding of their kernels.
    assert max(abs(a - b) for a, b in zip(reference[3:], after)) < 1e-4, (reference[3:], after)
