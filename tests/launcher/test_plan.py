"""`ds-offload estimate`'s planning (ds_offload_cli.plan): what fits, the advice, the step-time cost, sizes."""
import dataclasses

import pytest

from ds_offload import memory as M
from ds_offload.config import load_config
from ds_offload_cli import plan as P


def test_what_fits_finds_the_least_offload():
    s = M.parse_model("reference-gpt")
    cfg = load_config({"torch_autocast": {"enabled": True}})
    base = M.estimate(s, cfg, micro_batch=8, seq_len=2048).baseline_gpu.total
    fits = P.what_fits(s, cfg, base + M.GiB, 8, seq_len=2048, reserve=M.GiB)
    assert fits["baseline_fits"] and fits["optimizer_fraction"] == 0.0
    budget = base - 2 * M.GiB
    fits = P.what_fits(s, cfg, budget, 8, seq_len=2048, reserve=0)
    assert not fits["baseline_fits"]
    f, k = fits["optimizer_fraction"], fits["activation_layers"]
    assert 0 < f <= 1 and 0 < k < s.layers

    def total(model=None, optimizer=None):
        c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **(model or {})),
                                optimizer=dataclasses.replace(cfg.optimizer, **(optimizer or {})))
        return M.estimate(s, c, micro_batch=8, seq_len=2048).offload_gpu.total
    assert total(optimizer=dict(optimizer_cpu_offload=True, optimizer_offload_fraction=f)) <= budget
    assert total(optimizer=dict(optimizer_cpu_offload=True, optimizer_offload_fraction=f - 0.01)) > budget
    assert total(model=dict(cpu_offloading=True, cpu_offloading_num_layers=k)) <= budget
    assert total(model=dict(cpu_offloading=True, cpu_offloading_num_layers=k - 1)) > budget


def test_advice_rows():
    s = M.parse_model("reference-gpt")
    none = load_config({})
    est = M.estimate(s, none, micro_batch=8, seq_len=2048)
    keys = lambda rows: {r[0] for r in rows}  # noqa: E731
    assert "pipeline" in keys(P.advice(est, none, pipeline_stages=4))
    assert "cuda_graphs" in keys(P.advice(est, load_config({"hybrid_engine": {"enable_cuda_graph": True}})))
    fits = {"baseline_fits": True, "optimizer_fraction": 0.0, "activation_layers": 0}
    assert keys(P.advice(est, none, fits=fits)) == {"throughput"}
    fits = {"baseline_fits": False, "optimizer_fraction": 0.3, "activation_layers": 4}
    assert {"moderate", "activations"} <= keys(P.advice(est, none, fits=fits))


def test_step_time_cost_by_hand():
    s = M.ModelSpec(name="m", layers=2, hidden=64, heads=4, vocab=100, params=1_000_000_000)
    cfg = {"cpu_offloading": {"optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5,
                                            "overlap_cpu_optimizer_d2h_h2d": False}}}
    est = M.estimate(s, load_config(cfg), micro_batch=1, seq_len=8, precision="fp32")
    measured = {"pinned_d2h_gbps": 20.0, "pinned_h2d_gbps": 40.0, "deepspeed_cpu_adam_params_per_s": 1e9,
                "torch_adam_params_per_s": 2e9}
    c = P.step_time_cost(est, measured)["optimizer"]
    assert c["cpu_adam_s"] == pytest.approx(0.5)                              # 0.5e9 elements at 1e9/s
    assert c["transfer_s"] == pytest.approx(0.5e9 * 4 / 20e9 + 0.5e9 * 4 / 40e9)  # 0.1 + 0.05
    assert c["added_s"] == pytest.approx(0.65)
    cfg["cpu_offloading"]["optimizer"]["overlap_cpu_optimizer_d2h_h2d"] = True
    assert P.step_time_cost(M.estimate(s, load_config(cfg), micro_batch=1, seq_len=8, precision="fp32"),
                            measured)["optimizer"]["added_s"] == pytest.approx(0.5)


def test_parse_size():
    assert P.parse_size("80GiB") == 80 * 2 ** 30
    assert P.parse_size("80GB") == 80 * 10 ** 9
    assert P.parse_size("24") == 24 * 2 ** 30
    assert P.parse_size("512MiB") == 512 * 2 ** 20
    with pytest.raises(ValueError):
        P.parse_size("lots")


def test_weights_in_what_fits_and_the_step_cost():
    s = M.parse_model("reference-gpt")
    cfg = load_config({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}})
    base = M.estimate(s, cfg, micro_batch=8, seq_len=2048).baseline_gpu.total
    budget = base - 3 * M.GiB
    fits = P.what_fits(s, cfg, budget, 8, seq_len=2048, reserve=0)
    w = fits["weight_layers"]
    assert w is not None and 0 < w < s.layers

    def total(k):
        c = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, cpu_offloading=True, cpu_offloading_num_layers=k,
                                                               cpu_offloading_activations=False,
                                                               cpu_offloading_weights=True))
        return M.estimate(s, c, micro_batch=8, seq_len=2048).offload_gpu.total
    assert total(w) <= budget < total(w - 1)
    zero0 = load_config({"bf16": {"enabled": True}})
    assert P.what_fits(s, zero0, budget, 8, seq_len=2048, reserve=0)["weight_layers"] is None  # ZeRO-1/2 only
    block = {"model": {"cpu_offloading": True, "cpu_offloading_num_layers": 8, "cpu_offloading_activations": False,
                       "cpu_offloading_weights": True}}
    est = M.estimate(s, load_config({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
                                     "cpu_offloading": block}), micro_batch=8, seq_len=2048)
    c = P.step_time_cost(est, {"deepspeed_cpu_adam_params_per_s": 4e9})["weights"]
    assert c["offloaded_params"] == 8 * s.layer_params and c["cpu_adam_s"] == pytest.approx(8 * s.layer_params / 4e9)
    # Weights (but the resident layers'), gradients and fp32 masters + moments of the 8 layers leave the GPU.
    gpu, base = est.offload_gpu, est.baseline_gpu
    assert base.params - gpu.params == pytest.approx(6 * s.layer_params * 2)
    assert base.optimizer - gpu.optimizer == pytest.approx(8 * s.layer_params * 12)
    assert est.offload_cpu.optimizer == pytest.approx(8 * s.layer_params * 16)
