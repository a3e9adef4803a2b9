"""prepare_hybrid_optimizer: the hybrid optimizer from DeepSpeed's optimizer section and the typed block."""
import pytest
import torch

from ds_offload.config import OptimizerOffloadConfig, load_config
from ds_offload.errors import ConfigError
from ds_offload.optimizer import prepare_hybrid_optimizer

SHAPES = [(64, 32), (32,), (128, 64), (64,), (10, 64), (7,)]


def make_params(dtype=torch.float32):
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in SHAPES]


def test_prepare_hybrid_optimizer_reads_deepspeed_section():
    ps = make_params()
    ds = {"train_batch_size": 4, "zero_optimization": {"stage": 2, "elastic_checkpoint": True},
          "optimizer": {"type": "Adam", "params": {"lr": 3e-4, "betas": [0.8, 0.9], "eps": 1e-6,
                                                  "weight_decay": 0.1, "adam_w_mode": False}}}
    settings = OptimizerOffloadConfig(optimizer_cpu_offload=True, optimizer_offload_fraction=0.25,
                                      overlap_cpu_optimizer_d2h_h2d=True, use_torch_optimizer_for_cpu_offload=True,
                                      pin_cpu_grads=False, pin_cpu_params=True)
    opt, cfg = prepare_hybrid_optimizer(ds, settings, ps)
    assert "optimizer" not in cfg and "optimizer" in ds  # the caller's dict is left alone
    assert cfg["zero_allow_untested_optimizer"] is True
    assert cfg["zero_optimization"]["elastic_checkpoint"] is False
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (3e-4, (0.8, 0.9), 1e-6, 0.1)
    assert (opt.offload_fraction, opt.adamw_mode, opt.use_torch_cpu, opt.pin_cpu_grads, opt.overlap) == \
        (0.25, False, True, False, True)
    # Only Adam and AdamW: checked once, when the config is validated (before prepare_hybrid_optimizer runs).
    lamb = {"train_batch_size": 4, "optimizer": {"type": "Lamb", "params": {}},
            "cpu_offloading": {"optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.25}}}
    with pytest.raises(ConfigError, match=r"optimizer\.type") as err:
        load_config(lamb)
    assert "optimizer.type" in [path for path, _ in err.value.errors]
