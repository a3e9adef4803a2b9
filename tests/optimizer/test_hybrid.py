"""HybridDeviceOptimizer on CPU: numbers against torch's AdamW, the split, state dicts, schedulers.

Without CUDA both shares run on the CPU with the same split and arithmetic as on a GPU host, so these
pin the numerics; the GPU-only parts (streams, pinned copies, hooks) are in test_hybrid_gpu.py. Tests
whose optimizer steps with DeepSpeed's CPU Adam (the default backend) load its JIT op: marked slow.
"""
import io

import pytest
import torch

from ds_offload.optimizer import HybridDeviceOptimizer

SHAPES = [(64, 32), (32,), (128, 64), (64,), (10, 64), (7,)]
FRACTIONS = [0.0, 0.3, 0.7, 1.0]
BACKENDS = {"deepspeed": False, "torch": True}
BACKEND_PARAMS = [pytest.param("deepspeed", marks=pytest.mark.slow), "torch"]  # the DS op takes a JIT build


def make_params(dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in SHAPES]


def groups(ps):
    """Two groups with different lr and weight decay; the split crosses the group boundary for f=0.3/0.7."""
    return [{"params": ps[:3], "lr": 1e-2, "weight_decay": 0.1}, {"params": ps[3:], "lr": 3e-3, "weight_decay": 0.0}]


def set_grads(ps, step):
    g = torch.Generator().manual_seed(1000 + step)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def train(ps, opt, steps, start=0, sched=None):
    for i in range(start, start + steps):
        set_grads(ps, i)
        opt.step()
        if sched is not None:
            sched.step()
    return ps


def max_diff(a, b):
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def reference(steps=20, **kw):
    ps = make_params()
    return train(ps, torch.optim.AdamW(groups(ps), lr=1e-3, **kw), steps)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("f", FRACTIONS)
def test_parity_with_torch_adamw(f, backend):
    ref = reference()
    ps = make_params()
    opt = HybridDeviceOptimizer(groups(ps), offload_fraction=f, use_torch_optimizer_for_cpu_offload=BACKENDS[backend])
    train(ps, opt, 20)
    assert max_diff(ps, ref) <= 1e-5


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_adam_l2_mode_matches_torch_adam(backend):
    ps_ref = make_params()
    train(ps_ref, torch.optim.Adam(groups(ps_ref), lr=1e-3), 20)
    ps = make_params()
    opt = HybridDeviceOptimizer(groups(ps), offload_fraction=0.5, adamw_mode=False,
                                use_torch_optimizer_for_cpu_offload=BACKENDS[backend])
    train(ps, opt, 20)
    assert max_diff(ps, ps_ref) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("f", FRACTIONS)
def test_split_accounting_is_exact_and_takes_the_last_parameters(f):
    ps = make_params()
    opt = HybridDeviceOptimizer(groups(ps), offload_fraction=f, bucket_numel=1000)
    info = opt.split_info()
    total = sum(p.numel() for p in ps)
    assert info["total_numel"] == total
    assert info["cpu_numel"] == round(f * total)
    assert info["cpu_numel"] + info["gpu_numel"] == total
    cpu = [pc for pc in opt._layout.pieces if pc.on_cpu]
    # The CPU share is a suffix of the flattened parameter list: last tensors whole, boundary one split at its tail.
    covered = sorted((pc.index, pc.start, pc.end) for pc in cpu)
    if covered:
        first = covered[0]
        assert first[2] == ps[first[0]].numel()
        assert all(s == 0 and e == ps[i].numel() for i, s, e in covered[1:])
        assert [i for i, _, _ in covered] == list(range(first[0], len(ps)))
    # Small tensors share buckets: fewer buckets than offloaded pieces once there are several.
    if len(cpu) > 2:
        assert info["num_buckets"] < len(cpu)


@pytest.mark.slow
def test_state_dict_round_trip_resumes_bit_exact():
    ps = make_params()
    opt = HybridDeviceOptimizer(groups(ps), offload_fraction=0.3)
    train(ps, opt, 10)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = HybridDeviceOptimizer(groups(ps2), offload_fraction=0.3)
    opt2.load_state_dict(loaded)
    train(ps, opt, 10, start=10)
    train(ps2, opt2, 10, start=10)
    assert all(torch.equal(a, b) for a, b in zip(ps, ps2))


@pytest.mark.slow
def test_saved_state_is_plain_adamw_format():
    ps = make_params(torch.bfloat16)
    opt = HybridDeviceOptimizer(groups(ps), offload_fraction=0.5)
    train(ps, opt, 2)
    sd = opt.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert set(loaded["state"]) == set(range(len(ps)))
    for i, p in enumerate(ps):
        entry = loaded["state"][i]
        assert entry["exp_avg"].shape == p.shape and entry["exp_avg"].device.type == "cpu"
        assert float(entry["step"]) == 2.0
        assert entry["master"].dtype == torch.float32  # bf16 params: the fp32 master travels too
    assert [g["params"] for g in loaded["param_groups"]] == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.slow
@pytest.mark.parametrize("f_from,f_to", [(0.3, 0.7), (1.0, 0.0), (0.7, 1.0)])
def test_resume_with_another_fraction(f_from, f_to):
    ref = reference()
    ps = make_params()
    opt = HybridDeviceOptimizer(groups(ps), offload_fraction=f_from)
    train(ps, opt, 10)
    sd = opt.state_dict()
    opt2 = HybridDeviceOptimizer(groups(ps), offload_fraction=f_to)
    opt2.load_state_dict(sd)
    train(ps, opt2, 10, start=10)
    assert max_diff(ps, ref) <= 1e-5


