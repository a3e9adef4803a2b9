"""accelerate on its own (`Accelerator(deepspeed_plugin=...)`) with the block, via `ds_offload.patch_deepspeed_initialize`:
the losses match the same run without the block."""
import pytest
import torch

import ds_offload
from ds_offload.models import GPT, GPTConfig, learnable_batch

accelerate = pytest.importorskip("accelerate")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("dist")]

CFG = GPTConfig(vocab_size=128, hidden=32, num_layers=3, num_heads=4, seq_len=16)


def config(block):
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
           "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}}
    if block:
        cfg["cpu_offloading"] = block
    return cfg


class _Wrapped(torch.nn.Module):
    """accelerate hands the model's output to backward: the GPT with its loss as the output."""

    def __init__(self):
        super().__init__()
        self.gpt = GPT(CFG)

    def forward(self, idx, tgt):
        return self.gpt(idx, tgt)


def run(block, steps=6):
    from accelerate import Accelerator, DeepSpeedPlugin
    from accelerate.state import AcceleratorState
    from accelerate.utils import DummyOptim
    AcceleratorState._reset_state(True)
    torch.manual_seed(0)
    model = _Wrapped()
    acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config(block)))
    with ds_offload.patch_deepspeed_initialize():
        model, opt = acc.prepare(model, DummyOptim(model.parameters()))
    losses = []
    for step in range(steps):
        x, y = learnable_batch(CFG, 4, step, device=acc.device)
        loss = model(x, y)
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, model


def test_accelerate_with_the_block_matches_without():
    plain, _ = run(None)
    block = {"model": {"cpu_offloading": True, "cpu_offloading_num_layers": 1, "cpu_offloading_activations": False,
                       "cpu_offloading_weights": True},
             "optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5}}
    ours, engine = run(block)
    state = getattr(engine, "ds_offload", None)
    assert state is not None and state.weights is not None and state.optimizer is not None
    assert max(abs(a - b) for a, b in zip(plain, ours)) < 1e-3
    assert ours[-1] < ours[0]
    state.close()
