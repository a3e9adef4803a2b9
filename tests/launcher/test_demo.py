"""`ds-offload demo --steps 3` on CPU, and the demo's table logic (ds_offload_cli.demo_run)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ds_offload.config import load_config
from ds_offload_cli import demo_run as D

REPO = Path(__file__).resolve().parents[2]

# Optimizer split on the CPU (torch's AdamW for the CPU share, so CI does not compile DeepSpeed's op) and
# activation offload (a no-op without CUDA, with one warning).
DEMO_CONFIG = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    "zero_optimization": {"stage": 1},
    "cpu_offloading": {
        "model": {"cpu_offloading": True, "cpu_offloading_num_layers": 2},
        "optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5,
                      "use_torch_optimizer_for_cpu_offload": True},
    },
}


@pytest.mark.slow
def test_demo_three_steps_on_cpu(tmp_path):
    cfg = tmp_path / "demo.json"
    cfg.write_text(json.dumps(DEMO_CONFIG))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):  # the demo sets up its own process group
        env.pop(k, None)
    res = subprocess.run([sys.executable, "-m", "ds_offload_cli.cli", "demo", "--steps", "3", "--config", str(cfg),
                          "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    text = res.stdout + res.stderr
    assert "final loss" in res.stdout and "max |loss delta|" in res.stdout, text[-4000:]
    assert "step time" in res.stdout and "peak GPU memory" in res.stdout and "CPU memory" in res.stdout
    report = json.loads((out / "demo.json").read_text())
    assert [len(r["losses"]) for r in report["runs"]] == [3, 3]
    import torch
    if not torch.cuda.is_available():
        assert "n/a: no GPU" in res.stdout
    try:
        import matplotlib  # noqa: F401
        assert (out / "demo.png").stat().st_size > 1000
    except ImportError:
        assert "pip install matplotlib" in res.stdout
    assert report["pass"], text[-4000:]
    assert res.returncode == 0
    assert "PASS" in res.stdout


def _run(losses, label="r"):
    return D.RunResult(label=label, losses=losses, step_times=[1.0, 0.2, 0.1], gpu_peak_per_step=[None] * 3,
                       cpu_rss_per_step=[10 * 2 ** 20, 12 * 2 ** 20, 11 * 2 ** 20])


def test_table_pass_fail_and_nan():
    base = _run([3.0, 2.5, 2.0])
    text, ok, delta = D.table(base, _run([3.0, 2.5004, 2.0002]), "x.json")
    assert ok and abs(delta - 4e-4) < 1e-9 and "PASS" in text and "n/a: no GPU" in text
    assert "150.0 ms" in text  # median after the first step
    text, ok, _ = D.table(base, _run([3.0, 2.6, 2.0]), "x.json")
    assert not ok and "FAIL" in text
    text, ok, delta = D.table(base, _run([3.0, float("nan"), float("nan")]), "x.json")
    assert not ok and math.isnan(delta) and "non-finite" in text


def test_model_is_deep_enough_for_the_config():
    _, cfg = D.model_for(load_config({"cpu_offloading": {"model": {"cpu_offloading_num_layers": 6}}}), "tiny-gpt")
    assert cfg.num_layers == 7
    _, cfg = D.model_for(load_config({}), "tiny-gpt")
    assert cfg.num_layers == 4


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = D.plot(_run([3.0, 2.5, 2.0], "no offload"), _run([3.0, 2.5, 2.0], "with x"), "x.json", tmp_path / "p.png")
    assert Path(path).stat().st_size > 1000