@pytest.mark.slow
def test_resume_from_and_into_plain_adamw():
    ref = reference()
    ps = make_params()
    adamw = torch.optim.AdamW(groups(ps), lr=1e-3)
    train(ps, adamw, 7)
    opt = HybridDeviceOptimizer(groups(ps), offload_fraction=0.5)
    opt.load_state_dict(adamw.state_dict())
    train(ps, opt, 7, start=7)
    back = torch.optim.AdamW(groups(ps), lr=1e-3)
    back.load_state_dict(opt.state_dict())
    train(ps, back, 6, start=14)
    assert max_diff(ps, ref) <= 1e-5


@pytest.mark.slow
def test_load_before_first_step_is_applied_at_layout_build():
    ps = make_params()
    opt = HybridDeviceOptimizer(groups(ps), offload_fraction=0.5)
    train(ps, opt, 5)
    sd = opt.state_dict()
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = HybridDeviceOptimizer(groups(ps2), offload_fraction=0.5)
    opt2.load_state_dict(sd)  # no layout yet: kept until the first step builds one
    assert opt2.state_dict()["state"][0]["exp_avg"].equal(sd["state"][0]["exp_avg"])
    train(ps, opt, 3, start=5)
    train(ps2, opt2, 3, start=5)
    assert all(torch.equal(a, b) for a, b in zip(ps, ps2))


@pytest.mark.slow
def test_torch_lr_scheduler():
    ps_ref = make_params()
    ref_opt = torch.optim.AdamW(groups(ps_ref), lr=1e-3)
    train(ps_ref, ref_opt, 20, sched=torch.optim.lr_scheduler.StepLR(ref_opt, step_size=5, gamma=0.5))
    ps = make_params()
    opt = HybridDeviceOptimizer(groups(ps), offload_fraction=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    train(ps, opt, 20, sched=sched)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]
    assert max_diff(ps, ps_ref) <= 1e-5


@pytest.mark.slow
def test_deepspeed_warmup_lr():
    from deepspeed.runtime.lr_schedules import WarmupLR

    ps_ref = make_params()
    ref_opt = torch.optim.AdamW(groups(ps_ref), lr=1e-3)
    train(ps_ref, ref_opt, 20, sched=WarmupLR(ref_opt, warmup_max_lr=1e-2, warmup_num_steps=8))
    ps = make_params()
    opt = HybridDeviceOptimizer(groups(ps), offload_fraction=0.7)
    sched = WarmupLR(opt, warmup_max_lr=1e-2, warmup_num_steps=8)
    train(ps, opt, 20, sched=sched)
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] == 1e-2
    assert max_diff(ps, ps_ref) <= 1e-5


@pytest.mark.slow
def test_bf16_params_keep_fp32_masters():
    ps_ref = make_params()
    train(ps_ref, torch.optim.AdamW(groups(ps_ref), lr=1e-3), 20)
    ps = make_params(torch.bfloat16)
    # bf16 grads of the fp32 run are not available; compare masters on identical (bf16-rounded) inputs instead.
    ps32 = [torch.nn.Parameter(p.detach().float()) for p in ps]
    ref_opt = torch.optim.AdamW(groups(ps32), lr=1e-3)
    opt = HybridDeviceOptimizer(groups(ps), offload_fraction=0.5)
    for i in range(20):
        set_grads(ps, i)
        for p, q in zip(ps, ps32):
            q.grad = p.grad.float()
        opt.step()
        ref_opt.step()
    masters = opt.state_dict()["state"]
    assert max(float((masters[i]["master"] - q.detach()).abs().max()) for i, q in enumerate(ps32)) <= 1e-5
    assert all(torch.equal(p, masters[i]["master"].to(torch.bfloat16)) for i, p in enumerate(ps))


@pytest.mark.slow
def test_params_without_grad_are_skipped_like_torch():
    ref = make_params()
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-3)
    ps = make_params()
    opt = HybridDeviceOptimizer(groups(ps), offload_fraction=0.6)
    for i in range(6):
        for pp, o in ((ref, ref_opt), (ps, opt)):
            set_grads(pp, i)
            pp[i % len(pp)].grad = None
            o.step()
    assert max_diff(ps, ref) <= 1e-5
    assert [float(s["step"]) for s in opt.state_dict()["state"].values()] == \
        [float(ref_opt.state[p]["step"]) for p in ref]


@pytest.mark.slow
def test_loading_weights_refreshes_masters():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    opt = HybridDeviceOptimizer(model.parameters(), offload_fraction=1.0, lr=0.0)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    fresh = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    model.load_state_dict(fresh)  # in-place copy: seen through the version counter
    opt.step()
    assert all(torch.equal(p, torch.full_like(p, 0.5)) for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.data.fill_(0.25)  # through .data: invisible to the version counter
    opt.refresh_masters_from_params()
    opt.step()
    assert all(torch.equal(p, torch.full_like(p, 0.25)) for p in model.parameters())


@pytest.mark.slow
def test_cpu_adam_in_worker_process_matches():
    ref = reference()
    ps = make_params()
    opt = HybridDeviceOptimizer(groups(ps), offload_fraction=0.7, cpu_worker="process")
    try:
        train(ps, opt, 20)
    finally:
        opt.close()
    assert max_diff(ps, ref) <= 1e-5


def test_fraction_out_of_range():
    with pytest.raises(ValueError, match=r"optimizer_offload_fraction must be in \[0.0, 1.0\]"):
        HybridDeviceOptimizer(make_params(), offload_fraction=1.5)
