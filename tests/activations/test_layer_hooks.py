"""Layer-level activation offload on CPU (`ds_offload.activations.layer_hooks`), forced onto host copies.

`offload_cpu_tensors=True` makes every saved CPU activation take the same trip as a CUDA one
(a separate host copy, reloaded into a separate buffer), so bit-equal gradients here mean the
bookkeeping (lifetimes, sessions, prefetch order and memory rule) is right; `test_copier.py` covers
what is packed (views, shared storages, host buffers, weight casts), the GPU file adds streams.
"""
import warnings
import weakref

import pytest
import torch

from ds_offload.activations import ActivationOffloader, install_layer_offload, layer_offload_installed
from ds_offload.activations import layer_hooks as A
from ds_offload.activations.copier import SavedTensorCopier
from ds_offload.errors import ConfigError
from ds_offload.models import GPT, GPTConfig, synthetic_batch

from activation_helpers import CFG, assert_equal_grads as _assert_equal_grads, gpt as _gpt, grads as _grads, install as _install  # noqa: E402,F401


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("opts", [{}, {"prefetch_depth": 2}, {"double_buffering": True},
                                  {"retain_pinned_buffers": True}])
def test_gpt_grads_bit_equal(n, opts, handles):
    ref, off = _gpt(), _gpt()
    x, y = synthetic_batch(CFG, 4)
    ref(x, y).backward()
    handles.append(_install(off.blocks, n, **opts))
    off(x, y).backward()
    _assert_equal_grads(ref, off)
    st = handles[0].stats()
    assert st["tensors_offloaded_last_step"] > 0 and st["records_alive"] == 0


def _hf(family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "llama":
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
        m = transformers.LlamaForCausalLM(cfg)
        return m, m.model.layers
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=256, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        m = transformers.GPT2LMHeadModel(cfg)
        return m, m.transformer.h
    cfg = transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                     num_attention_heads=4, vocab_size=256, hidden_dropout=0.0,
                                     attention_dropout=0.0)
    m = transformers.GPTNeoXForCausalLM(cfg)
    return m, m.gpt_neox.layers


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
def test_transformers_grads_bit_equal(family, handles):
    ref, _ = _hf(family)
    off, layers = _hf(family)
    ref.train(), off.train()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    ref(input_ids=ids, labels=ids).loss.backward()
    h = _install(layers, 2)
    handles.append(h)
    off(input_ids=ids, labels=ids).loss.backward()
    _assert_equal_grads(ref, off)
    assert h.stats()["tensors_offloaded_last_step"] > 0 and h.stats()["records_alive"] == 0


def test_gradient_accumulation(handles):
    ref, off = _gpt(), _gpt()
    batches = [synthetic_batch(CFG, 2, step=i) for i in range(3)]
    for x, y in batches:
        (ref(x, y) / 3).backward()
    handles.append(_install(off.blocks, 3))
    for x, y in batches:
        (off(x, y) / 3).backward()
    _assert_equal_grads(ref, off)
    assert handles[0].stats()["records_alive"] == 0


def test_two_forwards_then_two_backwards(handles):
    ref, off = _gpt(), _gpt()
    b1, b2 = synthetic_batch(CFG, 2, step=1), synthetic_batch(CFG, 2, step=2)
    l1, l2 = ref(*b1), ref(*b2)
    (l2 + l1).backward()
    handles.append(_install(off.blocks, 3))
    l1, l2 = off(*b1), off(*b2)
    (l2 + l1).backward()
    _assert_equal_grads(ref, off)


def test_eval_and_no_grad_offload_nothing(handles):
    m = _gpt()
    h = _install(m.blocks, 3)
    handles.append(h)
    x, y = synthetic_batch(CFG, 2)
    with torch.no_grad():
        m(x, y)
    assert h.stats()["tensors_offloaded_last_step"] == 0
    m.eval()
    m(x, y)
    assert h.stats()["tensors_offloaded_last_step"] == 0 and h.stats()["records_alive"] == 0


def test_forward_without_backward_keeps_nothing(handles):
    ref, off = _gpt(), _gpt()
    h = _install(off.blocks, 3)
    handles.append(h)
    x, y = synthetic_batch(CFG, 2)
    loss = off(x, y)
    assert h.stats()["records_alive"] > 0
    del loss
    assert h.stats()["records_alive"] == 0
    ref(x, y).backward()
    off(x, y).backward()
    _assert_equal_grads(ref, off)


def test_exception_midway_then_clean_step(handles):
    ref, off = _gpt(), _gpt()
    h = _install(off.blocks, 3)
    handles.append(h)
    x, y = synthetic_batch(CFG, 2)
    orig = off.blocks[1].forward
    off.blocks[1].forward = lambda *a: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        off(x, y)
    del off.blocks[1].forward
    assert off.blocks[1].forward == orig
    assert h.stats()["records_alive"] == 0 and not h._stack
    # No offload hooks leaked onto code outside the layers.
    a = torch.randn(64, 64, requires_grad=True)
    (a * a).sum().backward()
    assert h.stats()["records_alive"] == 0
    ref(x, y).backward()
    off(x, y).backward()
    _assert_equal_grads(ref, off)


def test_retain_graph_backward_twice(handles):
    ref, off = _gpt(), _gpt()
    x, y = synthetic_batch(CFG, 2)
    loss = ref(x, y)
    loss.backward(retain_graph=True)
    loss.backward()
    handles.append(_install(off.blocks, 3))
    loss = off(x, y)
    loss.backward(retain_graph=True)
    loss.backward()
    _assert_equal_grads(ref, off)


