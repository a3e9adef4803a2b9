"""The memory model (ds_offload.memory) against numbers worked out by hand for small models."""
import json

import pytest
import torch

from ds_offload import memory as E
from ds_offload.config import OffloadConfig, load_config
from ds_offload.models import GPT, GPTConfig, REFERENCE_GPT

MiB = 2 ** 20
TINY = GPTConfig(vocab_size=512, hidden=64, num_layers=4, num_heads=4, seq_len=32)
C = load_config  # the memory model takes an OffloadConfig


def tiny():
    return E.spec_from_gpt(TINY, "tiny")


def test_parameter_count_by_hand_and_against_the_model():
    # 2*V*d (embedding + head) + L*(12 d^2 + 13 d) + 2 d (final LayerNorm)
    by_hand = 2 * 512 * 64 + 4 * (12 * 64 * 64 + 13 * 64) + 2 * 64
    assert by_hand == 265600
    assert tiny().params == by_hand == sum(p.numel() for p in GPT(TINY).parameters())
    with torch.device("meta"):
        ref = GPT(REFERENCE_GPT)
    spec = E.parse_model("reference-gpt")
    assert spec.params == sum(p.numel() for p in ref.parameters())
    assert spec.layer_params == sum(p.numel() for p in ref.blocks[0].parameters())


def test_layer_activations_by_hand():
    b, t, d, h = 2, 32, 64, 4
    btd = b * t * d
    # autocast: fp32 ln inputs (2 x 4), bf16: qkv input 1, q/k/v 3, attention out 1, proj input 1, fc1 input 1,
    # fc1 out 4, gelu out 4 (x 2 bytes) = 38 bytes per btd; + fp32 log-sum-exp + bf16 weight copies (12 d^2 x 2)
    parts = E.layer_activation_bytes(tiny(), b, t, "autocast")
    assert sum(parts.values()) == 38 * btd + 4 * b * h * t + 24 * d * d == 254976
    assert parts["weight_copies"] == 24 * d * d
    # pure bf16 (DeepSpeed casts the model): 2-byte residual stream, no weight copies: 34 bytes per btd
    assert sum(E.layer_activation_bytes(tiny(), b, t, "bf16").values()) == 34 * btd + 4 * b * h * t
    # fp32: every saved tensor 4 bytes: 68 bytes per btd
    assert sum(E.layer_activation_bytes(tiny(), b, t, "fp32").values()) == 68 * btd + 4 * b * h * t


def test_reference_gpt_layer_within_10_percent_of_the_h200_measurement():
    measured = 1313 * MiB  # reference GPT, micro-batch 8, seq 2048, bf16 autocast, H200
    got = sum(E.layer_activation_bytes(E.parse_model("reference-gpt"), 8, 2048, "autocast").values())
    assert abs(got - measured) / measured < 0.10
    assert round(got / MiB) == 1313


def test_static_memory_by_precision_and_zero_stage():
    s = tiny()
    n = s.params
    fp32 = E.estimate(s, C({}), micro_batch=1).baseline_gpu
    assert (fp32.params, fp32.grads, fp32.optimizer) == (4 * n, 4 * n, 8 * n)
    bf16 = {"bf16": {"enabled": True}}
    z1 = E.estimate(s, C({**bf16, "zero_optimization": {"stage": 1}}), micro_batch=1, gpus=2).baseline_gpu
    # bf16 grads + the fp32 grads made for the step (6); fp32 master + moments (12)
    assert (z1.params, z1.grads, z1.optimizer) == (2 * n, 6 * n, 12 * n / 2)
    z2 = E.estimate(s, C({**bf16, "zero_optimization": {"stage": 2}}), micro_batch=1, gpus=4).baseline_gpu
    assert (z2.params, z2.grads, z2.optimizer) == (2 * n, 6 * n / 4, 12 * n / 4)
    # DeepSpeed's BF16_Optimizer (ZeRO-1, fp32 accumulation) keeps fp32 gradient accumulators with its state
    acc = {**bf16, "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"}}
    b1 = E.estimate(s, C(acc), micro_batch=1, gpus=2).baseline_gpu
    assert (b1.params, b1.grads, b1.optimizer) == (2 * n, 2 * n, 16 * n / 2)
    z3 = E.estimate(s, C({**bf16, "zero_optimization": {"stage": 3}}), micro_batch=1, gpus=4).baseline_gpu
    assert z3.params == 2 * n / 4
    assert E.estimate(s, C({"torch_autocast": {"enabled": True}})).precision == "autocast"


