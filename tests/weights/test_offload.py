"""Weight offload of the first layers through ds_offload.initialize, against plain DeepSpeed of the same config.

On CPU the "device" copies are CPU tensors too, so the hooks, the gradient path, the norm, the CPU Adam
step and the checkpoints all run as on a GPU; what they cannot show (streams, GPU memory) is in the gpu tests.
"""
import pytest
import torch

import ds_offload
from ds_offload.errors import ConfigError
from ds_offload.models import GPT, GPTConfig, synthetic_batch
from ds_offload.weights.offload import WeightOffload

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("dist")]

CFG = GPTConfig(vocab_size=256, hidden=32, num_layers=3, num_heads=4, seq_len=16)
N = 2


def config(stage, dtype="fp32", gas=1, weights=True, fraction=None, overlap=False, clip=0.05):
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": gas, "gradient_clipping": clip,
           "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}}
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    block = {}
    if weights:
        block["model"] = {"cpu_offloading": True, "cpu_offloading_num_layers": N, "cpu_offloading_activations": False,
                          "cpu_offloading_weights": True}
    if fraction is not None:
        block["optimizer"] = {"optimizer_cpu_offload": True, "optimizer_offload_fraction": fraction,
                              "overlap_cpu_optimizer_d2h_h2d": overlap}
    if block:
        cfg["cpu_offloading"] = block
    return cfg


def make(cfg, seed=0):
    torch.manual_seed(seed)
    engine, *_ = ds_offload.initialize(model=GPT(CFG), config=cfg)
    return engine


def run(engine, steps, gas=1, start=0):
    losses = []
    for step in range(start, start + steps):
        for micro in range(gas):
            x, y = synthetic_batch(CFG, 4, step * gas + micro, device=engine.device)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    return losses


def offloaded(engine):
    return [p for L in engine.ds_offload.weights.layers for p in L.params]


@pytest.mark.parametrize("gas", [1, 4])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [1, 2])
def test_parity_with_plain_deepspeed(stage, dtype, gas):
    # bf16 over 10 steps: DeepSpeed's FusedAdam and its CPU Adam round a few ulps apart, which the bf16
    # weights turn into ~1e-4..1e-3 of loss (as for the optimizer offload); fp32 holds 1e-5 over 20 steps.
    steps = 20 if dtype == "fp32" else 10
    plain = run(make(config(stage, dtype, gas, weights=False)), steps, gas)
    engine = make(config(stage, dtype, gas))
    ours = run(engine, steps, gas)
    assert max(abs(a - b) for a, b in zip(plain, ours)) < (1e-3 if dtype == "bf16" else 1e-5)
    engine.ds_offload.close()


def test_where_parameters_gradients_and_states_live():
    engine = make(config(2, "bf16"))
    run(engine, 2)
    w = engine.ds_offload.weights
    ours = {id(p) for p in offloaded(engine)}
    assert len(ours) == sum(p.numel() > 0 for layer in engine.module.blocks[:N] for p in layer.parameters())
    in_deepspeed = {id(p) for g in engine.optimizer.bit16_groups for p in g}
    assert not ours & in_deepspeed  # out of DeepSpeed's partitions altogether
    assert {id(p) for layer in engine.module.blocks[N:] for p in layer.parameters()} <= in_deepspeed
    sd = engine.module.state_dict()
    for L in w.layers:
        assert L.device_copy is None  # nothing resident between uses
        assert L.working.dtype == torch.bfloat16 and L.master.dtype == torch.float32
        for t in (L.master, L.grad, L.exp_avg, L.exp_avg_sq, L.working):
            assert t.device.type == "cpu"
        assert torch.equal(L.working, L.master.to(torch.bfloat16))  # the working copy is the rounded master
        assert L.step == 2
        for p, v in zip(L.params, L.views(L.working)):
            assert p.grad is None and p.data_ptr() == v.data_ptr()  # params read the working copy
    name = {id(p): n for n, p in engine.module.named_parameters()}
    for p in offloaded(engine):
        assert torch.equal(sd[name[id(p)]], p.detach())
    assert "weights of the first 2 layers" in engine.ds_offload.summary()
    engine.ds_offload.close()


