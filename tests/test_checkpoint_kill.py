"""A SIGKILL in the middle of `save_checkpoint` leaves `latest` pointing at the last complete checkpoint.

A child process trains through `ds_offload.initialize` with optimizer offload, saves a checkpoint, trains on
and starts a second save whose `torch.save` stops half-way through a file; the parent SIGKILLs the child
there (deterministically: the child says when it is inside the save), then loads `latest` and checks that it
is the first save: its tag, its step, its client state, and the same next losses as the child got from it.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import ds_offload
from ds_offload.models import GPT, GPTConfig, synthetic_batch

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX only")]

REPO = Path(__file__).resolve().parents[1]
CFG = dict(vocab_size=128, hidden=32, num_layers=2, num_heads=4, seq_len=16)
FIRST, MORE, BATCH = 3, 2, 2


def config(torch_backend):
    return {"train_micro_batch_size_per_gpu": BATCH, "gradient_clipping": 1.0, "zero_optimization": {"stage": 1},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
            "steps_per_print": 10 ** 9,
            "cpu_offloading": {"optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5,
                                             "use_torch_optimizer_for_cpu_offload": torch_backend}}}


CHILD = textwrap.dedent("""
    import io, json, os, sys, time
    import torch
    torch.set_num_threads(1)
    import deepspeed, ds_offload
    from ds_offload.models import GPT, GPTConfig, synthetic_batch

    save_dir, cfg_json, model_json, first, more, batch = sys.argv[1:7]
    first, more, batch = int(first), int(more), int(batch)
    deepspeed.init_distributed(dist_backend="gloo")
    CFG = GPTConfig(**json.loads(model_json))
    torch.manual_seed(0)
    engine, *_ = ds_offload.initialize(model=GPT(CFG), config=json.loads(cfg_json))

    def step(s):
        x, y = synthetic_batch(CFG, batch, s)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        return loss.item()

    for s in range(first):
        step(s)
    engine.save_checkpoint(save_dir, tag="first", client_state={"my_step": first})
    print("SAVED first", flush=True)
    after = [step(s) for s in range(first, first + more)]
    print("LOSSES " + json.dumps(after), flush=True)

    real_save = torch.save
    def stalling_save(obj, f, *args, **kwargs):  # half a file on disk, then wait for the kill
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        with open(f, "wb") as fh:
            fh.write(data[:len(data) // 2])
            fh.flush()
            os.fsync(fh.fileno())
        print("INSIDE torch.save " + str(f), flush=True)
        time.sleep(120)
        raise SystemExit("not killed")
    torch.save = stalling_save
    engine.save_checkpoint(save_dir, tag="second", client_state={"my_step": first + more})
    print("SAVE RETURNED", flush=True)
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run_child_until_inside_save(tmp_path, cfg, timeout=300):
    """Start the child, SIGKILL its process group once it is inside the second save; its stdout lines."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": _free_port(), "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ckpt"), json.dumps(cfg), json.dumps(CFG),
                          str(FIRST), str(MORE), str(BATCH)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, env=env, cwd=tmp_path, start_new_session=True)
    lines, inside = [], threading.Event()

    def reader():
        for line in p.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("INSIDE torch.save"):
                inside.set()
        inside.set()  # EOF: the child ended on its own

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    inside.wait(timeout)
    try:
        os.killpg(p.pid, signal.SIGKILL)  # the child and anything it started
    except ProcessLookupError:
        pass
    rc = p.wait(timeout=30)
    t.join(timeout=10)
    return rc, lines


@pytest.mark.parametrize("torch_backend", [True, False], ids=["torch-adamw", "deepspeed-cpu-adam"])
def test_sigkill_during_save_checkpoint_leaves_latest_loadable(dist, tmp_path, torch_backend):
    cfg = config(torch_backend)
    if not torch_backend:  # build (or find) DeepSpeed's CPU Adam op here, so the child's clock runs only on training
        from deepspeed.ops.op_builder import CPUAdamBuilder
        CPUAdamBuilder().load()
    rc, lines = run_child_until_inside_save(tmp_path, cfg)
    log = "\n".join(lines[-40:])
    assert any(l.startswith("INSIDE torch.save") for l in lines), "child never reached the second save:\n" + log
    assert rc == -signal.SIGKILL, log
    assert "SAVE RETURNED" not in lines
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "first"
    assert (ckpt / "second").is_dir()  # the kill did land inside the second save
    expected = json.loads(next(l for l in lines if l.startswith("LOSSES "))[len("LOSSES "):])

    model_cfg = GPTConfig(**CFG)
    torch.manual_seed(1)  # another init: everything must come from the checkpoint
    engine, *_ = ds_offload.initialize(model=GPT(model_cfg), config=cfg)
    try:
        before = torch.get_num_threads()
        torch.set_num_threads(1)  # as in the child, for the same arithmetic
        try:
            path, client = engine.load_checkpoint(str(ckpt))
            assert path is not None and Path(path).parent.name == "first"  # the model states file of tag "first"
            assert client["my_step"] == FIRST and engine.global_steps == FIRST
            got = []
            for s in range(FIRST, FIRST + MORE):
                x, y = synthetic_batch(model_cfg, BATCH, s)
                loss = engine(x, y)
                engine.backward(loss)
                engine.step()
                got.append(loss.item())
        finally:
            torch.set_num_threads(before)
        assert got == pytest.approx(expected, abs=1e-5), (got, expected)
    finally:
        engine.ds_offload.close()
