"""fp32_views: DeepSpeed's `safe_get/set_full_fp32_param` and `safe_get/set_full_optimizer_state` on a cut
partition and on offloaded layers, against plain DeepSpeed of the same training; gradients refused loudly."""
import pytest
import torch
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_grad, safe_get_full_optimizer_state,
                             safe_set_full_fp32_param, safe_set_full_optimizer_state)

from test_zero import config, train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("dist")]

WEIGHTS = {"model": {"cpu_offloading": True, "cpu_offloading_num_layers": 1, "cpu_offloading_activations": False,
                     "cpu_offloading_weights": True}}


def full_views(engine):
    return {n: (safe_get_full_fp32_param(p).clone(), safe_get_full_optimizer_state(p, "exp_avg").clone(),
                safe_get_full_optimizer_state(p, "exp_avg_sq").clone())
            for n, p in engine.module.named_parameters()}


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("stage", [1, 2])
def test_full_fp32_views_match_plain_deepspeed(stage, weights, overlap):
    _, plain = train(config(stage), steps=4)
    want = full_views(plain)
    cfg = config(stage, fraction=0.5, overlap=overlap)
    if weights:
        cfg["cpu_offloading"].update(WEIGHTS)
    _, ours = train(cfg, steps=4)
    got = full_views(ours)
    assert set(got) == set(want)
    # The two runs agree to their loss parity, not bit for bit (the tail's CPU Adam rounds differently, and every
    # later gradient follows): masters within 5% of one step's update (lr 1e-3), moments within 2%. A wrong
    # fragment (zeros, another parameter's slice) is off by the weights themselves, ~0.1.
    tol = {"master": dict(rtol=0, atol=5e-5), "exp_avg": dict(rtol=2e-2, atol=1e-6),
           "exp_avg_sq": dict(rtol=2e-2, atol=1e-9)}
    for n in want:
        for a, b, what in zip(got[n], want[n], ("master", "exp_avg", "exp_avg_sq")):
            assert a.shape == b.shape and a.dtype == torch.float32, (n, what)
            assert torch.allclose(a, b, **tol[what]), (n, what, (a - b).abs().max().item())
    assert all(v[2].abs().sum() > 0 for v in got.values())      # real values, not the zeros of an empty view
    opt = ours.optimizer
    tail = next(t for t in opt.tails if t is not None)
    offloaded = [p for p in opt.bit16_groups[0] if p._ds_offload_fragment[2] >= tail.start]
    assert offloaded
    p = offloaded[-1]
    _, lp0, hp0, n = p._ds_offload_fragment
    # exactly what each part holds: the CPU master for the tail, DeepSpeed's (cut) partition for the head
    t0 = hp0 - tail.start
    assert torch.equal(safe_get_full_fp32_param(p).reshape(-1)[lp0:lp0 + n], tail.master[t0:t0 + n])
    q = opt.bit16_groups[0][0]
    _, lq, hq, m = q._ds_offload_fragment
    assert hq + m <= tail.start
    head = opt.single_partition_of_fp32_groups[0].detach()
    assert torch.equal(safe_get_full_fp32_param(q).reshape(-1)[lq:lq + m], head[hq:hq + m])
    plain.ds_offload.close()
    ours.ds_offload.close()


@pytest.mark.parametrize("weights", [False, True])
def test_set_writes_where_each_part_lives(weights):
    cfg = config(1, fraction=0.5)
    if weights:
        cfg["cpu_offloading"].update(WEIGHTS)
    _, engine = train(cfg, steps=2)
    for n, p in engine.module.named_parameters():
        value = torch.arange(p.numel(), dtype=torch.float32).view(p.shape) / 7.0
        safe_set_full_fp32_param(p, value)
        assert torch.equal(safe_get_full_fp32_param(p), value), n
        safe_set_full_optimizer_state(p, value * 2, "exp_avg")
        assert torch.equal(safe_get_full_optimizer_state(p, "exp_avg"), value * 2), n
    if weights:
        L = engine.ds_offload.weights.layers[0]
        p, o = L.params[0], L.offsets[0]
        assert torch.equal(L.master[o:o + p.numel()], (torch.arange(p.numel(), dtype=torch.float32) / 7.0))
    engine.ds_offload.close()


def test_gradients_and_unknown_states_are_refused_not_zeros():
    cfg = config(2, fraction=0.5)
    cfg["cpu_offloading"].update(WEIGHTS)
    _, engine = train(cfg, steps=1)
    for p in engine.module.parameters():
        with pytest.raises(RuntimeError, match="safe_get_full_grad is not available"):
            safe_get_full_grad(p)
        with pytest.raises(KeyError, match="exp_avg"):
            safe_get_full_optimizer_state(p, "momentum_buffer")
    engine.ds_offload.close()
