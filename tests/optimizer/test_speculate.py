"""speculate.py: the CPU share stepped during backward, kept or taken back at step().

Against the same optimizer with speculation off (the step after backward): bit for bit where nothing clips
(the same CPU Adam runs on the same gradients), within fp32 rounding where clipping forces a rollback; and
against plain DeepSpeed. Also: when it applies, the prediction, a state dict between backward and step().
"""
import pytest
import torch

import ds_offload
from ds_offload.models import GPT, GPTConfig, synthetic_batch
from ds_offload.optimizer.cpu_adam import torch_adam_runs, undo_adamw
from ds_offload.optimizer.zero import HybridZeroOptimizer

CFG = GPTConfig(vocab_size=256, hidden=32, num_layers=3, num_heads=4, seq_len=16)


def config(stage=2, dtype="bf16", clip=0.0, gas=1, fraction=0.5, overlap=True, torch_cpu=False, wd=0.01,
           opt="AdamW"):
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": gas, "gradient_clipping": clip,
           "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9,
           "optimizer": {"type": opt, "params": {"lr": 1e-3, "weight_decay": wd}}}
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    if dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    if fraction is not None:
        cfg["cpu_offloading"] = {"optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": fraction,
                                               "overlap_cpu_optimizer_d2h_h2d": overlap,
                                               "use_torch_optimizer_for_cpu_offload": torch_cpu}}
    return cfg


def train(cfg, steps=6, speculate=True, monkeypatch=None, gas=1, trial=None):
    monkeypatch.setattr(HybridZeroOptimizer, "speculate", speculate)
    monkeypatch.setattr(HybridZeroOptimizer, "speculation_trial_steps", trial)  # None: no timing trial
    torch.manual_seed(0)
    engine, *_ = ds_offload.initialize(model=GPT(CFG), config=cfg)
    losses = []
    for step in range(steps):
        for micro in range(gas):
            x, y = synthetic_batch(CFG, 4, step * gas + micro, device=engine.device)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    engine.ds_offload.wait()
    tails = [t for t in getattr(engine.optimizer, "tails", []) if t is not None]
    masters = [t.master.clone() for t in tails]
    moments = [t.exp_avg_sq.clone() for t in tails]
    return losses, masters, moments, engine


@pytest.mark.parametrize("kernel", ["torch", "deepspeed"])
def test_undo_takes_back_one_step_within_fp32_rounding(kernel):
    from ds_offload.optimizer.cpu_adam import CpuAdamBackend
    torch.manual_seed(0)
    n = 100_000
    before = [torch.randn(n), torch.randn(n) * 1e-2, torch.randn(n) * 1e-3, torch.rand(n) * 1e-5]
    first = [before[0].clone(), before[1].clone(), torch.zeros(n), torch.zeros(n)]  # step 1: moments from zero
    for state, hyper in ((before, (4, 1e-3, 0.9, 0.999, 1e-8, 0.01)), (first, (0, 1e-3, 0.9, 0.999, 1e-8, 0.01))):
        bufs = [t.clone() for t in state]
        if kernel == "torch":
            torch_adam_runs(True, bufs, [(0, n, *hyper)])
        else:
            backend = CpuAdamBackend(False, True)
            backend.register(bufs)
            backend.start()
            backend.run(0, [(0, n, *hyper)])
            backend.close()
        change = (bufs[0] - state[0]).abs()  # the step's update of each weight
        assert change.max() > 0
        undo_adamw(bufs, 0, n, hyper, use_torch=kernel == "torch", span=30_000)  # spans that do not divide n
        g, eps = state[1], torch.finfo(torch.float32).eps
        # A few ulps of what each sum held: the weight and its update, the moment and its gradient term.
        # With the op's float constants (`_op_constants`; in double they moved DeepSpeed's update by 7e-6).
        tols = (4 * eps * (state[0].abs() + change), torch.zeros(n),
                4 * eps * (state[2].abs() + 0.1 * g.abs()), 4 * eps * (state[3].abs() + 1e-3 * g * g))
        for got, want, tol in zip(bufs, state, tols):
            assert ((got - want).abs() <= tol).all(), (got - want).abs().max()