def test_activations_total_by_hand():
    s = tiny()
    b, t, d, v = 2, 32, 64, 512
    est = E.estimate(s, C({}), micro_batch=b, seq_len=t, precision="fp32")
    layer = 68 * b * t * d + 4 * b * 4 * t
    head = 4 * b * t * d + 4 * b * t * d + (4 + 4 + 4) * b * t * v  # final ln in, head in, logits, log-softmax, grad
    assert est.baseline_gpu.activations == 4 * layer + head


def test_peak_holds_the_larger_of_gradients_and_activations():
    """Gradients are freed between steps and grow as backward frees activations: they never add up."""
    s = tiny()
    n = s.params
    m = E.estimate(s, C({}), micro_batch=2, seq_len=32, precision="bf16").baseline_gpu
    assert m.total == 2 * n + 12 * n + max(6 * n, m.activations)
    small = E.estimate(s, C({}), micro_batch=1, seq_len=1, precision="bf16").baseline_gpu
    assert small.activations < 6 * n and small.total == 2 * n + 12 * n + 6 * n
    with pytest.raises(ValueError, match="loop must be one of"):
        E.estimate(s, C({}), loop="jax")


def test_offloaded_share_frees_moments_under_deepspeed_and_masters_too_in_a_torch_loop():
    """DeepSpeed's mixed-precision wrappers own the fp32 masters (they stay on the GPU: 8 bytes per offloaded
    element freed); a plain loop's HybridDeviceOptimizer owns them (12 bytes, and the share's fp32 gradients)."""
    s = tiny()
    n = s.params
    cfg = {"bf16": {"enabled": True},
           "cpu_offloading": {"optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.5}}}
    ds = E.estimate(s, C(cfg), micro_batch=1)
    assert ds.baseline_gpu.optimizer - ds.offload_gpu.optimizer == 0.5 * 8 * n
    assert ds.offload_gpu.grads == ds.baseline_gpu.grads
    pt = E.estimate(s, C(cfg), micro_batch=1, loop="torch")
    assert pt.baseline_gpu.optimizer - pt.offload_gpu.optimizer == 0.5 * 12 * n
    assert pt.baseline_gpu.grads - pt.offload_gpu.grads == 0.5 * 4 * n
    assert ds.offload_cpu.optimizer == pt.offload_cpu.optimizer == 0.5 * 16 * n
    fp32 = E.estimate(s, C({**cfg, "bf16": {"enabled": False}}), micro_batch=1, loop="torch")
    assert fp32.baseline_gpu.optimizer - fp32.offload_gpu.optimizer == 0.5 * 8 * n  # the params are the masters


def test_optimizer_offload_fraction():
    s = tiny()
    n = s.params
    cfg = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
           "cpu_offloading": {"optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": 0.25}}}
    est = E.estimate(s, C(cfg), micro_batch=1, gpus=2)
    # ZeRO-1/2: DeepSpeed's partition is cut, the share's fp32 masters and moments leave the GPU.
    assert est.offload_gpu.optimizer == pytest.approx((12 - 0.25 * 12) * n / 2)
    assert est.offload_cpu.optimizer == pytest.approx(0.25 * 16 * n / 2)
    assert est.offload_gpu.params == est.baseline_gpu.params and est.offload_gpu.grads == est.baseline_gpu.grads
    # bf16 ZeRO-0 with the config's AdamW: DeepSpeed's FP16_Optimizer is cut the same way (not partitioned).
    adamw = {"type": "AdamW", "params": {"lr": 1e-3}}
    est = E.estimate(s, C({**cfg, "zero_optimization": {"stage": 0}, "optimizer": adamw}), micro_batch=1, gpus=2)
    assert est.baseline_gpu.optimizer - est.offload_gpu.optimizer == pytest.approx(0.25 * 12 * n)
    # bf16 ZeRO-1 with fp32 gradient accumulation: BF16_Optimizer's partition is cut (its accumulators stay).
    est = E.estimate(s, C({**cfg, "data_types": {"grad_accum_dtype": "fp32"}}), micro_batch=1, gpus=2)
    assert est.baseline_gpu.optimizer - est.offload_gpu.optimizer == pytest.approx(0.25 * 12 * n / 2)
    # ZeRO-0 with torch_adam or a client optimizer: DeepSpeed's wrapper keeps the masters.
    torch_adam = {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}
    for extra in ({}, {"optimizer": torch_adam}):
        est = E.estimate(s, C({**cfg, "zero_optimization": {"stage": 0}, **extra}), micro_batch=1, gpus=2)
        assert est.baseline_gpu.optimizer - est.offload_gpu.optimizer == pytest.approx(0.25 * 8 * n)


