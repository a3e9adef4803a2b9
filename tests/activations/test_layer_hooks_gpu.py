"""Layer-level activation offload on a CUDA GPU: bit-equal gradients, stream races, memory.

The race tests delay one stream with `torch.cuda._sleep` so that a missing wait would read
data that is not there yet; the negative control proves the delay is long enough to notice.
"""
import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from ds_offload.activations import install_layer_offload  # noqa: E402
from ds_offload.models import GPT, GPTConfig, synthetic_batch  # noqa: E402
from ds_offload.activations import ActivationOffloader  # noqa: E402

pytestmark = pytest.mark.gpu

CFG = GPTConfig(vocab_size=1024, hidden=256, num_layers=4, num_heads=4, seq_len=256)
SLEEP = 20_000_000  # GPU cycles, ~10 ms: far longer than any copy here


def _math_sdpa():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.MATH)  # deterministic backward, so grads compare bit for bit


def _gpt(cfg=CFG):
    torch.manual_seed(0)
    with torch.device("cuda"):
        return GPT(cfg)


def _step(model, batch):
    with _math_sdpa(), torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(*batch)
    loss.backward()
    return loss.detach()


def _grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def _same(a, b):
    return all(torch.equal(a[n], b[n]) for n in a)


@pytest.fixture(scope="module")
def reference():
    m = _gpt()
    batch = synthetic_batch(CFG, 4, device="cuda")
    _step(m, batch)
    g1 = _grads(m)
    _step(m, batch)
    assert _same(g1, _grads(m)), "the reference itself is not deterministic here"
    return batch, g1


def _install(model, n, **kw):
    kw.setdefault("min_offload_bytes", 1 << 16)
    return install_layer_offload(model.blocks, n, **kw)


@pytest.mark.parametrize("n", [1, CFG.num_layers - 1])
@pytest.mark.parametrize("double_buffering", [False, True])
@pytest.mark.parametrize("retain", [False, True])
@pytest.mark.parametrize("prefetch_depth", [1, 2])
def test_grads_bit_equal(reference, n, double_buffering, retain, prefetch_depth):
    batch, ref = reference
    m = _gpt()
    h = _install(m, n, double_buffering=double_buffering, retain_pinned_buffers=retain,
                 prefetch_depth=prefetch_depth)
    try:
        for _ in range(2):  # the second step reuses retained / double buffers
            _step(m, batch)
            assert _same(ref, _grads(m))
        st = h.stats()
        assert st["tensors_offloaded_last_step"] > 0 and st["records_alive"] == 0
        assert st["tensors_recast_last_step"] > 0  # autocast weight copies recomputed, not copied
    finally:
        h.remove()


@pytest.mark.parametrize("n", [1, CFG.num_layers - 1])
def test_grads_bit_equal_copying_weight_casts(reference, n):
    batch, ref = reference
    m = _gpt()
    h = _install(m, n)
    h.copier.recompute_weight_casts = False
    try:
        _step(m, batch)
        assert _same(ref, _grads(m)) and h.stats()["tensors_recast_last_step"] == 0
    finally:
        h.remove()


def test_accumulation_and_no_grad(reference):
    batch, ref = reference
    m = _gpt()
    h = _install(m, 2)
    try:
        with torch.no_grad():
            m(*batch)
        assert h.stats()["tensors_offloaded_last_step"] == 0
        for _ in range(2):
            _step(m, batch)
        g = _grads(m)
        assert all(torch.equal(g[k], 2 * ref[k]) for k in g)  # a + a == 2a exactly
    finally:
        h.remove()


