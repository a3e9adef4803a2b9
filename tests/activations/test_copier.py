"""The saved-tensor copier (`ds_offload.activations.copier`, `host_pool`) on CPU, through the layer hooks.

What gets packed and how: parameters never move, small tensors stay, the views of one storage move
once, a tensor saved by two layers is one record, host buffers are pooled, autocast's weight casts
are recast instead of copied. `offload_cpu_tensors=True` makes CPU activations take the real trip.
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

from ds_offload.activations import install_layer_offload
from ds_offload.activations.copier import _Recast
from ds_offload.activations.host_pool import _HostPool
from ds_offload.models import GPT, GPTConfig, synthetic_batch

from activation_helpers import CFG, assert_equal_grads as _assert_equal_grads, gpt as _gpt, grads as _grads, install as _install  # noqa: E402,F401


def _spy_copies(handle):
    """Record every storage the copier copies out (tensor bytes and storage address)."""
    seen, copier = [], handle.copier
    orig = copier._copy_out

    def spy(st, device, sess, group):
        seen.append((st.data_ptr(), st.nbytes(), group))
        return orig(st, device, sess, group)

    copier._copy_out = spy
    return seen


def test_parameters_never_offloaded(handles):
    m = _gpt()
    h = _install(m.blocks, 3)
    handles.append(h)
    seen = _spy_copies(h)
    x, y = synthetic_batch(CFG, 2)
    m(x, y).backward()
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    assert seen and not params & {s[0] for s in seen}


def test_min_offload_bytes_threshold(handles):
    m = _gpt()
    limit = 2 * 16 * 32 * 4 + 1  # bigger than every (batch, seq, hidden) fp32 activation, not the MLP's
    h = _install(m.blocks, 3, min_offload_bytes=limit)
    handles.append(h)
    sizes = []
    orig = h.copier.wants
    h.copier.wants = lambda t: sizes.append(t.numel() * t.element_size()) or orig(t)
    x, y = synthetic_batch(CFG, 2)
    m(x, y).backward()
    off = h.stats()["tensors_offloaded_last_step"]
    assert 0 < off < len(sizes)
    h.copier.min_offload_bytes = 1 << 30
    m(x, y).backward()
    assert h.stats()["tensors_offloaded_last_step"] == 0


class _Views(nn.Module):
    """Saves several views of one storage, a transpose, and goes through in-place ops."""

    def __init__(self, d=32):
        super().__init__()
        self.fc = nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.fc(x).chunk(3, dim=-1)  # three views of one storage, all saved by mul/matmul
        h = (q * k).relu_()  # relu_ saves its own output, written in place over mul's
        h = h * 0.5
        h.add_(1.0)  # in place on a tensor nobody saved
        return x + torch.tanh(h @ v.transpose(-1, -2) @ v)


def test_shared_storage_views_and_in_place(handles):
    torch.manual_seed(0)
    ref = nn.Sequential(_Views(), _Views())
    off = copy.deepcopy(ref)
    x = torch.randn(2, 8, 32, requires_grad=True)
    ref(x).sum().backward()
    h = _install(list(off), 2)
    handles.append(h)
    seen = _spy_copies(h)
    x2 = x.detach().clone().requires_grad_()
    off(x2).sum().backward()
    _assert_equal_grads(ref, off)
    assert torch.equal(x.grad, x2.grad)
    fc_out = 2 * 8 * 96 * 4  # the one storage behind q, k and v, saved four times per layer
    assert [g for _, n, g in seen if n == fc_out] == [0, 1]  # moved once per layer


def test_tensor_saved_by_two_layers(handles):
    """A tensor that a later layer saves again stays one record and reloads correctly."""

    class UsesShared(nn.Module):
        def __init__(self, shared):
            super().__init__()
            self.lin, self.shared = nn.Linear(16, 16), shared

        def forward(self, x):
            return x * self.shared[0] + self.lin(x)

    base = torch.randn(4, 16, requires_grad=True)
    holder = [None]
    torch.manual_seed(0)
    layers = nn.ModuleList(UsesShared(holder) for _ in range(3))
    torch.manual_seed(0)
    ref_layers = nn.ModuleList(UsesShared(holder) for _ in range(3))

    def forward(ls):
        holder[0] = torch.sin(base)  # saved by every layer's mul
        x = base
        for layer in ls:
            x = layer(x)
        return x.sum()

    forward(ref_layers).backward()
    g_ref = base.grad.clone()
    base.grad = None
    h = _install(list(layers), 3)
    handles.append(h)
    seen = _spy_copies(h)
    forward(layers).backward()
    assert torch.equal(base.grad, g_ref)
    _assert_equal_grads(ref_layers, layers)
    shared = holder[0].untyped_storage().data_ptr()  # alive all along: its address is its own
    assert [g for p, _, g in seen if p == shared] == [0]  # one record, owned by the first layer


def test_retained_host_buffers_are_reused(handles):
    m = _gpt()
    h = _install(m.blocks, 3, retain_pinned_buffers=True)
    handles.append(h)
    pool = h.copier.pool
    x, y = synthetic_batch(CFG, 2)
    for _ in range(3):
        before = sum(len(v) for v in pool.free.values())
        m(x, y).backward()
    assert before > 0
    pooled = sum(len(v) for v in pool.free.values())
    assert pooled == before  # steady state: every buffer taken from the pool went back to it


def test_pinned_failure_falls_back_with_one_warning():
    pool = _HostPool(pin=True, retain=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        bufs = [pool.get(1024)[0] for _ in range(3)]
    if torch.cuda.is_available():
        pytest.skip("pinned memory works here")
    assert len([x for x in w if "pageable" in str(x.message)]) == 1
    assert all(b.numel() == 1024 and not b.is_pinned() for b in bufs)


def test_autocast_weight_casts_are_recast_not_copied(handles):
    """Under autocast the bf16 weight copies are recomputed from the parameter: exact, no copy."""
    ref, off = _gpt(), _gpt()
    x, y = synthetic_batch(CFG, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ref(x, y)
    loss.backward()
    h = _install(off.blocks, 3)
    handles.append(h)
    considered, wants = [], h.copier.wants
    h.copier.wants = lambda t: considered.append(_Recast.of(t, 0)) or wants(t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = off(x, y)
    assert h.stats()["tensors_recast_last_step"] > 0
    loss.backward()
    _assert_equal_grads(ref, off)
    assert considered and all(r is None for r in considered)  # no bf16 weight copy went out


def test_recast_refuses_a_parameter_changed_before_backward(handles):
    m = _gpt()
    handles.append(_install(m.blocks, 2))
    x, y = synthetic_batch(CFG, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(x, y)
    with torch.no_grad():
        m.blocks[0].fc1.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="changed in place between forward and backward"):
        loss.backward()


@pytest.mark.parametrize("min_bytes", [0, 1 << 30])   # everything copied / everything left in place
def test_a_forward_dropped_without_backward_frees_its_graph(min_bytes, live_tensors):
    """A forward whose loss is dropped unused (an evaluation with grad on, a skipped step) leaves nothing alive:
    a tensor left in place is packed as a detached alias, so an output saved by its own node (LayerNorm's mean
    and rstd) does not hold that node in a cycle the collector cannot see."""
    m = _gpt()
    h = _install(m.blocks, 2, min_offload_bytes=min_bytes)
    x, y = synthetic_batch(CFG, 2, 0)
    m(x, y).backward()          # one full step first: pools and caches exist before the count
    m.zero_grad(set_to_none=True)
    before = live_tensors()
    for _ in range(3):
        loss = m(x, y)
        del loss
    assert live_tensors() <= before
    h.remove()
