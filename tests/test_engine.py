"""ds_offload.initialize against plain deepspeed.initialize, on DeepSpeed's CPU accelerator."""
import argparse
import json
import warnings

import pytest
import torch

import ds_offload
from ds_offload import ConfigError
from ds_offload.models import GPT, GPTConfig, synthetic_batch

CFG = GPTConfig(vocab_size=256, hidden=32, num_layers=3, num_heads=4, seq_len=16)


def ds_config(stage, **extra):
    return {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.05, "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}, **extra}


def train(init, config, steps=5):
    import deepspeed
    torch.manual_seed(0)
    engine, *_ = init(model=GPT(CFG), config=config)
    losses = []
    for step in range(steps):
        x, y = synthetic_batch(CFG, 2, step)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses, engine


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_block_off_equals_plain_deepspeed(dist, stage):
    import deepspeed
    plain, _ = train(deepspeed.initialize, ds_config(stage))
    off = ds_config(stage, cpu_offloading={"model": {"cpu_offloading": False},
                                           "optimizer": {"optimizer_cpu_offload": False}})
    ours, engine = train(ds_offload.initialize, off)
    absent, _ = train(ds_offload.initialize, ds_config(stage))
    assert ours == plain and absent == plain
    assert engine.ds_offload.activation_offload is None and engine.ds_offload.optimizer is None


def test_args_deepspeed_config_is_read(dist, tmp_path):
    import deepspeed
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds_config(0, cpu_offloading={})))
    args = argparse.Namespace(deepspeed_config=str(path), local_rank=0)
    torch.manual_seed(0)
    engine, *_ = ds_offload.initialize(args=args, model=GPT(CFG))
    assert args.deepspeed_config == str(path)  # the caller's namespace is not modified
    assert engine.train_micro_batch_size_per_gpu() == 2


def test_bad_config_fails_before_deepspeed(monkeypatch):
    import deepspeed

    def boom(*a, **k):
        raise AssertionError("deepspeed.initialize must not run for a bad config")

    monkeypatch.setattr(deepspeed, "initialize", boom)
    cfg = ds_config(0, cpu_offloading={"model": {"cpu_offloading": True, "cpu_offloading_num_layers": 3}})
    with pytest.raises(ConfigError, match="CPU offloading can be done only for layers less than 3"):
        ds_offload.initialize(model=GPT(CFG), config=cfg)


def test_weights_refused_not_ignored(monkeypatch):
    import deepspeed
    monkeypatch.setattr(deepspeed, "initialize", lambda *a, **k: pytest.fail("must refuse first"))
    cfg = ds_config(0, cpu_offloading={"model": {"cpu_offloading": True, "cpu_offloading_num_layers": 1,
                                                 "cpu_offloading_weights": True}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError) as info:
            ds_offload.initialize(model=GPT(CFG), config=cfg)
    assert info.value.errors[0][0] == "cpu_offloading.model.cpu_offloading_weights"


def test_pipeline_module_refused():
    from deepspeed.pipe import PipelineModule

    class FakePipe(PipelineModule):
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.num_stages = 2
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(4))

    cfg = ds_config(0, cpu_offloading={"model": {"cpu_offloading": True, "cpu_offloading_num_layers": 1}})
    with pytest.raises(ConfigError, match="no support for Pipeline parallelism"):
        ds_offload.initialize(model=FakePipe(), config=cfg)


def test_model_flags_checked():
    model = GPT(CFG)
    model.fine_grained_activation_offloading = True
    cfg = ds_config(0, cpu_offloading={"model": {"cpu_offloading": True, "cpu_offloading_num_layers": 1}})
    with pytest.raises(ConfigError, match="fine_grained_activation_offloading cannot be enabled"):
        ds_offload.initialize(model=model, config=cfg)
    model = GPT(CFG)
    model.is_gradient_checkpointing = True
    with pytest.raises(ConfigError, match="activation recomputation is enabled"):
        ds_offload.initialize(model=model, config=cfg)


