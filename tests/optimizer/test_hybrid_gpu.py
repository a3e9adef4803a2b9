"""HybridDeviceOptimizer on a CUDA GPU: bf16 numbers, where state lives, and stream ordering.

The race tests stall the compute stream with ``torch.cuda._sleep`` so that a copy or update that does
not wait for the right stream reads or writes the wrong values, instead of passing by luck of timing.
"""
import pytest
import torch

from ds_offload.models import GPT, GPTConfig, synthetic_batch
from ds_offload.optimizer import HybridDeviceOptimizer

pytestmark = pytest.mark.gpu  # conftest skips these without CUDA

CFG = GPTConfig(vocab_size=512, hidden=128, num_layers=4, num_heads=4, seq_len=64)
SLEEP = 200_000_000  # GPU cycles: ~0.1 s, far longer than any copy here


def bf16_model(seed=0):
    torch.manual_seed(seed)
    with torch.device("cuda"):
        return GPT(CFG).to(torch.bfloat16)


def groups(model):
    ps = list(model.parameters())
    half = len(ps) // 2
    return [{"params": ps[:half], "lr": 2e-3, "weight_decay": 0.1}, {"params": ps[half:], "lr": 1e-3,
                                                                       "weight_decay": 0.0}]


@pytest.mark.slow
@pytest.mark.parametrize("overlap,pin,backend,early", [(True, True, "deepspeed", False), (True, True, "torch", False),
                                                       (False, True, "deepspeed", False), (True, False, "torch", False),
                                                       (False, False, "deepspeed", False),
                                                       (True, True, "deepspeed", True), (True, True, "torch", True)])
def test_bf16_parity_with_fp32_adamw(overlap, pin, backend, early):
    """Masters track torch AdamW fed the same gradients, and the bf16 weights are the rounded masters."""
    model = bf16_model()
    masters = [torch.nn.Parameter(p.detach().float()) for p in model.parameters()]
    half = len(masters) // 2
    ref = torch.optim.AdamW([{"params": masters[:half], "lr": 2e-3, "weight_decay": 0.1},
                             {"params": masters[half:], "lr": 1e-3, "weight_decay": 0.0}], lr=1e-3)
    opt = HybridDeviceOptimizer(groups(model), offload_fraction=0.5, overlap_cpu_optimizer_d2h_h2d=overlap,
                                pin_cpu_grads=pin, pin_cpu_params=pin,
                                use_torch_optimizer_for_cpu_offload=backend == "torch", step_in_backward=early)
    try:
        for step in range(20):
            idx, tgt = synthetic_batch(CFG, 4, step, "cuda")
            model(idx, tgt).backward()
            for p, m in zip(model.parameters(), masters):
                m.grad = p.grad.float()
            opt.step()
            ref.step()
            opt.zero_grad()
        sd = opt.state_dict()
        assert max(float((sd["state"][i]["master"].cuda() - m.detach()).abs().max())
                   for i, m in enumerate(masters)) <= 1e-5
        assert all(torch.equal(p, sd["state"][i]["master"].cuda().to(torch.bfloat16))
                   for i, p in enumerate(model.parameters()))
        if overlap and backend == "deepspeed":
            assert opt._backend._proc is not None  # the GIL-free worker process, not the GIL-holding binding
    finally:
        opt.close()


@pytest.mark.slow  # DeepSpeed's CPU Adam op (the default backend)
def test_state_lives_where_the_split_says():
    model = bf16_model()
    opt = HybridDeviceOptimizer(model.parameters(), offload_fraction=0.5)
    try:
        idx, tgt = synthetic_batch(CFG, 2, 0, "cuda")
        model(idx, tgt).backward()
        opt.step()
        lay = opt._layout
        assert all(pc.exp_avg.device.type == "cpu" and pc.master.device.type == "cpu" for b in lay.buckets
                   for pc in b.pieces)
        assert all(b.master.is_pinned() and b.grad.is_pinned() for b in lay.buckets)
        assert all(pc.exp_avg.is_cuda and pc.master.is_cuda for pc in lay.device_pieces)
        # The last parameters (the LM head) are offloaded, the first (the embedding) are not.
        last, first = list(model.parameters())[-1], list(model.parameters())[0]
        assert all(pc.on_cpu for pc in lay.pieces if pc.param is last)
        assert not any(pc.on_cpu for pc in lay.pieces if pc.param is first)
    finally:
        opt.close()


