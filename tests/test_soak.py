"""Soak: 500 steps with optimizer offload and the fine-grained activation API, on CPU.

Nothing may grow after warm-up (resident memory, threads, child processes, open file descriptors) and the
losses must stay those of plain DeepSpeed on the same init and batches, for both CPU optimizer backends.
"""
import gc
import os

import pytest
import torch

import ds_offload
from ds_offload.models import GPT, GPTConfig, synthetic_batch

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("dist")]

CFG = GPTConfig(vocab_size=128, hidden=32, num_layers=2, num_heads=4, seq_len=16)
STEPS, WARMUP, BATCH = 500, 50, 2
LOSS_TOL, RSS_GROWTH = 1e-3, 0.05


def ds_config():
    return {"train_micro_batch_size_per_gpu": BATCH, "gradient_clipping": 1.0, "zero_optimization": {"stage": 0},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
            "steps_per_print": 10 ** 9}


def offload_config(torch_backend):
    cfg = ds_config()
    cfg["cpu_offloading"] = {"optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5,
                                           "overlap_cpu_optimizer_d2h_h2d": True,
                                           "use_torch_optimizer_for_cpu_offload": torch_backend}}
    return cfg


# ------------------------------------------------------------------------------------------ /proc readings
def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def thread_count():
    return len(os.listdir("/proc/self/task"))


def fd_count():
    return len(os.listdir("/proc/self/fd"))


def child_count():
    me, n = os.getpid(), 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:  # field 4: ppid
            n += 1
    return n


def snapshot():
    gc.collect()
    return {"rss": rss_bytes(), "threads": thread_count(), "children": child_count(), "fds": fd_count()}


# ------------------------------------------------------------------------------------------ training
def run(init, config, offloader=None, watch=False):
    torch.manual_seed(0)
    engine, *_ = init(model=GPT(CFG), config=config)
    losses, after_warmup, readings = [], None, []
    for step in range(STEPS):
        x, y = synthetic_batch(CFG, BATCH, step)
        if offloader is not None:
            with offloader.offload_context():
                loss = engine(x, y)
            engine.backward(loss)
        else:
            loss = engine(x, y)
            engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if watch and step + 1 == WARMUP:
            after_warmup = snapshot()
        if watch and step + 1 > WARMUP and (step + 1) % 50 == 0:
            readings.append(snapshot())
    return losses, engine, after_warmup, readings


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: this model is tiny, and on 2 shared cores more threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def plain_losses(dist, one_thread):
    import deepspeed
    losses, engine, _, _ = run(deepspeed.initialize, ds_config())
    del engine
    gc.collect()
    return losses


@pytest.mark.parametrize("torch_backend", [True, False], ids=["torch-adamw", "deepspeed-cpu-adam"])
def test_soak_500_steps_nothing_grows_losses_match(plain_losses, torch_backend):
    off = ds_offload.ActivationOffloader(min_offload_bytes=0, prefetch_depth=2, pin_memory=False,
                                         offload_cpu_tensors=True)
    losses, engine, base, readings = run(ds_offload.initialize, offload_config(torch_backend), off, watch=True)
    try:
        assert engine.ds_offload.optimizer is not None
        assert engine.ds_offload.optimizer.split_info()["cpu_numel"] > 0
        assert off.copier.tensors_this_pass > 0  # the activation path really ran
        assert all(torch.isfinite(torch.tensor(losses)))

        worst = max(abs(a - b) for a, b in zip(plain_losses, losses))
        assert worst < LOSS_TOL, f"max |loss - plain DeepSpeed loss| over {STEPS} steps = {worst:.2e}"

        end = readings[-1]
        growth = (max(r["rss"] for r in readings) - base["rss"]) / base["rss"]
        assert growth < RSS_GROWTH, (f"RSS grew {growth:.1%} after warm-up: {base['rss'] >> 20} MiB -> "
                                     f"{[r['rss'] >> 20 for r in readings]} MiB")
        for key in ("threads", "children", "fds"):
            seen = [r[key] for r in readings]
            assert all(v == base[key] for v in seen), f"{key} changed after warm-up: {base[key]} -> {seen}"
        assert off.stats()["records_alive"] == 0 and end["fds"] == base["fds"]
    finally:
        engine.ds_offload.close()