def test_with_optimizer_offload_of_the_rest_and_overlap(monkeypatch):
    from ds_offload.optimizer.zero import HybridZeroOptimizer
    plain = run(make(config(1, weights=False)), 10)
    inline_engine = make(config(1, fraction=0.5))
    inline = run(inline_engine, 10)
    speculating_engine = make(config(1, fraction=0.5, overlap=True))
    speculating = run(speculating_engine, 10)
    monkeypatch.setattr(HybridZeroOptimizer, "speculate", False)
    # and the layers' steps during backward off too (test_layer_speculation.py): every step after backward
    monkeypatch.setattr(WeightOffload, "speculate", lambda self, param_groups, use_torch: None)
    deferred_engine = make(config(1, fraction=0.5, overlap=True))
    deferred = run(deferred_engine, 10)
    assert max(abs(a - b) for a, b in zip(plain, inline)) < 1e-5
    assert deferred == inline
    assert deferred_engine.optimizer.split_info()["deferred"]
    # Clipping at 0.05 clips every step: the first step's CPU share, stepped during backward, is taken back
    # (to fp32 ulps), then the prediction steps after backward.
    assert speculating_engine.optimizer.speculation.rollbacks == 1
    assert max(abs(a - b) for a, b in zip(speculating, inline)) < 1e-5
    for e in (inline_engine, deferred_engine, speculating_engine):
        e.ds_offload.close()


def test_no_clipping_and_unused_layer_gradients():
    plain = run(make(config(2, weights=False, clip=0.0)), 6)
    engine = make(config(2, clip=0.0))
    assert max(abs(a - b) for a, b in zip(plain, run(engine, 6))) < 1e-5
    engine.ds_offload.close()


@pytest.mark.parametrize("stage, fix", [(0, "zero_optimization.stage to 1 or 2"), (3, "offload_param")])
def test_stages_without_it_are_refused_before_deepspeed(stage, fix, monkeypatch):
    import deepspeed
    monkeypatch.setattr(deepspeed, "initialize", lambda *a, **k: pytest.fail("must refuse first"))
    with pytest.raises(ConfigError) as info:
        make(config(stage))
    assert info.value.errors[0][0] == "cpu_offloading.model.cpu_offloading_weights" and fix in str(info.value)


def test_tied_parameter_is_refused(monkeypatch):
    import deepspeed
    monkeypatch.setattr(deepspeed, "initialize", lambda *a, **k: pytest.fail("must refuse first"))
    torch.manual_seed(0)
    model = GPT(CFG)
    model.ln.weight = model.blocks[0].ln1.weight  # the final norm shares a weight with offloaded layer 0
    with pytest.raises(ConfigError, match="tied weights"):
        ds_offload.initialize(model=model, config=config(1))


def test_cpu_memory_shortfall_is_one_clear_error(monkeypatch):
    import deepspeed

    import ds_offload.weights.plan as P
    monkeypatch.setattr(deepspeed, "initialize", lambda *a, **k: pytest.fail("must refuse first"))
    monkeypatch.setattr(P, "available_host_bytes", lambda: 1 << 10)
    with pytest.raises(ConfigError, match=r"needs 0\.0 GiB of CPU memory .* 0\.0 GiB are available"):
        make(config(1))


# ------------------------------------------------------------------------------------------- checkpoints
def test_resume_is_exact(tmp_path):
    engine = make(config(2, fraction=0.3))
    run(engine, 3)
    engine.save_checkpoint(str(tmp_path), tag="t")
    expected = run(engine, 3, start=3)
    resumed = make(config(2, fraction=0.3), seed=1)
    resumed.load_checkpoint(str(tmp_path), tag="t")
    assert run(resumed, 3, start=3) == expected
    for e in (engine, resumed):
        e.ds_offload.close()