def test_llama_bit_equal():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    ids = torch.randint(0, 512, (4, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    grads = []
    for n in (0, 2):
        torch.manual_seed(0)
        m = transformers.LlamaForCausalLM(cfg).cuda().train()
        h = install_layer_offload(m.model.layers, n, min_offload_bytes=1 << 14)
        try:
            with _math_sdpa(), torch.autocast("cuda", dtype=torch.bfloat16):
                loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            assert n == 0 or h.stats()["tensors_offloaded_last_step"] > 0
        finally:
            h.remove()
        grads.append(_grads(m))
    assert _same(*grads)


class _Slow(nn.Module):
    """Its saved tensor is produced only after a long sleep on the compute stream."""

    def __init__(self, d=256):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        torch.cuda._sleep(SLEEP)
        return x + torch.tanh(self.lin(x))  # tanh saves its output: written after the sleep


def _slow_stack():
    torch.manual_seed(0)
    return nn.Sequential(*[_Slow() for _ in range(4)]).cuda()


def _run_stack(model, x):
    model(x).square().sum().backward()
    return _grads(model)


def _delay(stream):
    with torch.cuda.stream(stream):
        torch.cuda._sleep(SLEEP)


def _delayed_fetch(h, skip_wait=False, poison=True):
    copier = h.copier
    fetch, unpack = copier.fetch, copier.unpack

    def slow_fetch(rec, buf=None):
        side = copier.stream(rec.device, 1)
        side.wait_stream(torch.cuda.current_stream())  # the delay starts here, so the poison
        _delay(side)  # below always lands before the copy does
        fetch(rec, buf)
        if poison and rec.src is None:
            rec.gpu.fill_(255)  # on compute, before the delayed copy lands: NaNs if nobody waits

    def no_wait_unpack(p):
        if hasattr(p, "rec"):
            p.rec.waited = True
        return unpack(p)

    copier.fetch = slow_fetch
    if skip_wait:
        copier.unpack = no_wait_unpack


def _stack_case(install_kw=None, patch=None, steps=1):
    # Load the poison's and the delay's kernels now: a kernel's first (lazy) load can wait for
    # every stream, which would let the poison land after the delayed copy, not before.
    torch.empty(16, dtype=torch.uint8, device="cuda").fill_(255)
    torch.cuda._sleep(1)
    torch.cuda.synchronize()
    x = torch.randn(8, 512, 256, device="cuda")
    ref = _run_stack(_slow_stack(), x)
    m = _slow_stack()
    h = install_layer_offload(list(m), 3, min_offload_bytes=0, **(install_kw or {}))
    if patch:
        patch(h)
    try:
        return [_same(ref, _run_stack(m, x)) for _ in range(steps)]
    finally:
        torch.cuda.synchronize()  # a negative control's unwaited copies must not land later
        h.remove()


def test_race_copy_out_waits_for_compute():
    assert all(_stack_case(steps=2))


def test_race_compute_waits_for_copy_back():
    assert all(_stack_case(patch=_delayed_fetch, steps=2))


def test_race_negative_control_detects_missing_wait():
    assert not any(_stack_case(patch=lambda h: _delayed_fetch(h, skip_wait=True)))


def test_race_sources_live_until_copied_out():
    def slow_d2h(h):
        copier = h.copier
        copy_out = copier._copy_out

        def slow(st, device, sess, group):
            _delay(copier.stream(device, 0))
            return copy_out(st, device, sess, group)
        copier._copy_out = slow

    assert all(_stack_case(patch=slow_d2h, steps=2))


def test_race_retained_buffer_reuse_and_double_buffers():
    kw = {"retain_pinned_buffers": True, "double_buffering": True}
    assert all(_stack_case(install_kw=kw, patch=lambda h: _delayed_fetch(h, poison=False), steps=3))


@pytest.mark.parametrize("n", [2, 5])
def test_peak_memory_drop(n):
    """Peak falls by >= 90% of what the offloaded layers save (weight casts included)."""
    cfg = GPTConfig(vocab_size=8192, hidden=512, num_layers=6, num_heads=8, seq_len=512)
    batch = synthetic_batch(cfg, 8, device="cuda")
    peaks, per_layer = [], None
    for k in (0, n):
        m = _gpt(cfg)
        h = install_layer_offload(m.blocks, k, retain_pinned_buffers=True)
        _step(m, batch)
        m.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(m, batch)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        if k:
            st = h.stats()
            per_layer = st["bytes_offloaded_last_step"] / k  # the recast weight copies come on top
        h.remove()
        del m
    drop = peaks[0] - peaks[1]
    print(f"peak {peaks[0] / 2**20:.0f} -> {peaks[1] / 2**20:.0f} MiB, drop {drop / 2**20:.0f} MiB, "
          f"{n} x per-layer {per_layer / 2**20:.1f} MiB, ratio {drop / (n * per_layer):.3f}")
    assert drop >= 0.9 * n * per_layer


@pytest.mark.slow
@pytest.mark.parametrize("retain", [True, False])
def test_no_pinned_growth_over_50_steps(retain):
    m = _gpt()
    batch = synthetic_batch(CFG, 4, device="cuda")
    h = _install(m, 3, retain_pinned_buffers=retain)
    held, alloc = [], []
    try:
        for _ in range(50):
            _step(m, batch)
            m.zero_grad(set_to_none=False)
            torch.cuda.synchronize()
            held.append(h.stats()["pinned_bytes_held"])
            alloc.append(torch.cuda.memory_allocated())
    finally:
        h.remove()
    assert len(set(held[1:])) == 1 and len(set(alloc[1:])) == 1
    assert (held[-1] > 0) == retain


def test_fine_grained_context_and_manual_pair_on_gpu(reference):
    batch, ref = reference
    m = _gpt()
    off = ActivationOffloader(min_offload_bytes=int(0.05 * 2**20), prefetch_depth=2)
    with off.offload_context():
        _step(m, batch)
    assert _same(ref, _grads(m)) and off.stats()["tensors_offloaded_last_region"] > 0
    t = torch.randn(1024, 1024, device="cuda")
    handle = off.offload(t)
    assert handle.offloaded
    expect = t.clone()
    del t
    torch.randn(1024, 1024, device="cuda")  # may reuse the freed block: must wait for the copy
    assert torch.equal(off.prefetch(handle, "cuda"), expect)
