"""transformers' own activation checkpointing with host offload (`activation_checkpointing_enable(offload=True)`,
Trainer's `gradient_checkpointing`) beside the block: never two offloads of the same tensors.

Its offload holds the checkpoints' inputs in pinned host memory (torch `save_on_cpu` around each checkpoint), so
with layer-level offload on the same layers the same tensors would move twice; the rules refuse layer offload
with any recomputation, naming the fix. Optimizer offload touches other tensors and combines with it.
"""
import pytest
import torch

import ds_offload
from ds_offload.errors import ConfigError

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("dist")]


def llama(offload=True):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    try:
        enable(offload=offload)
    except TypeError:  # transformers before the `offload` argument: the kwargs form
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"offload": offload})
    return model


def config(block):
    return {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1}, "steps_per_print": 10 ** 9,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "cpu_offloading": block}


@pytest.mark.parametrize("what", ["cpu_offloading_activations", "cpu_offloading_weights"])
def test_layer_offload_with_transformers_checkpoint_offload_is_refused(what, monkeypatch):
    import deepspeed
    monkeypatch.setattr(deepspeed, "initialize", lambda *a, **k: pytest.fail("must refuse first"))
    block = {"model": {"cpu_offloading": True, "cpu_offloading_num_layers": 1, "cpu_offloading_activations": False,
                       what: True}}
    with pytest.raises(ConfigError) as info:
        ds_offload.initialize(model=llama(), config=config(block))
    assert info.value.errors[0][0] == "cpu_offloading.model.cpu_offloading"
    assert "activation recomputation" in str(info.value) and "gradient checkpointing" in str(info.value)


def test_optimizer_offload_combines_with_it():
    # transformers' host offload pins memory, which needs an accelerator: on CPU the checkpointing alone.
    engine, *_ = ds_offload.initialize(model=llama(offload=torch.cuda.is_available()), config=config(
        {"optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5}}))
    engine.train()
    ids = torch.randint(0, 128, (2, 16), device=engine.device)
    losses = []
    for _ in range(3):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    engine.ds_offload.close()