def test_to_and_from_plain_deepspeed_weights_only(tmp_path):
    ours = make(config(1))
    run(ours, 3)
    ours.save_checkpoint(str(tmp_path / "ours"), tag="t")
    plain = make(config(1, weights=False), seed=1)
    with pytest.raises(Exception):
        plain.load_checkpoint(str(tmp_path / "ours"), tag="t")  # optimizer layouts differ
    plain = make(config(1, weights=False), seed=1)
    plain.load_checkpoint(str(tmp_path / "ours"), tag="t", load_optimizer_states=False)
    a, b = ours.module.state_dict(), plain.module.state_dict()
    assert all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)
    run(plain, 2, start=3)
    plain.save_checkpoint(str(tmp_path / "plain"), tag="t")
    back = make(config(1), seed=2)
    with pytest.raises(ValueError, match="saved without cpu_offloading.model.cpu_offloading_weights"):
        back.load_checkpoint(str(tmp_path / "plain"), tag="t")
    back = make(config(1), seed=2)
    back.load_checkpoint(str(tmp_path / "plain"), tag="t", load_optimizer_states=False)
    a, b = plain.module.state_dict(), back.module.state_dict()
    assert all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)
    for L in back.ds_offload.weights.layers:  # masters re-read from the loaded weights, not left at seed 2's
        assert torch.equal(L.master, L.working.float())
    before = [p.detach().clone() for p in offloaded(back)]
    run(back, 1, start=5)
    assert all((p - q).abs().max() < 1e-2 for p, q in zip(before, offloaded(back)))  # one small step from there
    for e in (ours, back):
        e.ds_offload.close()


def test_client_optimizer_with_two_param_groups():
    """A torch AdamW with decay and no-decay groups (as transformers' Trainer builds): the offloaded layers are
    stepped with their own group's hyperparameters, which differ inside one layer."""
    def client(model):
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        rest = [p for n, p in model.named_parameters() if p.ndim < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                 lr=1e-3)

    def train(block):
        torch.manual_seed(0)
        model = GPT(CFG)
        cfg = config(2, weights=False)
        del cfg["optimizer"]
        if block:
            cfg["cpu_offloading"] = block
        engine, *_ = ds_offload.initialize(model=model, optimizer=client(model), config=cfg)
        return run(engine, 10), engine

    plain, _ = train(None)
    ours, engine = train({"model": {"cpu_offloading": True, "cpu_offloading_num_layers": N,
                                    "cpu_offloading_activations": False, "cpu_offloading_weights": True}})
    assert len({g for L in engine.ds_offload.weights.layers for _, _, g in L.spans}) == 2
    assert max(abs(a - b) for a, b in zip(plain, ours)) < 1e-5
    engine.ds_offload.close()


def test_a_forward_dropped_without_backward_frees_its_graph(live_tensors):
    """Through the engine with weight offload: forwards whose losses are dropped unused leave nothing alive (the
    pack hook keeps a detached alias of what it leaves in place, never the tensor itself)."""
    engine = make(config(1))
    run(engine, 1)
    x, y = synthetic_batch(CFG, 4, 0, device=engine.device)
    before = live_tensors()
    for _ in range(3):
        loss = engine(x, y)
        del loss
    assert live_tensors() <= before
    assert run(engine, 1, start=1)          # and training goes on
    engine.ds_offload.close()


# ------------------------------------------------------------ ZeRO-0 (bf16): inside DeepSpeed's FP16_Optimizer
def _plain_masters_by_name(engine):
    """Plain DeepSpeed ZeRO-0's fp32 master of each parameter, by name."""
    from torch._utils import _unflatten_dense_tensors
    opt, names = engine.optimizer, {id(p): n for n, p in engine.module.named_parameters()}
    return {names[id(p)]: m for flat, group in zip(opt.fp32_groups_flat, opt.fp16_groups)
            for p, m in zip(group, _unflatten_dense_tensors(flat.detach(), group))}


