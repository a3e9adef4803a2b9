"""`ds-offload demo` on CPU, and the demo's pieces (ds_offload_cli.demo_run): data, table, figure, output."""
import json
import logging
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ds_offload.config import load_config
from ds_offload.models import GPT, GPT_SHAPES, learnable_batch, synthetic_batch
from ds_offload_cli import demo_run as D
from ds_offload_cli.demo import UNTESTED_NOTE, DemoOutput, _Records, demo as demo_command

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
TABLE_ROWS = ("final loss", "loss parity", "max |loss delta|", "step time (median)", "step time ratio",
              "peak GPU memory", "GPU memory saved", "CPU memory (peak RSS)")
DEMO_STEPS = next(p.default for p in demo_command.params if p.name == "steps")


def png_title(path):
    from PIL import Image
    with Image.open(path) as im:
        return im.text.get("Title", "")


@pytest.mark.slow
def test_demo_on_cpu(tmp_path):
    steps = 8
    cfg = tmp_path / "demo.json"
    cfg.write_text(json.dumps(DEMO_CONFIG))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):  # the demo sets up its own process group
        env.pop(k, None)
    res = subprocess.run([sys.executable, "-m", "ds_offload_cli.cli", "demo", "--steps", str(steps), "--config",
                          str(cfg), "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    text = res.stdout + res.stderr
    for row in TABLE_ROWS:
        assert row in res.stdout, (row, text[-4000:])
    report = json.loads((out / "demo.json").read_text())
    base, off = report["runs"]
    assert [len(r["losses"]) for r in report["runs"]] == [steps, steps]
    assert base["losses"][-1] < base["losses"][0] - 0.5, base["losses"]  # the learnable data is learnt
    assert report["step_time_ratio"] == pytest.approx(off["step_time"] / base["step_time"])
    assert f"{report['step_time_ratio']:.2f}x" in res.stdout

    # ds_offload's summary: the offloaded run's, once and labelled; the baseline's not at all
    body = off["summary"].removeprefix("ds_offload: ")
    assert body and text.count(body) == 1, text[-4000:]
    assert f"ds_offload summary (with {cfg.name}): {body}" in res.stdout
    assert "nothing offloaded" not in text
    # warnings as one line each, no source lines; DeepSpeed's unconditional prints left out
    assert "UserWarning" not in text and "ds_offload.initialize(" not in text, text[-4000:]
    assert "built successfully" not in text and "Setting accelerator to CPU" not in text
    if not torch.cuda.is_available():
        assert "warning: ds_offload: no CUDA device" in res.stderr
        assert off["warnings"] and all(w.startswith("warning: ") for w in off["warnings"])
        assert res.stdout.count(D.NO_GPU) == 3  # both peaks and the saving
        assert report["device"] == "CPU" and report["gpu_saved_bytes"] is None
    else:
        assert report["gpu_saved_bytes"] == base["gpu_peak"] - off["gpu_peak"]
    assert report["device"] in report["title"] and "PASS" in report["title"]
    try:
        import matplotlib  # noqa: F401
        assert (out / "demo.png").stat().st_size > 1000
        assert png_title(out / "demo.png") == report["title"]
    except ImportError:
        assert "pip install matplotlib" in res.stdout
    assert report["pass"], text[-4000:]
    assert res.returncode == 0
    assert "PASS" in res.stdout


def _train_plain(batch, steps, lr):
    """Loss per step of the demo's CPU model under torch's AdamW: the data's learnability, without DeepSpeed."""
    cfg = GPT_SHAPES["tiny-gpt"]
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        loss = model(*batch(cfg, 8, step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_learnable_batch_loss_falls_within_the_demo_steps():
    lr = json.loads((REPO / "configs" / "combined.json").read_text())["optimizer"]["params"]["lr"]  # the default
    learnt = _train_plain(learnable_batch, DEMO_STEPS, lr)
    uniform = _train_plain(synthetic_batch, DEMO_STEPS, lr)
    assert learnt[-1] < learnt[0] - 1.0, learnt
    assert learnt[0] - learnt[-1] > 5 * abs(uniform[0] - uniform[-1]), (learnt, uniform)


def test_learnable_batch_is_deterministic_and_next_token():
    cfg = GPT_SHAPES["tiny-gpt"]
    x, y = learnable_batch(cfg, 4, step=3)
    x2, y2 = learnable_batch(cfg, 4, step=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, learnable_batch(cfg, 4, step=4)[0])
    assert x.shape == y.shape == (4, cfg.seq_len) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next tokens
    assert int(x.max()) < cfg.vocab_size and len(set(x.flatten().tolist())) <= 32


def _run(losses, label="r", gpu=None):
    return D.RunResult(label=label, losses=losses, step_times=[1.0, 0.2, 0.1], gpu_peak_per_step=gpu or [None] * 3,
                       cpu_rss_per_step=[10 * 2 ** 20, 12 * 2 ** 20, 11 * 2 ** 20])


def test_table_pass_fail_and_nan():
    base = _run([3.0, 2.5, 2.0])
    text, ok, delta = D.table(base, _run([3.0, 2.5004, 2.0002]), "x.json")
    assert ok and abs(delta - 4e-4) < 1e-9 and "PASS" in text and text.count(D.NO_GPU) == 3
    assert "150.0 ms" in text  # median after the first step
    text, ok, _ = D.table(base, _run([3.0, 2.6, 2.0]), "x.json")
    assert not ok and "FAIL" in text
    text, ok, delta = D.table(base, _run([3.0, float("nan"), float("nan")]), "x.json")
    assert not ok and math.isnan(delta) and "non-finite" in text


def test_table_gpu_figures():
    gib = 2 ** 30
    base = _run([3.0, 2.5, 2.0], gpu=[3 * gib, 4 * gib, 4 * gib])
    off = _run([3.0, 2.5, 2.0], gpu=[2 * gib, 3 * gib, 3 * gib])
    off.step_times = [2.0, 0.3, 0.2]
    text, ok, _ = D.table(base, off, "x.json")
    for row in TABLE_ROWS:
        assert row in text
    assert "4.00 GiB" in text and "3.00 GiB" in text and "1.00 GiB (25.0% of the baseline peak)" in text
    assert "1.67x (offload / baseline)" in text and D.NO_GPU not in text
    f = D.figures(base, off)
    assert f["gpu_saved_bytes"] == gib and f["gpu_saved_fraction"] == 0.25
    assert f["step_time_ratio"] == pytest.approx(0.25 / 0.15)


def test_model_is_deep_enough_for_the_config():
    _, cfg = D.model_for(load_config({"cpu_offloading": {"model": {"cpu_offloading_num_layers": 6}}}), "tiny-gpt")
    assert cfg.num_layers == 7
    _, cfg = D.model_for(load_config({}), "tiny-gpt")
    assert cfg.num_layers == 4


@pytest.mark.parametrize("off_losses,verdict", [([3.0, 2.5, 2.0], "PASS"), ([3.0, 2.6, 2.0], "FAIL")])
def test_plot_title_has_model_config_device_and_verdict(tmp_path, off_losses, verdict):
    pytest.importorskip("matplotlib")
    base, off = _run([3.0, 2.5, 2.0], "no offload"), _run(off_losses, "with x")
    f = D.figures(base, off)
    title = D.plot_title(D.describe_model("tiny-gpt", GPT_SHAPES["tiny-gpt"]), "x.json", "NVIDIA Test GPU", f)
    assert "tiny-gpt (4 layers" in title and "x.json" in title and "NVIDIA Test GPU" in title
    assert f"loss parity {verdict}" in title and "< 0.001" in title and ("PASS" if verdict == "FAIL" else "FAIL") \
        not in title
    path = D.plot(base, off, "x.json", tmp_path / "p.png", title=title)
    assert Path(path).stat().st_size > 1000 and png_title(path) == title


def test_plot_memory_axis_starts_at_zero(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    seen = {}
    monkeypatch.setattr(plt, "close", lambda fig: seen.setdefault("ylim", fig.axes[1].get_ylim()))
    gib = 2 ** 30
    D.plot(_run([3.0, 2.5, 2.0], gpu=[4 * gib] * 3), _run([3.0, 2.5, 2.0], gpu=[int(3.9 * gib)] * 3), "x.json",
           tmp_path / "p.png")
    assert seen["ylim"][0] == 0 and seen["ylim"][1] >= 4


def test_demo_output_one_line_warnings_summary_once_and_deepspeed_note(capsys):
    lines = []
    ds_seen = []
    ds = logging.getLogger("DeepSpeed")
    probe = logging.Handler()
    probe.emit = lambda r: ds_seen.append(r.getMessage())
    ds.addHandler(probe)
    try:
        with DemoOutput(warn=lines.append) as output:
            run = D.RunResult(label="with x", summary="ds_offload: 50% of the optimizer on the CPU")
            warnings.warn("something to know", UserWarning)
            logging.getLogger("ds_offload").warning(run.summary)
            logging.getLogger("ds_offload").warning("another ds_offload message")
            for _ in range(2):
                ds.warning("**** You are using ZeRO with an untested optimizer, proceed with caution *****")
            ds.warning("a DeepSpeed warning worth seeing")
            print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
            print("a line of the demo's own")
            output.flush(run)
            ds.warning("**** You are using ZeRO with an untested optimizer, proceed with caution *****")
            output.flush()
    finally:
        ds.removeHandler(probe)
    assert lines == ["warning: something to know", "warning: another ds_offload message", UNTESTED_NOTE]
    assert run.warnings == lines[:2]  # the note is about DeepSpeed, once, not about the run
    assert ds_seen == ["a DeepSpeed warning worth seeing"]
    assert capsys.readouterr().out == "a line of the demo's own\n"
    assert logging.getLogger("ds_offload").propagate and not any(
        isinstance(h, _Records) for h in logging.getLogger("ds_offload").handlers)


def test_demo_output_verbose_keeps_deepspeed_output(capsys):
    lines, ds_seen = [], []
    ds = logging.getLogger("DeepSpeed")
    probe = logging.Handler()
    probe.emit = lambda r: ds_seen.append(r.getMessage())
    ds.addHandler(probe)
    try:
        with DemoOutput(warn=lines.append, verbose=True):
            ds.warning("**** You are using ZeRO with an untested optimizer, proceed with caution *****")
            print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    finally:
        ds.removeHandler(probe)
    assert len(ds_seen) == 1 and lines == [UNTESTED_NOTE]
    assert "built successfully" in capsys.readouterr().out