def test_client_optimizer_with_optimizer_offload_refused():
    model = GPT(CFG)
    cfg = ds_config(0, cpu_offloading={"optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5}})
    with pytest.raises(ConfigError, match="drop optimizer="):
        ds_offload.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_layer_offload_without_cuda_warns_and_changes_nothing(dist):
    import deepspeed
    plain, _ = train(deepspeed.initialize, ds_config(1))
    cfg = ds_config(1, cpu_offloading={"model": {"cpu_offloading": True, "cpu_offloading_num_layers": 2}})
    with pytest.warns(UserWarning, match="no CUDA device"):
        ours, engine = train(ds_offload.initialize, cfg)
    assert ours == plain
    assert engine.ds_offload.activation_offload is None
    assert "inactive" in engine.ds_offload.summary()


def offload_config(stage, fraction, **extra):
    return ds_config(stage, cpu_offloading={"optimizer": {"optimizer_cpu_offload": True,
                                                          "optimizer_offload_fraction": fraction,
                                                          "overlap_cpu_optimizer_d2h_h2d": True}}, **extra)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_optimizer_offload_loss_parity_through_initialize(dist, stage):
    """The seeds' success criterion: loss within 1e-3 of the no-offload run, here over 20 steps."""
    import deepspeed
    from ds_offload.optimizer import HybridDeviceOptimizer
    plain, _ = train(deepspeed.initialize, ds_config(stage), steps=20)
    ours, engine = train(ds_offload.initialize, offload_config(stage, 0.5), steps=20)
    assert max(abs(a - b) for a, b in zip(plain, ours)) < 1e-3
    from ds_offload.optimizer.zero import HybridZeroOptimizer
    # ZeRO-1/2: DeepSpeed's own optimizer with its partition cut; ZeRO-0: the hybrid as its client optimizer.
    assert isinstance(engine.ds_offload.optimizer, HybridZeroOptimizer if stage else HybridDeviceOptimizer)
    assert engine.ds_offload.optimizer.split_info()["cpu_numel"] > 0
    summary = engine.ds_offload.summary()
    assert "50% of the optimizer on the CPU" in summary
    n = engine.ds_offload.optimizer.split_info()["cpu_numel"]
    assert f"{n / 1e6:.2f}M elements with fp32 masters, moments and gradient buffers in CPU memory" in summary


def test_close_releases_optimizer_and_hooks(dist):
    """End of training: close() drops the CPU optimizer's buffers and hooks, and is safe to repeat."""
    _, engine = train(ds_offload.initialize, offload_config(0, 0.5), steps=2)
    opt = engine.ds_offload.optimizer
    assert opt.split_info()["cpu_numel"] > 0 and opt._layout is not None
    engine.ds_offload.close()
    assert opt._layout is None and opt._backend is None and not opt._hook_handles
    engine.ds_offload.close()


def _module_only_resume(init, cfg, path):
    """Two steps from another init (the masters hold it), a module-only load, then one more step."""
    x, y = synthetic_batch(CFG, 2, 100)
    torch.manual_seed(1)
    engine, *_ = init(model=GPT(CFG), config=cfg)
    for _ in range(2):
        engine.backward(engine(x, y))
        engine.step()
    engine.load_checkpoint(str(path), tag="t", load_module_only=True)
    with torch.no_grad():
        loaded = engine(x, y).item()
    engine.backward(engine(x, y))
    engine.step()
    with torch.no_grad():
        after = engine(x, y).item()
    return loaded, after


def test_module_only_load_refreshes_cpu_masters(dist, tmp_path):
    """Loading weights without optimizer state must not leave stale CPU masters behind: the step after the
    load equals plain DeepSpeed's after the same load (DeepSpeed refreshes its fp32 partition from the weights;
    stale masters would drag the weights back to the other init)."""
    import deepspeed
    cfg = offload_config(2, 1.0)
    cfg["optimizer"]["params"]["lr"] = 1e-2
    train(ds_offload.initialize, cfg, steps=15)[1].save_checkpoint(str(tmp_path), tag="t")
    plain_cfg = ds_config(2)
    plain_cfg["optimizer"]["params"]["lr"] = 1e-2
    plain = _module_only_resume(deepspeed.initialize, plain_cfg, tmp_path)
    ours = _module_only_resume(ds_offload.initialize, cfg, tmp_path)
    assert ours[0] == plain[0]  # the same loaded weights
    assert abs(ours[1] - plain[1]) < 1e-3, (ours, plain)
