"""The fine-grained `ActivationOffloader` API (`ds_offload.activations.region`), on CPU."""
import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ds_offload.models import GPT, GPTConfig, synthetic_batch
from ds_offload.activations import ActivationOffloader, OffloadedTensor

CFG = GPTConfig(vocab_size=256, hidden=32, num_layers=3, num_heads=4, seq_len=16)


def _gpt():
    torch.manual_seed(0)
    return GPT(CFG)


def _assert_equal_grads(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for n in pa:
        assert torch.equal(pa[n].grad, pb[n].grad), n


def _forced(**kw):
    kw.setdefault("min_offload_bytes", 0)
    return ActivationOffloader(offload_cpu_tensors=True, **kw)


@pytest.mark.parametrize("kw", [{"min_offload_bytes": -1}, {"min_offload_bytes": "10"},
                                {"prefetch_depth": -1}, {"prefetch_depth": 1.5}])
def test_constructor_errors(kw):
    with pytest.raises(ValueError):
        ActivationOffloader(**kw)


def test_cpu_without_cuda_changes_nothing():
    ref, m = _gpt(), _gpt()
    x, y = synthetic_batch(CFG, 2)
    ref(x, y).backward()
    off = ActivationOffloader(enabled=True, min_offload_bytes=0, prefetch_depth=2, pin_memory=True)
    with off.offload_context():
        m(x, y).backward()
    _assert_equal_grads(ref, m)
    if not torch.cuda.is_available():
        assert not off.active and off.stats()["tensors_offloaded_last_region"] == 0


@pytest.mark.parametrize("prefetch_depth", [0, 1, 2])
def test_context_grads_bit_equal_and_nothing_left(prefetch_depth):
    ref, m = _gpt(), _gpt()
    x, y = synthetic_batch(CFG, 2)
    ref(x, y).backward()
    off = _forced(prefetch_depth=prefetch_depth)
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


def test_prefetch_depth_order():
    m = _gpt()
    off = _forced(prefetch_depth=2)
    copier = off.copier
    order, fetch_group = [], copier.fetch_group
    copier.fetch_group = lambda sess, g: order.append(g) or fetch_group(sess, g)
    x, y = synthetic_batch(CFG, 2)
    with off.offload_context():
        m(x, y).backward()
    n = off.stats()["tensors_offloaded_last_region"]
    assert sorted(order) == list(range(n))  # every storage fetched back exactly once
    assert order[:3] == [order[0], order[0] - 1, order[0] - 2]  # the first use brings 2 more ahead


def test_min_offload_bytes_keeps_small_tensors():
    m = _gpt()
    off = _forced(min_offload_bytes=2**20)  # far above every activation of the tiny model
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
    off = ActivationOffloader(enabled=False, offload_cpu_tensors=True, min_offload_bytes=0)
    m = _gpt()
    x, y = synthetic_batch(CFG, 2)
    with off.offload_context():
        m(x, y).backward()
    assert off.stats()["tensors_offloaded_last_region"] == 0
