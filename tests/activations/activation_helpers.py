"""Helpers of the activation tests: the small GPT, gradient comparison, hooks forced onto host copies."""
import torch

from ds_offload.activations import install_layer_offload
from ds_offload.models import GPT, GPTConfig

CFG = GPTConfig(vocab_size=256, hidden=32, num_layers=4, num_heads=4, seq_len=16)


def gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(CFG)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_equal_grads(a, b):
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys() and ga
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n


def install(layers, n, **kw):
    """Layer hooks that move CPU tensors too, so the host round trip runs without a GPU."""
    kw.setdefault("min_offload_bytes", 0)
    return install_layer_offload(layers, n, offload_cpu_tensors=True, **kw)