@pytest.mark.parametrize("gas", [1, 4])
def test_zero0_parity_with_plain_deepspeed(gas):
    """After one step the offloaded layers' fp32 masters equal plain DeepSpeed's to fp32 rounding (which takes
    FP16_Optimizer's zero-gradient warm-up step for them too: one count and one weight decay; without it they
    differ by lr x wd x |w| at least); losses within 1e-3 over 10 steps (4 with accumulation), the bf16 noise of
    two Adam kernels on this tiny model."""
    from ds_offload.optimizer.fused import HybridFusedOptimizer
    plain_engine = make(config(0, "bf16", gas, weights=False))
    run(plain_engine, 1, gas)
    engine = make(config(0, "bf16", gas))
    run(engine, 1, gas)
    assert isinstance(engine.optimizer, HybridFusedOptimizer)
    want = _plain_masters_by_name(plain_engine)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    for L in engine.ds_offload.weights.layers:
        for p, o in zip(L.params, L.offsets):
            got = L.master[o:o + p.numel()].view(p.shape)
            if gas == 1:  # with accumulation plain DeepSpeed sums micro-steps in bf16 p.grad, we in fp32 on the host
                assert torch.allclose(got, want[names[id(p)]].cpu(), rtol=0, atol=2e-7), names[id(p)]
    engine.ds_offload.close()
    steps = 10 if gas == 1 else 4
    plain = run(make(config(0, "bf16", gas, weights=False)), steps, gas)
    engine = make(config(0, "bf16", gas))
    ours = run(engine, steps, gas)
    assert max(abs(a - b) for a, b in zip(plain, ours)) < 1e-3
    w = {id(p) for p in offloaded(engine)}
    assert not w & {id(p) for g in engine.optimizer.fp16_groups for p in g}  # out of DeepSpeed's groups
    assert all(p.grad is None and p.device.type == "cpu" for p in offloaded(engine))  # no zero grads from its reduce
    engine.ds_offload.close()


def test_zero0_with_optimizer_offload_of_the_rest_and_overlap():
    inline_engine = make(config(0, "bf16", fraction=0.5))
    inline = run(inline_engine, 6)
    deferred_engine = make(config(0, "bf16", fraction=0.5, overlap=True))
    deferred = run(deferred_engine, 6)
    assert deferred == inline and deferred_engine.optimizer.split_info()["deferred"]
    assert inline_engine.optimizer.split_info()["cpu_numel"] > 0
    for e in (inline_engine, deferred_engine):
        e.ds_offload.close()


def test_zero0_checkpoints(tmp_path):
    engine = make(config(0, "bf16", fraction=0.3))
    run(engine, 3)
    engine.save_checkpoint(str(tmp_path / "ours"), tag="t")
    expected = run(engine, 3, start=3)
    resumed = make(config(0, "bf16", fraction=0.3), seed=1)
    resumed.load_checkpoint(str(tmp_path / "ours"), tag="t")
    assert run(resumed, 3, start=3) == expected  # exact with the same config
    plain = make(config(0, "bf16", weights=False), seed=1)
    plain.load_checkpoint(str(tmp_path / "ours"), tag="t", load_module_only=True)
    run(plain, 1, start=6)
    plain.save_checkpoint(str(tmp_path / "plain"), tag="t")
    back = make(config(0, "bf16"), seed=2)
    with pytest.raises(ValueError, match="saved without cpu_offloading.model.cpu_offloading_weights"):
        back.load_checkpoint(str(tmp_path / "plain"), tag="t")
    back = make(config(0, "bf16"), seed=2)
    back.load_checkpoint(str(tmp_path / "plain"), tag="t", load_module_only=True)
    a, b = plain.module.state_dict(), back.module.state_dict()
    assert all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)
    for L in back.ds_offload.weights.layers:  # masters re-read from the loaded weights, not left at seed 2's
        assert torch.equal(L.master, L.working.float())
    for e in (engine, resumed, back):
        e.ds_offload.close()


def test_zero0_fp32_and_client_optimizers_are_refused(monkeypatch):
    import deepspeed
    monkeypatch.setattr(deepspeed, "initialize", lambda *a, **k: pytest.fail("must refuse first"))
    with pytest.raises(ConfigError, match="enable bf16 .or fp16. and describe the optimizer"):
        make(config(0, "fp32"))
    torch.manual_seed(0)
    model = GPT(CFG)
    cfg = config(0, "bf16")
    del cfg["optimizer"]
    with pytest.raises(ConfigError, match="no client optimizer"):
        ds_offload.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg)
