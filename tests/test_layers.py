import pytest
import torch.nn as nn

from ds_offload import ConfigError
from ds_offload.layers import find_layers
from ds_offload.models import GPT, GPTConfig

CFG = GPTConfig(vocab_size=64, hidden=16, num_layers=3, num_heads=2, seq_len=8)


def test_gpt_blocks_found():
    model = GPT(CFG)
    layers, where = find_layers(model)
    assert where == "blocks" and layers == list(model.blocks)


def test_wrapped_model_is_unwrapped():
    class Wrapper(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m
    model = GPT(CFG)
    assert find_layers(Wrapper(model))[0] == list(model.blocks)


def test_explicit_layers_win():
    model = GPT(CFG)
    assert find_layers(model, layers=model.blocks[:2])[0] == list(model.blocks[:2])
    assert find_layers(model, layers="blocks")[1] == "blocks"
    with pytest.raises(ConfigError, match="layers='model.layers'"):
        find_layers(model, layers="nope.layers")


def test_largest_same_class_module_list_fallback():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixed = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])
            self.stack = nn.ModuleList(nn.Linear(2, 2) for _ in range(5))
    layers, where = find_layers(Odd())
    assert where == "stack" and len(layers) == 5


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_transformers_families(family):
    transformers = pytest.importorskip("transformers")
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128))
        expect, path = model.model.layers, "model.layers"
    elif family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=128))
        expect, path = model.transformer.h, "transformer.h"
    else:
        model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=128))
        expect, path = model.gpt_neox.layers, "gpt_neox.layers"
    layers, where = find_layers(model)
    assert where == path and layers == list(expect)


# ------------------------------------------------------------------------------------------ bad layers=
@pytest.mark.parametrize("bad,needle", [
    (5, "int 5"),
    (3.5, "float"),
    (nn.Linear(2, 2), "a single Linear module"),
    (nn.ModuleList(), "empty layer list"),
    ([], "empty layer list"),
    ((), "empty layer list"),
    ([nn.Linear(2, 2), "x"], "item 1 is str"),
    ({"a": nn.Linear(2, 2)}, "dict"),
])
def test_bad_layers_is_a_config_error_naming_layers(bad, needle):
    model = GPT(CFG)
    with pytest.raises(ConfigError) as e:
        find_layers(model, layers=bad)
    (path, msg), = e.value.errors
    assert path == "layers"
    assert needle in msg
    assert "dotted path" in msg and "non-empty sequence of nn.Modules" in msg and "Fix:" in msg


def test_single_block_module_is_refused_not_iterated():
    model = GPT(CFG)
    with pytest.raises(ConfigError, match="single"):
        find_layers(model, layers=model.blocks[0])


def test_empty_module_list_at_dotted_path_is_refused():
    class Empty(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList()
    with pytest.raises(ConfigError, match="empty layer list .'blocks' on Empty"):
        find_layers(Empty(), layers="blocks")
    with pytest.raises(ConfigError, match="layers"):
        find_layers(Empty(), layers="")


def test_sequences_of_modules_accepted():
    model = GPT(CFG)
    blocks = list(model.blocks)
    assert find_layers(model, layers=tuple(blocks)) == (blocks, "layers=")
    assert find_layers(model, layers=nn.Sequential(*blocks[:2]))[0] == blocks[:2]


def test_initialize_reports_empty_layers_as_layers_not_as_not_found():
    ds_offload = pytest.importorskip("ds_offload")
    model = GPT(CFG)
    config = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
              "cpu_offloading": {"model": {"cpu_offloading": True}}}
    with pytest.raises(ConfigError) as e:
        ds_offload.initialize(model=model, config=config, layers=nn.ModuleList())
    assert [p for p, _ in e.value.errors] == ["layers"]
    assert "no transformer layer list found" not in str(e.value)