@pytest.mark.slow
@pytest.mark.usefixtures("dist")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("stage", [1, 2])
def test_nothing_clipped_equals_the_step_after_backward_bit_for_bit(stage, dtype, monkeypatch):
    plain = train(config(stage, dtype), speculate=False, monkeypatch=monkeypatch)
    ours = train(config(stage, dtype), monkeypatch=monkeypatch)
    opt = ours[3].optimizer
    assert opt.speculation is not None and opt.split_info()["speculative"]
    assert opt.speculation.rollbacks == 0 and opt.speculation.speculated == 6  # every step, all kept
    assert ours[0] == plain[0]
    assert all(torch.equal(a, b) for a, b in zip(ours[1] + ours[2], plain[1] + plain[2]))
    for e in (plain[3], ours[3]):
        e.ds_offload.close()


@pytest.mark.slow
@pytest.mark.usefixtures("dist")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [1, 2])
def test_clipping_rolls_back_and_matches_within_rounding(stage, dtype, monkeypatch):
    # clip 0.05: the tiny model's norm is ~1, so every step clips: the first speculates and rolls back, the
    # next ones are predicted to clip and step after backward (armed again only after a step that did not clip).
    if dtype == "fp32":  # the rolled-back step's masters: within 2 ulps (Adam's first steps amplify an ulp later)
        one = train(config(stage, dtype, clip=0.05), steps=1, monkeypatch=monkeypatch)
        one_plain = train(config(stage, dtype, clip=0.05), steps=1, speculate=False, monkeypatch=monkeypatch)
        assert one[3].optimizer.speculation.rollbacks == 1
        for a, b in zip(one[1], one_plain[1]):
            assert torch.allclose(a, b, rtol=0, atol=2 * torch.finfo(torch.float32).eps), (a - b).abs().max()
    plain = train(config(stage, dtype, clip=0.05), speculate=False, monkeypatch=monkeypatch)
    ours = train(config(stage, dtype, clip=0.05), monkeypatch=monkeypatch)
    s = ours[3].optimizer.speculation
    assert s.rollbacks == 1 and s.speculated == 1 and not s.armed
    assert max(abs(a - b) for a, b in zip(ours[0], plain[0])) < (1e-3 if dtype == "bf16" else 1e-5)
    reference = train(config(stage, dtype, clip=0.05, fraction=None), speculate=False, monkeypatch=monkeypatch)
    assert max(abs(a - b) for a, b in zip(ours[0], reference[0])) < 1e-3  # plain DeepSpeed
    for e in (plain[3], ours[3]):
        e.ds_offload.close()


@pytest.mark.slow
@pytest.mark.usefixtures("dist")
def test_a_step_that_did_not_clip_arms_the_next(monkeypatch):
    # Clipping at 0.95: the tiny model's norms sit between 0.91 and 0.97, some steps clip and some do not, so
    # the prediction flips; every rollback is exact to rounding, so the losses stay with speculation off's.
    plain = train(config(2, "fp32", clip=0.95), steps=12, speculate=False, monkeypatch=monkeypatch)
    ours = train(config(2, "fp32", clip=0.95), steps=12, monkeypatch=monkeypatch)
    s = ours[3].optimizer.speculation
    assert s.rollbacks >= 1 and s.speculated > s.rollbacks  # the prediction flipped both ways
    assert max(abs(a - b) for a, b in zip(ours[0], plain[0])) < 1e-5
    for e in (plain[3], ours[3]):
        e.ds_offload.close()