def test_activation_offload_layers():
    s = tiny()
    cfg = {"cpu_offloading": {"model": {"cpu_offloading": True, "cpu_offloading_num_layers": 3}}}
    est = E.estimate(s, C(cfg), micro_batch=2, seq_len=32, precision="autocast")
    offloadable = 38 * 2 * 32 * 64 + 4 * 2 * 4 * 32
    assert est.layer_activation_offloadable == offloadable
    assert est.baseline_gpu.activations - est.offload_gpu.activations == 3 * offloadable
    assert est.offload_cpu.activations == 3 * offloadable
    # activations off -> nothing moves
    off = {"cpu_offloading": {"model": {"cpu_offloading": True, "cpu_offloading_num_layers": 3,
                                        "cpu_offloading_activations": False, "cpu_offloading_weights": True}}}
    # (weight offload is refused by validation, not implemented yet: built without it)
    est2 = E.estimate(s, OffloadConfig.from_parts(off["cpu_offloading"], off), micro_batch=2, seq_len=32)
    assert est2.offload_gpu.activations == est2.baseline_gpu.activations


def test_model_forms(tmp_path):
    s = E.parse_model("params=1.3B,layers=24,hidden=2048")
    assert s.params == 1_300_000_000 and s.layers == 24 and s.hidden == 2048 and s.heads == 16
    with pytest.raises(ValueError):
        E.parse_model("layers=24")
    with pytest.raises(ValueError):
        E.parse_model("params=1B,layers=2,hidden=8,colour=red")
    cfg = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 3,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "hidden_act": "silu",
           "max_position_embeddings": 256, "tie_word_embeddings": False}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    spec = E.parse_model(str(p))
    assert spec.gated_mlp and spec.kv_dim == 64 and spec.seq_len == 256
    cfg_long = {**cfg, "max_position_embeddings": 131072}
    (tmp_path / "long.json").write_text(json.dumps(cfg_long))
    assert E.parse_model(str(tmp_path / "long.json")).seq_len == 4096
    # llama by hand: embed + head 2*V*d, per layer q,o d^2 each, k,v d*kv each, MLP 3*d*ffn, 2 RMSNorm d; final norm d
    d, kv, ffn = 128, 64, 344
    by_hand = 2 * 1000 * d + 3 * (2 * d * d + 2 * d * kv + 3 * d * ffn + 2 * d) + d
    pytest.importorskip("transformers")
    assert spec.params == by_hand
