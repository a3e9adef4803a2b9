"""The split, the buckets and the state format of HybridDeviceOptimizer, without stepping it."""
import pytest
import torch

from ds_offload.optimizer.cpu_adam import CpuAdamBackend
from ds_offload.optimizer.layout import (Bucket, Piece, allocate_layout, bucket_runs, make_buckets, plan_layout,
                                         plan_split)
from ds_offload.optimizer.state import gather_state, scatter_state


def params(*sizes, dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(n).to(dtype)) for n in sizes]


def one_group(ps, **hyper):
    return [dict({"params": ps, "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}, **hyper)]


def cpu_spans(pieces):
    return sorted((pc.index, pc.start, pc.end) for pc in pieces if pc.on_cpu)


@pytest.mark.parametrize("f", [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.77, 0.999, 1.0])
def test_plan_split_puts_exactly_round_f_n_elements_on_the_cpu(f):
    ps = params(10, 7, 5, 1, 13)
    pieces, total = plan_split(one_group(ps), f)
    assert total == 36
    assert sum(pc.numel for pc in pieces if pc.on_cpu) == round(f * 36)
    # Every element of every parameter is in exactly one piece.
    for i, p in enumerate(ps):
        spans = sorted((pc.start, pc.end) for pc in pieces if pc.index == i)
        assert spans[0][0] == 0 and spans[-1][1] == p.numel()
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_plan_split_cuts_the_boundary_tensor_at_its_tail():
    ps = params(10, 7, 5)
    pieces, total = plan_split(one_group(ps), 0.5)  # budget 11: all of the last (5), the last 6 of the middle one
    assert total == 22
    assert cpu_spans(pieces) == [(1, 1, 7), (2, 0, 5)]
    assert sorted((pc.index, pc.start, pc.end) for pc in pieces if not pc.on_cpu) == [(0, 0, 10), (1, 0, 1)]
    # The walk is backwards: the last parameter comes first (its gradient arrives first).
    assert [(pc.index, pc.on_cpu) for pc in pieces] == [(2, True), (1, True), (1, False), (0, False)]


def test_plan_split_skips_frozen_params_but_keeps_their_index():
    ps = params(4, 6, 8)
    ps[1].requires_grad_(False)
    pieces, total = plan_split(one_group(ps), 1.0)
    assert total == 12
    assert {pc.index for pc in pieces} == {0, 2}


def test_plan_split_spans_param_groups():
    ps = params(4, 6, 8, 2)
    groups = one_group(ps[:2]) + one_group(ps[2:])
    pieces, _ = plan_split(groups, 0.6)  # 12 of 20: 2 + 8 of the second group, the last 2 of ps[1]
    assert cpu_spans(pieces) == [(1, 4, 6), (2, 0, 8), (3, 0, 2)]
    assert {(pc.index, pc.gi) for pc in pieces} == {(0, 0), (1, 0), (2, 1), (3, 1)}


def test_plan_split_refuses_non_contiguous_params():
    p = torch.nn.Parameter(torch.randn(4, 6).t())
    with pytest.raises(ValueError, match="contiguous"):
        plan_split(one_group([p]), 0.5)


def test_buckets_close_once_they_reach_bucket_numel():
    ps = params(3, 3, 3, 3, 9, 1)
    pieces, _ = plan_split(one_group(ps), 1.0)
    buckets = make_buckets(pieces, bucket_numel=5)
    # Arrival order (last param first): 1+9 closes the first bucket, 3+3 each of the next two.
    assert [[pc.index for pc in b.pieces] for b in buckets] == [[5, 4], [3, 2], [1, 0]]
    assert [b.numel for b in buckets] == [10, 6, 6]
    assert [b.id for b in buckets] == [0, 1, 2]
    assert [len(b.pieces) for b in make_buckets(pieces, bucket_numel=100)] == [6]


def test_a_split_param_counts_once_per_bucket():
    p = params(10)[0]
    pieces = [Piece(0, 0, p, 0, 4, True), Piece(0, 0, p, 4, 10, True)]
    b = Bucket(0, pieces)
    assert (b.numel, b.num_params, b.future, b.early, b.seen) == (10, 1, None, False, set())


def test_plan_layout_tables():
    ps = params(10, 7, 5)
    lay = plan_layout("key", one_group(ps), 0.5, 4, {id(p) for p in ps})
    assert (lay.key, lay.total, lay.cpu_numel, lay.on_cuda, lay.owns_model_params) == ("key", 22, 11, False, True)
    assert [(pc.index, pc.start, pc.end) for pc in lay.device_pieces] == [(1, 0, 1), (0, 0, 10)]
    assert {i: [(pc.start, pc.end) for pc in pcs] for i, pcs in lay.pieces_by_index.items()} == \
        {2: [(0, 5)], 1: [(1, 7), (0, 1)], 0: [(0, 10)]}
    assert all(lay.params_by_index[i] is p for i, p in enumerate(ps))
    assert [[b.id for b in lay.param_buckets[id(p)]] for p in ps[1:]] == [[1], [0]]
    assert id(ps[0]) not in lay.param_buckets
    # Allocation is a separate step: nothing is allocated yet.
    assert all(b.master is None for b in lay.buckets) and all(pc.master is None for pc in lay.pieces)
    assert not plan_layout("key", one_group(ps), 0.5, 4, set()).owns_model_params


def allocated(ps, f, bucket_numel=8):
    lay = plan_layout("key", one_group(ps), f, bucket_numel, {id(p) for p in ps})
    allocate_layout(lay, CpuAdamBackend(use_torch=True, adamw_mode=True), pin_params=False, pin_grads=False,
                    shared=False)
    return lay


def test_allocation_seeds_masters_and_views_bucket_buffers():
    ps = params(10, 7, 5, dtype=torch.bfloat16)
    lay = allocated(ps, 0.5)
    for b in lay.buckets:
        assert b.master.dtype == torch.float32 and b.master.numel() == b.numel
        for pc in b.pieces:
            assert pc.bucket is b
            assert pc.master.data_ptr() == b.master[pc.offset:].data_ptr()
    for pc in lay.pieces:
        assert torch.equal(pc.master, pc.param_view().float())
        assert pc.exp_avg.count_nonzero() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_gather_scatter_round_trip_is_exact(dtype):
    ps = params(10, 7, 5, dtype=dtype)
    src = allocated(ps, 0.5)
    gen = torch.Generator().manual_seed(3)
    for pc in src.pieces:
        pc.exp_avg.copy_(torch.randn(pc.numel, generator=gen))
        pc.exp_avg_sq.copy_(torch.rand(pc.numel, generator=gen))
        pc.master.copy_(torch.randn(pc.numel, generator=gen))
        pc.set_steps(7)
    state = gather_state(src.pieces_by_index, src.params_by_index)
    assert sorted(state) == [0, 1, 2]
    assert all(state[i]["exp_avg"].shape == p.shape and float(state[i]["step"]) == 7.0 for i, p in enumerate(ps))
    assert all(("master" in s) == (dtype != torch.float32) for s in state.values())
    for f in (0.0, 0.3, 1.0):  # a state dict loads under any fraction
        dst = allocated([torch.nn.Parameter(p.detach().clone()) for p in ps], f, bucket_numel=3)
        scatter_state(dst.pieces_by_index, state)
        back = gather_state(dst.pieces_by_index, dst.params_by_index)
        for i in state:
            assert state[i].keys() == back[i].keys()
            assert back[i]["step"] == state[i]["step"] == 7
            assert all(torch.equal(state[i][k], back[i][k]) for k in state[i] if k != "step")


def test_scatter_state_starts_absent_params_fresh():
    ps = params(10, 7)
    lay = allocated(ps, 0.5)
    for pc in lay.pieces:
        pc.exp_avg.fill_(1.0)
        pc.set_steps(3)
    full = gather_state(lay.pieces_by_index, lay.params_by_index)
    scatter_state(lay.pieces_by_index, {1: full[1]})
    assert all(pc.exp_avg.count_nonzero() == 0 and pc.steps_taken() == 0 for pc in lay.pieces_by_index[0])
    assert all(bool((pc.exp_avg == 1).all()) and pc.steps_taken() == 3 for pc in lay.pieces_by_index[1])


def covered(runs):
    return sorted(i for r in runs for i in range(r[0], r[1]))


def test_bucket_runs_cover_pieces_with_grad_with_their_group_and_step():
    ps = params(3, 3, 3, 3)
    groups = one_group(ps[:2]) + one_group(ps[2:], lr=2e-3)
    lay = plan_layout("key", groups, 1.0, 100, {id(p) for p in ps})
    allocate_layout(lay, CpuAdamBackend(use_torch=True, adamw_mode=True), False, False, False)
    (b,) = lay.buckets
    for p in ps:
        p.grad = torch.ones_like(p)
    ps[2].grad = None  # bucket order is 3, 2, 1, 0: elements 3..5 have no gradient
    runs = bucket_runs(b, groups)
    assert covered(runs) == [*range(0, 3), *range(6, 12)]
    assert all(r[3] == (2e-3 if r[1] <= 6 else 1e-3) and r[2] == 0 for r in runs)
    assert [pc.step for pc in b.pieces] == [1, 0, 1, 1]  # steps counted only where there was a gradient
    ps[2].grad = torch.ones_like(ps[2])
    runs = bucket_runs(b, groups)
    assert covered(runs) == list(range(12))
    assert {(r[0], r[2]) for r in runs} >= {(0, 1), (3, 0)}  # each run has one step count: 3..5 is behind