@pytest.mark.slow
@pytest.mark.usefixtures("dist")
@pytest.mark.parametrize("why", ["gas 4", "overlap off", "Adam with L2 decay"])  # fp16 (loss scaling): GPU test
def test_off_where_the_hook_gradient_is_not_the_step_s(why, monkeypatch):
    cfg = {"gas 4": config(gas=4), "overlap off": config(overlap=False),
           "Adam with L2 decay": config(opt="Adam")}[why]
    if why == "Adam with L2 decay":
        cfg["optimizer"]["params"]["adam_w_mode"] = False
    _, _, _, engine = train(cfg, steps=2, monkeypatch=monkeypatch, gas=cfg["gradient_accumulation_steps"])
    assert engine.optimizer.speculation is None and not engine.optimizer.split_info()["speculative"]
    engine.ds_offload.close()


@pytest.mark.slow
@pytest.mark.usefixtures("dist")
def test_a_state_dict_between_backward_and_step_takes_the_speculation_back(monkeypatch):
    # Compared right after the step that was taken back: Adam's first steps amplify ulps (1e-7 relative noise
    # in the moments before step 1 moves the masters by 1.4e-5 after step 2, with speculation off).
    plain = train(config(2, "fp32"), steps=2, speculate=False, monkeypatch=monkeypatch)
    monkeypatch.setattr(HybridZeroOptimizer, "speculate", True)
    monkeypatch.setattr(HybridZeroOptimizer, "speculation_trial_steps", None)
    torch.manual_seed(0)
    engine, *_ = ds_offload.initialize(model=GPT(CFG), config=config(2, "fp32"))
    for step in range(2):
        x, y = synthetic_batch(CFG, 4, step, device=engine.device)
        engine.backward(engine(x, y))
        if step == 1:
            engine.optimizer.state_dict()  # must see the state before this step, not the speculative one
            assert engine.optimizer.speculation.void and not engine.optimizer.speculation.sent
        engine.step()
    engine.ds_offload.wait()
    for t, want in zip((t for t in engine.optimizer.tails if t is not None), plain[1]):
        assert torch.allclose(t.master, want, rtol=0, atol=1e-6), (t.master - want).abs().max()
    assert engine.optimizer.speculation.speculated == 1  # step 0; step 1's was taken back
    engine.ds_offload.close()
    plain[3].ds_offload.close()


def test_the_trial_keeps_the_faster_schedule():
    from ds_offload.optimizer.speculate import Trial
    for with_s, without_s, keep in ((1.0, 2.0, True), (2.0, 1.0, False)):
        now = [0.0]
        t = Trial(3, clock=lambda: now[0])
        modes = []
        for step in range(12):
            on = t.wanted()
            modes.append(on)
            now[0] += with_s if on else without_s
            decided = t.record(on)
            assert decided == (step == Trial.WARM + 2 * 3 - 1)
        assert modes[:5] == [True] * 5 and modes[5:8] == [False] * 3  # warm 2 + 3 with, then 3 without
        assert modes[8:] == [keep] * 4 and t.choice is keep
        assert t.summary() == {"choice": keep, "with_s": with_s, "without_s": without_s}
    assert Trial(None).wanted() and Trial(None).choice  # no trial: always


def test_a_trial_where_every_step_clipped_turns_speculation_off():
    from ds_offload.optimizer.speculate import Trial
    t = Trial(2, clock=iter(range(100)).__next__)
    for _ in range(Trial.WARM + 4):
        t.record(False)  # clipping kept every backward from speculating: nothing timed with it
    assert t.choice is False and t.summary()["with_s"] is None


@pytest.mark.slow
@pytest.mark.usefixtures("dist")
def test_the_engine_keeps_the_step_after_backward_where_speculation_is_slower(monkeypatch):
    ref = train(config(2, "fp32"), steps=12, speculate=False, monkeypatch=monkeypatch)
    monkeypatch.setattr(HybridZeroOptimizer, "speculate", True)
    monkeypatch.setattr(HybridZeroOptimizer, "speculation_trial_steps", 2)
    torch.manual_seed(0)
    engine, *_ = ds_offload.initialize(model=GPT(CFG), config=config(2, "fp32"))
    s = engine.optimizer.speculation
    now = [0.0]

    def clock():  # a step that speculated takes 2 s, one that did not 1 s
        now[0] += 2.0 if s.this_step else 1.0
        return now[0]
    s.trial.clock = clock
    losses = []
    for step in range(12):
        x, y = synthetic_batch(CFG, 4, step, device=engine.device)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    info = engine.optimizer.split_info()
    assert info["speculation_trial"]["choice"] is False and not info["speculative"]
    assert s.speculated == _steps_with_speculation(2)  # the warm-up and the trial's steps with it, none after
    assert losses == ref[0]  # kept speculative steps and steps after backward: the same numbers
    engine.ds_offload.close()
    ref[3].ds_offload.close()


