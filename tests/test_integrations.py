"""transformers' Trainer (through accelerate) with the block, via `ds_offload.patch_deepspeed_initialize`."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train_hf_trainer.py")
pytestmark = pytest.mark.slow  # several Trainer runs, DeepSpeed's CPU Adam op

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def config(tmp_path, name, block, optimizer_section=True, stage=2):
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "gradient_clipping": 1.0, "zero_optimization": {"stage": stage}}
    if optimizer_section:
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}}
    if block:
        cfg["cpu_offloading"] = block
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def run(tmp_path, cfg, name, *extra):
    out = tmp_path / f"{name}.losses.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    res = subprocess.run([sys.executable, EXAMPLE, "--deepspeed_config", cfg, "--steps", "8", "--losses-out",
                          str(out), "--output-dir", str(tmp_path / name), *extra],
                         capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


BLOCK = {"optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5}}


@pytest.mark.parametrize("optimizer_section", [True, False], ids=["json-optimizer", "trainer-create-optimizer"])
def test_trainer_with_the_block_matches_without(tmp_path, optimizer_section):
    plain = run(tmp_path, config(tmp_path, "plain", None, optimizer_section), "plain")
    ours = run(tmp_path, config(tmp_path, "ours", BLOCK, optimizer_section), "ours")
    assert "50% of the optimizer on the CPU" in ours["offload"] and "nothing offloaded" in plain["offload"]
    assert plain["losses"][-1] < plain["losses"][0]  # the synthetic task is learnable
    assert max(abs(a - b) for a, b in zip(plain["losses"], ours["losses"])) < 1e-3


def test_patch_undoes_itself_and_leaves_others_alone():
    import deepspeed

    import ds_offload
    original = deepspeed.initialize
    with ds_offload.patch_deepspeed_initialize():
        assert deepspeed.initialize is not original
        with ds_offload.patch_deepspeed_initialize():  # nested: no second layer
            inner = deepspeed.initialize
        assert deepspeed.initialize is inner
    assert deepspeed.initialize is original


def test_trainer_resume_with_the_block(tmp_path):
    cfg = config(tmp_path, "ours", BLOCK)
    whole = run(tmp_path, cfg, "whole")
    run(tmp_path, cfg, "first", "--save-steps", "4")
    ckpt = str(tmp_path / "first" / "checkpoint-4")
    resumed = run(tmp_path, cfg, "resumed", "--resume", ckpt)
    # The resumed run logs steps 5..8; they follow the uninterrupted run.
    assert max(abs(a - b) for a, b in zip(whole["losses"][4:], resumed["losses"][-4:])) < 1e-4
