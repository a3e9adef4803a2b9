"""Weight offload on a GPU: parity with plain DeepSpeed (noise floor beside it), GPU memory between uses,
races on each stream, pinned bytes over many steps."""
import gc
import os

import pytest
import torch

import ds_offload
import ds_offload.weights.offload as W
from ds_offload.models import GPT, GPTConfig, synthetic_batch

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

CFG = GPTConfig(vocab_size=1024, hidden=256, num_layers=6, num_heads=4, seq_len=128)
N = 3
SLEEP = int(2e8)  # GPU cycles, ~0.1 s: longer than any copy here


@pytest.fixture(autouse=True)
def deterministic():
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


def config(stage=1, weights=True, activations=False, fraction=None):
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 1.0, "bf16": {"enabled": True},
           "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}}}
    block = {}
    if weights or activations:
        block["model"] = {"cpu_offloading": True, "cpu_offloading_num_layers": N,
                          "cpu_offloading_activations": activations, "cpu_offloading_weights": weights}
    if fraction is not None:
        block["optimizer"] = {"optimizer_cpu_offload": True, "optimizer_offload_fraction": fraction}
    if block:
        cfg["cpu_offloading"] = block
    return cfg


def train(cfg, steps=8, init=None):
    torch.manual_seed(0)
    engine, *_ = (init or ds_offload.initialize)(model=GPT(CFG), config=cfg)
    losses = []
    for step in range(steps):
        x, y = synthetic_batch(CFG, 4, step, device="cuda")
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    return [v.item() for v in losses], engine


def _close(*engines):
    for e in engines:
        if hasattr(e, "ds_offload"):
            e.ds_offload.close()


@pytest.mark.parametrize("mode", ["weights", "weights_activations", "weights_optimizer"])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_parity_with_plain_deepspeed(dist, stage, mode):
    import deepspeed
    plain, e0 = train(config(stage, weights=False), init=deepspeed.initialize)
    again, e1 = train(config(stage, weights=False), init=deepspeed.initialize)
    noise = max(abs(a - b) for a, b in zip(plain, again))
    ours, engine = train(config(stage, activations=mode == "weights_activations",
                                fraction=0.5 if mode == "weights_optimizer" else None))
    delta = max(abs(a - b) for a, b in zip(plain, ours))
    print(f"\n{mode} ZeRO-{stage}: max loss delta {delta:.2e} (noise floor of two plain runs {noise:.2e})")
    assert noise < 1e-3 and delta < 1e-3
    _close(engine)


def _held_after_two_steps(cfg, init=None):
    gc.collect()
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    _, engine = train(cfg, steps=2, init=init)
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() - start, engine


def test_offloaded_layers_hold_no_gpu_memory_between_uses(dist):
    import deepspeed
    ours_bytes, engine = _held_after_two_steps(config())
    w = engine.ds_offload.weights
    assert all(L.device_copy is None for L in w.layers)
    assert all(p.device.type == "cpu" for L in w.layers for p in L.params)
    numel = w.numel
    _close(engine)
    del engine, w
    plain_bytes, plain = _held_after_two_steps(config(weights=False), init=deepspeed.initialize)
    freed = plain_bytes - ours_bytes
    print(f"\nfreed {freed / 2**20:.1f} MiB between steps for {numel / 1e6:.2f}M offloaded parameters "
          f"({freed / numel:.2f} B each)")
    # Plain DeepSpeed holds for them between steps: bf16 weights (2), fp32 masters (4) and moments (8).
    assert freed >= 0.9 * 14 * numel


@pytest.mark.parametrize("delay", ["weights_copy", "gradient_copy"])
def test_races(dist, monkeypatch, delay):
    reference, ref = train(config())
    if delay == "weights_copy":  # H2D late on its stream: forward and backward must wait for it on the device
        fetch = W.WeightOffload._fetch

        def late(self, L, block=True):
            if L.device_copy is None and self.on_cuda:
                with torch.cuda.stream(self.h2d):
                    torch.cuda._sleep(SLEEP)
            return fetch(self, L, block)
        monkeypatch.setattr(W.WeightOffload, "_fetch", late)
    else:  # compute stream late when a gradient is complete: its cast and copy to the host must wait for it
        on_grad = W.WeightOffload._on_grad

        def late(self, L, p, i):
            torch.cuda._sleep(SLEEP // 10)
            p.grad = p.grad * 1.0  # the gradient now lives in memory written only after the sleep
            return on_grad(self, L, p, i)
        monkeypatch.setattr(W.WeightOffload, "_on_grad", late)
    delayed, engine = train(config())
    assert delayed == reference
    _close(ref, engine)


def test_pinned_bytes_flat_over_50_steps(dist):
    torch.manual_seed(0)
    engine, *_ = ds_offload.initialize(model=GPT(CFG), config=config())
    held = []
    for step in range(50):
        x, y = synthetic_batch(CFG, 4, step, device="cuda")
        engine.backward(engine(x, y))
        engine.step()
        if step in (4, 49):
            torch.cuda.synchronize()
            held.append(torch.cuda.host_memory_stats().get("allocated_bytes.all.current", 0))
    assert held[1] == held[0]
    _close(engine)
