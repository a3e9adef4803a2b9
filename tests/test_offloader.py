"""The fine-grained `ActivationOffloader` API and the savings estimator, on CPU."""
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ds_offload.models import GPT, GPTConfig, synthetic_batch
from ds_offload.offloader import ActivationOffloader, OffloadedTensor, estimate_offloading_memory_savings

CFG = GPTConfig(vocab_size=256, hidden=32, num_layers=3, num_heads=4, seq_len=16)


def _gpt():
    torch.manual_seed(0)
    return GPT(CFG)


def _assert_equal_grads(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for n in pa:
        assert torch.equal(pa[n].grad, pb[n].grad), n


def _forced(**kw):
    kw.setdefault("offload_threshold_mb", 0.0)
    return ActivationOffloader(offload_cpu_tensors=True, **kw)


def test_estimator_reference_numbers():
    assert estimate_offloading_memory_savings(8000, 0.5) == {
        "gpu_memory_mb": 4000.0, "gpu_savings_mb": 4000.0, "cpu_usage_mb": 4000.0, "savings_percent": 50.0}
    assert estimate_offloading_memory_savings(1000, 0.0)["gpu_memory_mb"] == 1000.0
    assert estimate_offloading_memory_savings(1000, 1)["savings_percent"] == 100.0


@pytest.mark.parametrize("args,exc,text", [
    ((8000, 1.5), ValueError, "offload_ratio must be in [0.0, 1.0]"),
    ((8000, -0.1), ValueError, "offload_ratio"),
    ((-1, 0.5), ValueError, "activation_memory_gpu_mb must be >= 0"),
    (("8000", 0.5), TypeError, "activation_memory_gpu_mb must be a finite number"),
    ((8000, None), TypeError, "offload_ratio must be a finite number"),
    ((math.nan, 0.5), TypeError, "finite"),
    ((8000, True), TypeError, "offload_ratio"),
])
def test_estimator_input_errors(args, exc, text):
    with pytest.raises(exc) as err:
        estimate_offloading_memory_savings(*args)
    assert text in str(err.value)


@pytest.mark.parametrize("kw", [{"offload_threshold_mb": -1}, {"offload_threshold_mb": "10"},
                                {"prefetch_ahead": -1}, {"prefetch_ahead": 1.5}])
def test_constructor_errors(kw):
    with pytest.raises(ValueError):
        ActivationOffloader(**kw)


def test_cpu_without_cuda_changes_nothing():
    ref, m = _gpt(), _gpt()
    x, y = synthetic_batch(CFG, 2)
    ref(x, y).backward()
    off = ActivationOffloader(enabled=True, offload_threshold_mb=0.0, prefetch_ahead=2, pin_memory=True)
    with off.offload_context():
        m(x, y).backward()
    _assert_equal_grads(ref, m)
    if not torch.cuda.is_available():
        assert not off.active and off.stats()["tensors_offloaded_last_region"] == 0


@pytest.mark.parametrize("ahead", [0, 1, 2])
def test_context_grads_bit_equal_and_nothing_left(ahead):
    ref, m = _gpt(), _gpt()
    x, y = synthetic_batch(CFG, 2)
    ref(x, y).backward()
    off = _forced(prefetch_ahead=ahead)
    with off.offload_context():
        loss = m(x, y)
        loss.backward()
    _assert_equal_grads(ref, m)
    assert off.stats()["tensors_offloaded_last_region"] > 0 and off.stats()["records_alive"] == 0


def test_backward_after_the_context():
    ref, m = _gpt(), _gpt()
    x, y = synthetic_batch(CFG, 2)
    ref(x, y).backward()
    off = _forced()
    with off.offload_context():
        loss = m(x, y)
    loss.backward()
    _assert_equal_grads(ref, m)


def test_prefetch_ahead_order():
    m = _gpt()
    off = _forced(prefetch_ahead=2)
    eng = off._engine
    order, fetch_group = [], eng.fetch_group
    eng.fetch_group = lambda sess, g: order.append(g) or fetch_group(sess, g)
    x, y = synthetic_batch(CFG, 2)
    with off.offload_context():
        m(x, y).backward()
    n = off.stats()["tensors_offloaded_last_region"]
    assert sorted(order) == list(range(n))  # every storage fetched back exactly once
    assert order[:3] == [order[0], order[0] - 1, order[0] - 2]  # the first use brings 2 more ahead


def test_threshold_keeps_small_tensors():
    m = _gpt()
    off = _forced(offload_threshold_mb=1.0)  # far above every activation of the tiny model
    x, y = synthetic_batch(CFG, 2)
    with off.offload_context():
        m(x, y).backward()
    assert off.stats()["tensors_offloaded_last_region"] == 0


class _Ckpt(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.a, self.b, self.reentrant = nn.Linear(32, 32), nn.Linear(32, 32), reentrant

    def forward(self, x):
        h = checkpoint(lambda t: torch.tanh(self.a(t)), x, use_reentrant=self.reentrant)
        return self.b(h).sum()


@pytest.mark.parametrize("reentrant", [True, False])
def test_with_torch_utils_checkpoint(reentrant):
    torch.manual_seed(0)
    ref = _Ckpt(reentrant)
    torch.manual_seed(0)
    m = _Ckpt(reentrant)
    x = torch.randn(8, 32, requires_grad=True)
    ref(x).backward()
    gx = x.grad.clone()
    x.grad = None
    off = _forced()
    with off.offload_context():
        loss = m(x)
        after_forward = off.stats()["tensors_offloaded_last_region"]
        loss.backward()
    _assert_equal_grads(ref, m)
    assert torch.equal(x.grad, gx)
    # Recomputation in backward is never offloaded a second time.
    assert off.stats()["tensors_offloaded_last_region"] == after_forward
    if reentrant:
        assert after_forward >= 1  # the checkpointed region's input went to the host


def test_manual_offload_prefetch_pair():
    off = _forced()
    t = torch.randn(64, 64)
    h = off.offload(t)
    assert isinstance(h, OffloadedTensor) and h.offloaded and h.nbytes == t.numel() * 4
    back = off.prefetch(h, "cpu")
    assert torch.equal(back, t) and back.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
    view = t[8:16, ::2]
    back = off.prefetch(off.offload(view), torch.device("cpu"))
    assert torch.equal(back, view) and back.stride() == view.stride()
    del h, back
    assert off.stats()["records_alive"] == 0


def test_manual_pair_noop_without_cuda():
    off = ActivationOffloader()
    t = torch.randn(4, 4)
    h = off.offload(t)
    if not torch.cuda.is_available():
        assert not h.offloaded and h.nbytes == 0
    assert torch.equal(off.prefetch(h), t)


def test_disabled_context_offloads_nothing():
    off = ActivationOffloader(enabled=False, offload_cpu_tensors=True, offload_threshold_mb=0.0)
    m = _gpt()
    x, y = synthetic_batch(CFG, 2)
    with off.offload_context():
        m(x, y).backward()
    assert off.stats()["tensors_offloaded_last_region"] == 0