def _steps_with_speculation(n):
    from ds_offload.optimizer.speculate import Trial
    return Trial.WARM + n


@pytest.mark.slow
@pytest.mark.usefixtures("dist")
def test_an_overflow_skips_the_step_and_takes_back_the_finite_chunks(monkeypatch):
    """fp32: a non-finite gradient in the CPU share makes DeepSpeed skip the step. The chunk holding it is never
    stepped (undoing a step on infinities is impossible); the finite ones are taken back."""
    def run(speculate, steps):
        monkeypatch.setattr(HybridZeroOptimizer, "speculate", speculate)
        monkeypatch.setattr(HybridZeroOptimizer, "speculation_trial_steps", None)
        import ds_offload.optimizer.tail_steps as T
        monkeypatch.setattr(T, "CHUNK_NUMEL", 3000)  # several chunks: finite ones beside the poisoned one
        torch.manual_seed(0)
        engine, *_ = ds_offload.initialize(model=GPT(CFG), config=config(2, "fp32"))
        last = list(engine.module.parameters())[-1]  # in the CPU share (the partition's end)
        losses = []
        for step in range(steps):
            x, y = synthetic_batch(CFG, 4, step, device=engine.device)
            h = last.register_hook(lambda g: g.clone().fill_(float("nan"))) if step == 1 else None
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            if h is not None:
                h.remove()
            losses.append(loss.item())
        engine.ds_offload.wait()
        return losses, [t.master.clone() for t in engine.optimizer.tails if t is not None], engine
    # Right after the skipped step: the finite chunks are back to within ulps of step 0's masters.
    plain, ours = run(False, 2), run(True, 2)
    assert ours[2].optimizer.tails[0].step == plain[2].optimizer.tails[0].step == 1  # step 1 skipped
    for a, b in zip(ours[1], plain[1]):
        assert torch.isfinite(a).all() and torch.allclose(a, b, rtol=0, atol=4 * 1.2e-7), (a - b).abs().max()
    # And training goes on: two more steps (the skip disarmed step 2, step 3 speculates again).
    plain4, ours4 = run(False, 4), run(True, 4)
    assert ours4[2].optimizer.speculation.speculated == 3
    assert max(abs(a - b) for a, b in zip(ours4[0], plain4[0])) < 1e-5
    for e in (plain[2], ours[2], plain4[2], ours4[2]):
        e.ds_offload.close()


@pytest.mark.slow
@pytest.mark.usefixtures("dist")
def test_a_parameter_without_gradient_turns_speculation_off_with_a_warning(monkeypatch):
    plain = train(config(2, "fp32"), steps=3, speculate=False, monkeypatch=monkeypatch)
    monkeypatch.setattr(HybridZeroOptimizer, "speculate", True)
    torch.manual_seed(0)
    engine, *_ = ds_offload.initialize(model=GPT(CFG), config=config(2, "fp32"))
    s = engine.optimizer.speculation
    s.pieces.pop(id(list(engine.module.parameters())[-1]))  # as if it were unused: its chunk never completes
    losses = []
    with pytest.warns(UserWarning, match="no longer starts during backward"):
        for step in range(3):
            x, y = synthetic_batch(CFG, 4, step, device=engine.device)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
    assert s.disabled and s.speculated == 0 and not engine.optimizer.split_info()["speculative"]
    assert max(abs(a - b) for a, b in zip(losses, plain[0])) < 1e-5
    engine.ds_offload.close()
    plain[3].ds_offload.close()