@pytest.mark.slow  # DeepSpeed's CPU Adam op (the default backend)
def test_gpu_memory_drops_by_12_bytes_per_offloaded_element():
    used = {}
    for f in (0.0, 1.0):
        model = bf16_model()
        opt = HybridDeviceOptimizer(model.parameters(), offload_fraction=f)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        opt.split_info()
        torch.cuda.synchronize()
        used[f] = torch.cuda.memory_allocated() - before
        n = sum(p.numel() for p in model.parameters())
        opt.close()
    assert used[0.0] - used[1.0] >= 0.9 * 12 * n


@pytest.mark.slow  # DeepSpeed's CPU Adam op (the default backend)
def test_grad_copy_waits_for_compute_stream():
    """Gradients rewritten on a stalled compute stream after backward must be the ones stepped."""
    model = bf16_model()
    opt = HybridDeviceOptimizer(model.parameters(), offload_fraction=1.0, lr=1.0, weight_decay=0.0)
    try:
        idx, tgt = synthetic_batch(CFG, 2, 0, "cuda")
        model(idx, tgt).backward()  # hooks already started copies of these gradients
        before = [p.detach().float().clone() for p in model.parameters()]
        torch.cuda._sleep(SLEEP)
        for p in model.parameters():
            p.grad.fill_(1.0)  # queued behind the sleep: a copy that does not wait reads the old gradients
        opt.step()
        opt.wait()
        torch.cuda.synchronize()
        # Adam's first step moves every element by about lr * sign(grad): all down with the rewritten
        # gradients, about half up with the stale ones.
        for p, b in zip(model.parameters(), before):
            assert (p.float() < b).all()
    finally:
        opt.close()


@pytest.mark.slow  # DeepSpeed's CPU Adam op (the default backend)
def test_update_waits_for_queued_backward_and_forward_waits_for_update():
    """With defer_weight_updates, step() returns early and the next forward's pre-hook waits."""
    model = bf16_model()
    opt = HybridDeviceOptimizer(model.parameters(), offload_fraction=1.0, lr=1e-2, defer_weight_updates=True)
    try:
        idx, tgt = synthetic_batch(CFG, 2, 0, "cuda")
        for _ in range(2):
            model(idx, tgt).backward()
            opt.step()
            opt.zero_grad()
        model(idx, tgt).backward()
        torch.cuda.synchronize()
        old = [p.detach().clone() for p in model.parameters()]
        torch.cuda._sleep(SLEEP)
        snap = [p.detach().clone() for p in model.parameters()]  # queued behind the stall, before step()
        opt.step()
        logits = model(idx)  # must read the updated weights: the pre-hook waits for the H2D
        opt.wait()
        torch.cuda.synchronize()
        assert all(torch.equal(s, o) for s, o in zip(snap, old)), "H2D overwrote weights still in use"
        sd = opt.state_dict()
        new = [sd["state"][i]["master"].cuda().to(torch.bfloat16) for i in range(len(old))]
        assert any(not torch.equal(a, b) for a, b in zip(old, new))
        assert all(torch.equal(p, n) for p, n in zip(model.parameters(), new))
        assert torch.equal(logits, model(idx)), "forward after step() read stale weights"
    finally:
        opt.close()


@pytest.mark.slow  # DeepSpeed's CPU Adam op (the default backend)
def test_step_in_backward_refuses_gradients_changed_after_backward():
    model = bf16_model()
    opt = HybridDeviceOptimizer(model.parameters(), offload_fraction=0.5, step_in_backward=True)
    try:
        idx, tgt = synthetic_batch(CFG, 2, 0, "cuda")
        model(idx, tgt).backward()
        opt.step()  # builds the split; hooks act from the next backward on
        opt.zero_grad()
        model(idx, tgt).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        with pytest.raises(RuntimeError, match="step_in_backward"):
            opt.step()
    finally:
        opt.close()
