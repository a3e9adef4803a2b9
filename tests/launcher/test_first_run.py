"""What a new user meets first: --version, op builds that say what they do, estimate's advice."""
import json
import os

import pytest
import torch
from click.testing import CliRunner

from ds_offload_cli import build_ops as B
from ds_offload_cli.cli import main


def test_version():
    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("ds-offload, version ")


def test_arch_list_with_arch_specific_targets_is_fixed_for_our_builds(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90a"])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    said = []
    assert B.fix_cuda_arch_list(echo=said.append) == "9.0"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0" and "export TORCH_CUDA_ARCH_LIST=9.0" in said[0]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")  # the user's own setting wins
    assert B.fix_cuda_arch_list(echo=said.append) is None and os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_80", "sm_90"])
    assert B.fix_cuda_arch_list(echo=said.append) is None and "TORCH_CUDA_ARCH_LIST" not in os.environ


def test_build_says_compiling_only_when_it_compiles(monkeypatch, tmp_path):
    class Builder:
        def is_compatible(self, verbose=False):
            return True

        def load(self, verbose=False):
            (tmp_path / "cpu_adam.so").write_bytes(b"")

    import deepspeed.ops.op_builder as ob
    monkeypatch.setattr(ob, "CPUAdamBuilder", Builder)
    monkeypatch.setattr(B, "op_cache_dir", lambda name: str(tmp_path))
    said = []
    B.build_op("cpu_adam", echo=said.append)
    assert "compiling DeepSpeed" in said[0]
    said.clear()
    B.build_op("cpu_adam", echo=said.append)
    assert "already built" in said[0] and not any("compiling DeepSpeed" in s for s in said)


def test_estimate_gives_advice_when_gpu_memory_is_given(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
                               "zero_optimization": {"stage": 1},
                               "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                               "cpu_offloading": {"optimizer": {"optimizer_cpu_offload": True,
                                                                "optimizer_offload_fraction": 0.5}}}))
    for memory in ("80GiB", "20GiB"):
        res = CliRunner().invoke(main, ["estimate", "--model", "params=7B,layers=32,hidden=4096", "--config",
                                        str(cfg), "--gpu-memory", memory])
        assert res.exit_code == 0, res.output
        assert "pass --gpu-memory" not in res.output
        assert "->" in res.output or "none applies: no offload setting fits" in res.output


def test_example_with_a_bad_config_prints_the_problems_and_exits_1(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1,
                               "cpu_offloading": {"optimizer": {"optimizer_offload_fraction": 1.5}}}))
    res = subprocess.run([sys.executable, os.path.join(root, "examples", "train_gpt.py"), "--deepspeed_config",
                          str(cfg), "--steps", "1"], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")})
    assert res.returncode == 1, res.stderr
    assert "cpu_offloading.optimizer.optimizer_offload_fraction" in res.stderr
    assert "Traceback" not in res.stderr


def test_launch_reports_override_and_config_problems_in_one_pass(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "zero_optimisation": {},
                               "cpu_offloading": {"model": {"cpu_offloading": True, "cpu_offloading_num_layers": 2.0}}}))
    res = CliRunner().invoke(main, ["launch", "--dry-run", "s.py", "--deepspeed_config", str(cfg),
                                    "optimizer.optimizer_offload_fraction=oops", "model.cpu_offloading_weights=true"])
    assert res.exit_code == 1
    out = res.output
    assert "optimizer.optimizer_offload_fraction" in out  # the override that failed
    assert "cpu_offloading.model.cpu_offloading_num_layers" in out  # the file's own problem
    assert "cpu_offloading.model.cpu_offloading_weights" in out  # a good override's consequence
