"""The `ds-offload` CLI through click's CliRunner and as subprocesses (`python -m ds_offload_cli.cli`)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ds_offload_cli import launch as launch_mod
from ds_offload_cli.cli import main

REPO = Path(__file__).resolve().parents[2]

GOOD = {
    "train_micro_batch_size_per_gpu": 2,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
    "zero_optimization": {"stage": 1},
    "cpu_offloading": {
        "model": {"cpu_offloading": True, "cpu_offloading_num_layers": 2},
        "optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5},
    },
}


def write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=2))
    return p


def run_cli(*args, **kw):
    return CliRunner().invoke(main, list(map(str, args)), catch_exceptions=False, **kw)


def subprocess_cli(*args, cwd=None, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "ds_offload_cli.cli", *map(str, args)], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def no_launch(monkeypatch):
    """Replace the real launch with a recorder; tests assert whether (and what) would have been run."""
    calls = []

    def fake_call(cmd, *a, **k):
        calls.append(list(cmd))
        return 0
    monkeypatch.setattr(launch_mod.subprocess, "call", fake_call)
    return calls


# ------------------------------------------------------------------------------------------ group, validate
def test_group_help_lists_every_command():
    res = run_cli("--help")
    assert res.exit_code == 0
    for cmd in ("validate", "launch", "estimate", "doctor", "build-ops", "demo"):
        assert cmd in res.output


def test_validate_good_and_bad(tmp_path):
    good = write(tmp_path, "good.json", GOOD)
    bad_cfg = json.loads(json.dumps(GOOD))
    bad_cfg["cpu_offloading"]["optimizer"]["optimizer_offload_fraction"] = 1.5
    bad_cfg["cpu_offloading"]["model"]["cpu_offloading_num_layer"] = 2
    bad = write(tmp_path, "bad.json", bad_cfg)
    assert run_cli("validate", good).exit_code == 0
    res = run_cli("validate", good, bad)
    assert res.exit_code == 1
    assert "good.json: OK" in res.output
    assert "cpu_offloading.optimizer.optimizer_offload_fraction" in res.output
    assert "cpu_offloading.model.cpu_offloading_num_layer" in res.output  # both problems listed at once


def test_validate_model_layers_and_json(tmp_path):
    p = write(tmp_path, "c.json", GOOD)
    res = run_cli("validate", "--json", "--model-layers", 2, p)
    assert res.exit_code == 1
    doc = json.loads(res.output)
    assert doc[0]["valid"] is False
    assert any("layers less than 2" in e["message"] for e in doc[0]["errors"])
    assert run_cli("validate", "--model-layers", 8, p).exit_code == 0


def test_validate_warnings_do_not_fail(tmp_path):
    cfg = {**GOOD, "zero_optimisation": {"stage": 1}}
    res = run_cli("validate", write(tmp_path, "w.json", cfg))
    assert res.exit_code == 0 and "warning" in res.output and "zero_optimization" in res.output


def test_validate_malformed_json_as_subprocess(tmp_path):
    p = write(tmp_path, "broken.json", '{\n  "train_batch_size": 8,\n}\n')
    res = subprocess_cli("validate", p)
    assert res.returncode == 1
    assert "broken.json:3:1" in res.stdout


def test_validate_repo_configs(tmp_path):
    configs = sorted((REPO / "configs").glob("*.json"))
    res = run_cli("validate", *configs)
    assert res.exit_code == 0, res.output
    # What initialize accepts, validate accepts, and the reverse: weight offload under bf16 ZeRO-0 (its
    # FP16_Optimizer), not under fp32 ZeRO-0.
    ok = json.loads((REPO / "configs" / "weights.json").read_text())
    ok["zero_optimization"] = {"stage": 0}
    assert ok["bf16"]["enabled"]
    assert run_cli("validate", str(write(tmp_path, "weights_zero0.json", ok))).exit_code == 0
    bad = {**ok, "bf16": {"enabled": False}}
    res = run_cli("validate", str(write(tmp_path, "weights_zero0_fp32.json", bad)))
    assert res.exit_code == 1 and "cpu_offloading.model.cpu_offloading_weights" in res.output
    assert "zero_optimization.stage to 1 or 2" in res.output


def dry_run_config(output):
    """The resolved config a --dry-run prints (between its 'resolved config:' and 'command:' lines)."""
    lines = output.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("resolved config: "))
    end = next(i for i, l in enumerate(lines) if l.startswith("command: "))
    return json.loads("\n".join(lines[start + 1:end]))


# ------------------------------------------------------------------------------------------ launch: help
def test_launch_help_shows_every_deepspeed_launcher_option():
    res = run_cli("launch", "--help", terminal_width=200)
    assert res.exit_code == 0
    opts = {o for a in launch_mod.deepspeed_runner_parser()._actions for o in a.option_strings
            if o not in ("-h", "--help")}
    assert {"--num_gpus", "--num_nodes", "--hostfile", "--include", "--exclude", "--master_addr", "--master_port",
            "--launcher", "--no_local_rank", "--bind_cores_to_rank"} <= opts
    missing = [o for o in opts if o not in res.output]
    assert not missing, missing
    assert "--dry-run" in res.output


# ------------------------------------------------------------------------------------------ launch: dry run
PASS_THROUGH = ["--num_gpus", "2", "--num_nodes=1", "--master_port", "29731", "--master_addr", "10.0.0.1",
                "-H", "/tmp/hostfile", "--launcher", "slurm", "--launcher_args", "--exclusive --mem 0",
                "--no_local_rank", "--bind_cores_to_rank", "--force_multi", "-q"]


def test_dry_run_passes_launcher_options_through_unchanged(tmp_path):
    cfg = write(tmp_path, "c.json", GOOD)
    out = tmp_path / "resolved.json"
    res = run_cli("launch", *PASS_THROUGH, "--dry-run", "--resolved-config", out, "train.py", "--steps", "3",
                  "--deepspeed_config", cfg, "--lr=0.1")
    assert res.exit_code == 0, res.output
    line = [l for l in res.output.splitlines() if l.startswith("command: ")][0]
    import shlex
    cmd = shlex.split(line[len("command: "):])
    assert cmd[:4] == [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    assert cmd[4:4 + len(PASS_THROUGH)] == PASS_THROUGH
    assert cmd[4 + len(PASS_THROUGH):] == ["train.py", "--steps", "3", "--deepspeed_config", str(out.resolve()),
                                           "--lr=0.1"]
    assert f"resolved config: {out.resolve()}" in res.output
    assert dry_run_config(res.output) == GOOD and not out.exists()  # a dry run writes nothing


@pytest.mark.parametrize("form", ["--deepspeed_config {}", "--deepspeed_config={}", "--deepspeed-config {}",
                                  "--config {}", "--config={}"])
def test_config_found_in_every_form(tmp_path, form):
    cfg = write(tmp_path, "c.json", GOOD)
    out = tmp_path / "r.json"
    args = form.format(cfg).split(" ")
    res = run_cli("launch", "--dry-run", "--resolved-config", out, "s.py", *args, "zero_optimization.stage=2")
    assert res.exit_code == 0, res.output
    assert dry_run_config(res.output)["zero_optimization"]["stage"] == 2 and not out.exists()
    expected = form.format(out.resolve())
    assert expected in res.output  # the resolved path replaces the original, in the same form


def test_overrides_megatron_forms_and_values(tmp_path):
    cfg = write(tmp_path, "c.json", GOOD)
    out = tmp_path / "r.json"
    res = run_cli("launch", "--dry-run", "--resolved-config", out, "s.py", "--deepspeed_config", cfg,
                  "optimizer.optimizer_cpu_offload=True", "optimizer.optimizer_offload_fraction=0.25",
                  "model.cpu_offloading_num_layers=3", "cpu_offloading.optimizer.pin_cpu_grads=False",
                  "optimizer.params.lr=1e-4", "optimizer.params.betas=[0.9,0.95]", "optimizer.type=Adam",
                  "zero_optimization.stage=2", "gradient_clipping=1.0", "communication_data_type=None",
                  "steps_per_print=10")
    assert res.exit_code == 0, res.output
    r = dry_run_config(res.output)
    blk = r["cpu_offloading"]
    assert blk["optimizer"]["optimizer_cpu_offload"] is True
    assert blk["optimizer"]["optimizer_offload_fraction"] == 0.25
    assert blk["optimizer"]["pin_cpu_grads"] is False
    assert blk["model"]["cpu_offloading_num_layers"] == 3
    assert r["optimizer"] == {"type": "Adam", "params": {"lr": 1e-4, "betas": [0.9, 0.95]}}
    assert r["zero_optimization"]["stage"] == 2 and r["gradient_clipping"] == 1.0
    assert r["communication_data_type"] is None and r["steps_per_print"] == 10
    # overrides are consumed, not passed to the script
    assert "=0.25" not in res.output.split("command: ")[1]


@pytest.mark.parametrize("override,needle", [
    ("model.cpu_offloading_num_layer=3", "did you mean 'cpu_offloading_num_layers'"),
    ("cpu_offloading.optimizer.optimizer_offload_fractio=0.5", "did you mean 'optimizer_offload_fraction'"),
    ("cpu_offloading.modell.cpu_offloading=true", "did you mean 'model'"),
    ("optimizer.optimizer_offload_fractio=0.5", "did you mean 'optimizer_offload_fraction'"),
    ("zero_optimisation.stage=2", "did you mean 'zero_optimization'"),
    ("zero_optimization.stagee=2", "did you mean 'stage'"),
    ("train_batch_size.x=1", "single value"),
    ("cpu_offloading.optimizer.optimizer_offload_fraction=1.5", "optimizer_offload_fraction must be in [0.0, 1.0]"),
    ("cpu_offloading.optimizer.optimizer_offload_fraction=abc", "expected number"),
    ("model.cpu_offloading=[1", "does not parse"),
    ("zero_optimization.stage=two", "zero_optimization.stage: bad value"),
    ("train_micro_batch_size_per_gpu=abc", "expects an integer"),
    ("model.cpu_offloading_num_layers=", "empty value"),
])
def test_override_errors_refuse_to_launch(tmp_path, no_launch, override, needle):
    cfg = write(tmp_path, "c.json", GOOD)
    res = run_cli("launch", "s.py", "--deepspeed_config", cfg, override)
    assert res.exit_code == 1
    assert needle.lower() in res.output.lower(), res.output
    assert "nothing launched" in res.output
    assert no_launch == []


def test_every_bad_override_listed_at_once(tmp_path, no_launch):
    cfg = write(tmp_path, "c.json", GOOD)
    res = run_cli("launch", "s.py", "--deepspeed_config", cfg, "model.nope=1", "zero_optimization.stagee=1")
    assert res.exit_code == 1 and "model.nope" in res.output and "zero_optimization.stagee" in res.output


def test_bad_config_refused_before_launch(tmp_path, no_launch):
    bad = json.loads(json.dumps(GOOD))
    bad["cpu_offloading"]["model"].update(cpu_offloading_activations=False, cpu_offloading_weights=False)
    bad["zero_optimization"] = {"stage": 1, "offload_optimizer": {"device": "cpu"}}
    cfg = write(tmp_path, "bad.json", bad)
    res = run_cli("launch", "--num_gpus", "2", "s.py", "--deepspeed_config", cfg)
    assert res.exit_code == 1
    assert "cpu_offloading_activations" in res.output and "offload_optimizer" in res.output
    assert no_launch == []


def test_malformed_config_refused(tmp_path, no_launch):
    cfg = write(tmp_path, "bad.json", '{"train_batch_size": 8,,}')
    res = run_cli("launch", "s.py", "--deepspeed_config", cfg)
    assert res.exit_code == 1 and "bad.json:1:" in res.output and no_launch == []


def test_overrides_without_config_refused(no_launch):
    res = run_cli("launch", "s.py", "zero_optimization.stage=2")
    assert res.exit_code == 1 and "need a config" in res.output and no_launch == []


def test_launch_runs_deepspeed_runner_with_resolved_config(tmp_path, no_launch, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write(tmp_path, "c.json", GOOD)
    res = run_cli("launch", "--num_gpus", "1", "s.py", "--deepspeed_config", cfg, "zero_optimization.stage=2")
    assert res.exit_code == 0, res.output
    (cmd,) = no_launch
    assert cmd[:6] == [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--num_gpus", "1"]
    resolved = Path(cmd[cmd.index("--deepspeed_config") + 1])
    assert resolved.parent == tmp_path / "ds_offload_runs"
    assert json.loads(resolved.read_text())["zero_optimization"]["stage"] == 2


def test_launch_exit_status_is_the_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(launch_mod.subprocess, "call", lambda cmd, *a, **k: 3)
    cfg = write(tmp_path, "c.json", GOOD)
    res = run_cli("launch", "--resolved-config", tmp_path / "r.json", "s.py", "--deepspeed_config", cfg)
    assert res.exit_code == 3


def test_launch_dry_run_as_subprocess(tmp_path):
    cfg = write(tmp_path, "c.json", GOOD)
    res = subprocess_cli("launch", "--num_gpus", "2", "--include", "localhost:0,1", "--dry-run", "train.py",
                         "--deepspeed-config", cfg, "optimizer.optimizer_offload_fraction=0.75", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "deepspeed.launcher.runner --num_gpus 2 --include localhost:0,1 train.py --deepspeed-config" in res.stdout
    assert dry_run_config(res.stdout)["cpu_offloading"]["optimizer"]["optimizer_offload_fraction"] == 0.75
    assert not (tmp_path / "ds_offload_runs").exists()


def test_launch_refusal_as_subprocess(tmp_path):
    cfg = write(tmp_path, "c.json", GOOD)
    res = subprocess_cli("launch", "train.py", "--deepspeed_config", cfg, "model.cpu_offloading_num_layers=-1",
                         cwd=tmp_path)
    assert res.returncode == 1
    assert "cpu_offloading.model.cpu_offloading_num_layers" in res.stderr
    assert not (tmp_path / "ds_offload_runs").exists()


@pytest.mark.slow
def test_real_launch_passes_resolved_config_to_the_script(tmp_path):
    """DeepSpeed's launcher really starts the script (one local process) with the resolved config."""
    script = write(tmp_path, "show.py", "import sys, json\n"
                                         "i = sys.argv.index('--deepspeed_config')\n"
                                         "cfg = json.load(open(sys.argv[i + 1]))\n"
                                         "print('STAGE', cfg['zero_optimization']['stage'], 'ARGS', sys.argv[1:])\n")
    cfg = write(tmp_path, "c.json", GOOD)
    res = subprocess_cli("launch", "--num_gpus", "1", "--master_port", "29741", script, "--deepspeed_config", cfg,
                         "zero_optimization.stage=2", cwd=tmp_path, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "STAGE 2" in res.stdout
    assert "--local_rank=0" in res.stdout


# ------------------------------------------------------------------------------------------ pure helpers
def test_parse_value():
    p = launch_mod.parse_value
    assert p("True") is True and p("false") is False and p("None") is None and p("null") is None
    assert p("0.5") == 0.5 and p("8") == 8 and p('"x"') == "x" and p("AdamW") == "AdamW"
    assert p('{"a": 1}') == {"a": 1} and p("[1,2]") == [1, 2]
    with pytest.raises(ValueError):
        p("{bad")


def test_split_overrides_keeps_script_args():
    kept, ov = launch_mod.split_overrides(["--lr=0.1", "a.b=1", "--name", "x", "model.y=True", "--flag"])
    assert kept == ["--lr=0.1", "--name", "x", "--flag"]
    assert ov == [("a.b", "1"), ("model.y", "True")]


def test_deepspeed_config_flag_wins_over_config():
    args = ["--config", "model.yaml", "--deepspeed_config=ds.json"]
    assert launch_mod.find_config_arg(args) == (2, "joined", "ds.json")
    assert launch_mod.find_config_arg(["--config", "c.json"]) == (0, "split", "c.json")
    assert launch_mod.find_config_arg(["--steps", "3"]) is None


# ------------------------------------------------------------------------------------------ other commands
def test_estimate_command(tmp_path):
    cfg = write(tmp_path, "c.json", GOOD)
    res = run_cli("estimate", "--model", "tiny-gpt", "--config", cfg, "--seq-len", 32, "--gpu-memory", "1GiB",
                  "--reserve", "0")
    assert res.exit_code == 0, res.output
    for word in ("GPU, without offload", "GPU, with the config", "CPU, with the config", "quick decision",
                 "what fits"):
        assert word in res.output
    doc = json.loads(run_cli("estimate", "--model", "tiny-gpt", "--config", cfg, "--json").output)
    assert doc["without_offload"]["gpu"]["total"] > doc["with_config"]["gpu"]["total"]
    bf16 = write(tmp_path, "b.json", {**GOOD, "bf16": {"enabled": True}})
    ds, pt = (json.loads(run_cli("estimate", "--model", "tiny-gpt", "--config", bf16, "--json", "--loop", loop).output)
              for loop in ("deepspeed", "torch"))
    assert ds["without_offload"]["gpu"] == pt["without_offload"]["gpu"]
    # ZeRO-1/2 bf16: both loops move the masters and moments; a plain loop also makes the fp32 gradient on the CPU
    assert pt["with_config"]["gpu"]["optimizer"] == ds["with_config"]["gpu"]["optimizer"]
    assert pt["with_config"]["gpu"]["grads"] < ds["with_config"]["gpu"]["grads"]


def test_estimate_rejects_bad_model_and_config(tmp_path):
    assert run_cli("estimate", "--model", "nonsense").exit_code == 2
    bad = write(tmp_path, "bad.json", {"cpu_offloading": {"optimizer": {"optimizer_offload_fraction": 2}}})
    res = run_cli("estimate", "--config", bad)
    assert res.exit_code == 1 and "optimizer_offload_fraction" in res.output


def test_estimate_measured(tmp_path):
    measured = write(tmp_path, "m.json", {"pinned_h2d_gbps": 50, "pinned_d2h_gbps": 50, "pageable_h2d_gbps": 10,
                                          "pageable_d2h_gbps": 10, "deepspeed_cpu_adam_params_per_s": 1e9,
                                          "torch_adam_params_per_s": 5e8})
    cfg = write(tmp_path, "c.json", GOOD)
    res = run_cli("estimate", "--model", "reference-gpt", "--config", cfg, "--measured", measured)
    assert res.exit_code == 0, res.output
    assert "step-time cost" in res.output and "CPU Adam" in res.output
    res = run_cli("estimate", "--config", cfg, "--measured", tmp_path / "missing.json")
    assert res.exit_code == 2 and "ds-offload doctor" in res.output


def test_doctor_quick_on_cpu(tmp_path):
    out = tmp_path / "doctor.json"
    res = run_cli("doctor", "--quick", "--no-build", "--out", out)
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["torch_adam_params_per_s"] > 0
    assert "ulimit -l" in res.output and "host memory" in res.output
    import torch
    if not torch.cuda.is_available():
        assert data["pinned_h2d_gbps"] is None and "n/a: no GPU" in res.output


def test_build_ops_help_says_what_it_does():
    res = run_cli("build-ops", "--help")
    assert res.exit_code == 0 and "CPU Adam" in res.output


def test_build_ops_when_cached():
    from ds_offload_cli.build_ops import op_cache_dir
    d = op_cache_dir("cpu_adam")
    if not d or not list(Path(d).glob("*.so")):
        pytest.skip("cpu_adam not built on this machine (building takes ~60 s)")
    res = run_cli("build-ops")
    assert res.exit_code == 0, res.output
    assert "cpu_adam: ready" in res.output


# ------------------------------------------------------------------------------------------ examples
def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _example(tmp_path, script, ngpus, port, *extra, cfg=None):
    port = port or _free_port()
    cfg = cfg or write(tmp_path, "ex.json", {**GOOD, "train_micro_batch_size_per_gpu": 4, "cpu_offloading": {
        "optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 1.0,
                      "use_torch_optimizer_for_cpu_offload": True}}})
    out = tmp_path / f"losses_{script}_{ngpus}.json"
    res = subprocess_cli("launch", "--num_gpus", ngpus, "--master_port", port, REPO / "examples" / script,
                         "--deepspeed_config", cfg, "--steps", 3, "--losses-out", out, *extra, cwd=tmp_path,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "summary:" in res.stdout and "step    3/3" in res.stdout
    return json.loads(out.read_text())


@pytest.mark.parametrize("stage,fraction,torch_opt", [(2, 1.0, True), (1, 0.5, False)])
@pytest.mark.slow
def test_train_gpt_two_ranks_match_one_rank(tmp_path, stage, fraction, torch_opt):
    """ZeRO-1/2 on two CPU ranks == one rank at the same global batch (within the 1e-3 criterion), with the
    hybrid optimizer on either backend (each rank offloads `fraction` of its own partition)."""
    opt = [f"cpu_offloading.optimizer.optimizer_offload_fraction={fraction}",
           f"cpu_offloading.optimizer.use_torch_optimizer_for_cpu_offload={torch_opt}", f"zero_optimization.stage={stage}"]
    two = _example(tmp_path, "train_gpt.py", 2, None, *opt)
    one = _example(tmp_path, "train_gpt.py", 1, None, *opt, "train_micro_batch_size_per_gpu=8")
    assert two["world_size"] == 2 and one["world_size"] == 1
    backend = "torch AdamW" if torch_opt else "DeepSpeed CPU Adam"
    assert f"{fraction:.0%} of the optimizer on the CPU ({backend}" in two["offload"]
    assert max(abs(a - b) for a, b in zip(two["losses"], one["losses"])) < 1e-3


@pytest.mark.slow
def test_train_hf_runs(tmp_path):
    res = _example(tmp_path, "train_hf.py", 1, None)
    assert len(res["losses"]) == 3