@pytest.mark.parametrize("prefetch_depth", [1, 2])
def test_prefetch_order_and_memory_budget(prefetch_depth, handles):
    """Groups come back in backward order; each before it is used; lookahead as designed."""
    m = _gpt()
    h = _install(m.blocks, 3, prefetch_depth=prefetch_depth)
    handles.append(h)
    events = []
    copier = h.copier
    fetch_group, unpack = copier.fetch_group, copier.unpack
    copier.fetch_group = lambda sess, g: events.append(("fetch", g)) or fetch_group(sess, g)
    copier.unpack = lambda p: events.append(("use", getattr(p, "rec", None) and p.rec.group)) or unpack(p)
    x, y = synthetic_batch(CFG, 2)
    m(x, y).backward()
    fetches = [g for kind, g in events if kind == "fetch"]
    assert fetches == [2, 1, 0]
    for g in range(3):
        first_use = next(i for i, e in enumerate(events) if e == ("use", g))
        assert events.index(("fetch", g)) < first_use
    # Backward reached layer 3 (not offloaded) first: it fetches `prefetch_depth` layers ahead at once.
    assert events[:prefetch_depth] == [("fetch", 2), ("fetch", 1)][:prefetch_depth]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU no-op path")
def test_no_cuda_is_noop_with_one_warning():
    m = _gpt()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        h = install_layer_offload(m.blocks, 3)
    try:
        assert len(w) == 1 and "no-op" in str(w[0].message)
        x, y = synthetic_batch(CFG, 2)
        m(x, y).backward()
        assert h.stats()["tensors_offloaded_last_step"] == 0 and not h.stats()["active"]
        assert layer_offload_installed()
    finally:
        h.remove()
    assert not layer_offload_installed()


def test_remove_uninstalls_hooks():
    m = _gpt()
    h = _install(m.blocks, 3)
    h.remove()
    x, y = synthetic_batch(CFG, 2)
    m(x, y).backward()
    assert h.stats()["tensors_offloaded_last_step"] == 0
    assert all(not b._forward_pre_hooks and not b._forward_hooks for b in m.blocks)


def test_bad_arguments():
    m = _gpt()
    for kw in ({"num_layers": 5}, {"num_layers": -1}, {"num_layers": 1, "prefetch_depth": 0},
               {"num_layers": 1, "min_offload_bytes": -1}):
        with pytest.raises(ValueError):
            install_layer_offload(m.blocks, **kw)


def test_fine_grained_context_refused_under_layer_offload(handles):
    m = _gpt()
    handles.append(_install(m.blocks, 1))
    with pytest.raises(ConfigError) as err:
        with ActivationOffloader().offload_context():
            pass
    path, msg = err.value.errors[0]
    assert path == "cpu_offloading.model.cpu_offloading"
    assert "fine_grained_activation_offloading cannot be enabled with cpu_offloading." in msg
    handles.pop().remove()
    with ActivationOffloader().offload_context():
        pass


def test_throttle_bounds_copies_in_flight(monkeypatch):
    """The forward waits for old copies only when too many bytes are in flight (CUDA-only path,
    driven here with stand-in events)."""
    class Ev:
        def __init__(self, done):
            self.done = done

        def query(self):
            return self.done

    class Rec:
        nbytes = 100

    waits = []
    monkeypatch.setattr(A, "_wait", lambda device, ev: waits.append(ev))
    copier = SavedTensorCopier(0, False, False)
    sess = A._LayerSession(copier, num_groups=15, num_layers=16)
    copier.bytes_this_pass = 5 * 100  # five offloaded layers of 100 bytes so far
    events = [Ev(i == 0) for i in range(5)]
    sess.pending = [(ev, torch.empty(0), Rec()) for ev in events]
    sess.throttle(5)  # 16 - 14 = 2 layers may be in flight: the first is done, wait for the 3rd
    assert waits == [events[2]] and len(sess.pending) == 2
    sess = A._LayerSession(copier, num_groups=4, num_layers=16)
    copier.bytes_this_pass = 4 * 100
    sess.pending = [(Ev(False), torch.empty(0), Rec()) for _ in range(4)]
    waits.clear()
    sess.throttle(4)  # 12 layers still to run: nothing to wait for
    sess.throttle(13)  # 3 allowed of 4
    sess.throttle(15)  # 1 allowed
    assert len(waits) == 2 and len(sess.pending) == 1


def test_prefetch_goes_ahead_only_under_the_end_of_forward_memory(monkeypatch):
    """The CUDA-only memory rule, driven with a stand-in allocator reading."""
    class Rec:
        nbytes, gpu, src = 100, None, None

    recs = [Rec() for _ in range(4)]  # kept alive: the session holds weak references
    copier = A.LayerCopier(0, False, False)
    sess = A._LayerSession(copier, num_groups=4, num_layers=16, prefetch_depth=1)
    for g, r in enumerate(recs):
        sess.groups[g].append(weakref.ref(r))
    sess.drained, sess.device, sess.mem_limit = True, "cuda:0", 1000
    fetched, allocated = [], [950]

    def fetch_group(s, g):  # a fetch allocates its layer on the GPU
        fetched.append(g)
        allocated[0] += 100

    copier.fetch_group = fetch_group
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated[0])
    sess.on_backward_layer(15)  # head gradients: above the limit, and layer 3 is 12 layers away
    assert fetched == []
    allocated[0] = 750  # finished layers freed room for two fetches, not three
    sess.on_backward_layer(13)
    assert fetched == [3, 2] and allocated[0] == 950
    sess.on_backward_layer(3)  # prefetch_depth wants layer 2 (here already); layer 1 must wait for room
    assert fetched == [3, 2]
    allocated[0] = 800
    sess.on_backward_layer(2)  # prefetch_depth forces 1; room for 0 as well
    assert fetched == [3, 2, 1, 0]
