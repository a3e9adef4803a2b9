"""The memory model: GPU and CPU bytes per rank for a model (`ModelSpec`) and a config (`OffloadConfig`).

Everything is counted in bytes per data-parallel rank, from first principles:

* parameters, gradients and optimizer state follow DeepSpeed's layout for the precision and ZeRO stage
  (stage >= 1 partitions optimizer state over the ranks, >= 2 gradients, 3 parameters); gradients are freed
  between steps, so the peak holds the larger of gradients and activations (see `_static_per_param`);
* the hybrid optimizer keeps `optimizer_offload_fraction` of the rank's fp32 master weights and Adam moments
  in CPU memory, plus an fp32 gradient buffer for that share (16 bytes per offloaded element); on the GPU that
  frees the share's moments, and its master too where the optimizer, not DeepSpeed, owned it (`loop`);
* activations are the tensors autograd saves for backward, counted per transformer layer (see
  `layer_activation_bytes`); layer-level offload moves those of the first `cpu_offloading_num_layers`
  layers to CPU memory; weight offload takes those layers' weights, gradients and optimizer state out of
  DeepSpeed's optimizer into CPU memory (18 bytes per parameter there with bf16, 16 with fp32).

Not counted: the CUDA context and allocator fragmentation (typically 0.5-2 GiB), communication buckets,
temporary buffers inside kernels.

The what-fits search, the advice and the step-time cost built on it are the CLI's (`ds-offload estimate`).
"""
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Optional

from ..config import OffloadConfig, bf16_optimizer_runs, fused_optimizer_runs
from .model_spec import ModelSpec

GiB = 1024 ** 3
MiB = 1024 ** 2

# ----------------------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------------------
PRECISIONS = ("autocast", "bf16", "fp16", "fp32")


def precision_of(config):
    """autocast (fp32 weights, bf16/fp16 compute), bf16/fp16 (DeepSpeed casts the model), or fp32.

    `config`: an OffloadConfig, or DeepSpeed's part of one (a mapping).
    """
    ds = config.deepspeed if isinstance(config, OffloadConfig) else config

    def on(key):
        sec = ds.get(key)
        return isinstance(sec, Mapping) and bool(sec.get("enabled", False))
    if on("torch_autocast"):
        return "autocast"
    if on("bf16") or on("bfloat16"):
        return "bf16"
    if on("fp16"):
        return "fp16"
    return "fp32"


def _bytes(precision):
    """(residual-stream bytes, matmul-input/output bytes, parameter bytes on the GPU) per element."""
    return {"autocast": (4, 2, 4), "bf16": (2, 2, 2), "fp16": (2, 2, 2), "fp32": (4, 4, 4)}[precision]


# ----------------------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------------------
def layer_activation_bytes(spec, micro_batch, seq_len, precision="autocast"):
    """Bytes one transformer layer saves for backward, by tensor.

    For the Block of ds_offload.models under bf16 autocast (r = 4-byte fp32 residual stream, p = 2-byte bf16):
      ln1 input r*btd, qkv input (bf16 cast of ln1's fp32 output) p*btd, q/k/v (one qkv output) p*bt(d+2kv),
      attention output p*btd and its (b,t,h*dh) copy fed to proj p*btd, log-sum-exp 4*b*heads*t,
      ln2 input r*btd, fc1 input p*btd, fc1 output (GELU input) p*bt*ffn, GELU output (fc2 input) p*bt*ffn,
      and under autocast the bf16 copies of the four weight matrices (2 bytes each), kept by autocast's cache.
    That is 38*btd + 4*bht + 24*d^2 bytes for the GPT: 1313 MiB at hidden 2048, b 8, t 2048 (measured on an
    H200: 1313 MiB). A gated MLP saves gate, up, act(gate) and their product (4 ffn-wide tensors) instead of 2.
    Only the non-weight part can be offloaded (the weight copies live in autocast's cache regardless).
    """
    r, p, _ = _bytes(precision)
    b, t, d = micro_batch, seq_len, spec.hidden
    btd = b * t * d
    parts = {
        "norm1_input": r * btd,
        "qkv_input": p * btd,
        "q_k_v": p * b * t * (d + 2 * spec.kv_dim),
        "attention_output": p * btd,
        "proj_input": p * btd,
        "attention_lse": 4 * b * spec.heads * t,
        "norm2_input": r * btd,
        "mlp_input": p * btd,
        "mlp_hidden": (4 if spec.gated_mlp else 2) * p * b * t * spec.intermediate,
    }
    parts["weight_copies"] = 2 * spec.layer_linear_params() if precision == "autocast" else 0
    return parts


def head_activation_bytes(spec, micro_batch, seq_len, precision="autocast"):
    """Final norm, LM head and loss at the start of backward, where memory peaks: the fp32 log-softmax output
    that cross-entropy saves, the gradient arriving at it and the gradient it produces for the fp32 logits
    (three b*t*vocab fp32 tensors alive together), plus the final norm's and the head's saved inputs."""
    r, p, _ = _bytes(precision)
    b, t = micro_batch, seq_len
    btv = b * t * spec.vocab
    return {"final_norm_input": r * b * t * spec.hidden, "head_input": p * b * t * spec.hidden,
            "log_softmax_fp32": 4 * btv, "log_softmax_grad_fp32": 4 * btv, "logits_grad_fp32": 4 * btv,
            "head_weight_copy": 2 * spec.vocab * spec.hidden if precision == "autocast" else 0}


# ----------------------------------------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Memory:
    params: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0

    @property
    def total(self):
        """The peak: gradients are freed between steps and grow only as backward frees activations, so the
        larger of the two counts (measured: the peak is at the start of backward)."""
        return self.params + self.optimizer + max(self.grads, self.activations)

    def as_dict(self):
        return {**asdict(self), "total": self.total}


@dataclass
class Estimate:
    model: ModelSpec
    micro_batch: int
    seq_len: int
    gpus: int
    zero_stage: int
    precision: str
    config: OffloadConfig                    # what the estimate was made for (its block read through fields)
    baseline_gpu: Memory = field(default_factory=Memory)
    baseline_cpu: Memory = field(default_factory=Memory)
    offload_gpu: Memory = field(default_factory=Memory)
    offload_cpu: Memory = field(default_factory=Memory)
    layer_activation: float = 0.0            # all bytes one layer saves
    layer_activation_offloadable: float = 0.0
    notes: list = field(default_factory=list)

    def as_dict(self):
        return {"model": asdict(self.model), "micro_batch": self.micro_batch, "seq_len": self.seq_len,
                "gpus": self.gpus, "zero_stage": self.zero_stage, "precision": self.precision,
                "layer_activation_bytes": self.layer_activation,
                "layer_activation_offloadable_bytes": self.layer_activation_offloadable,
                "without_offload": {"gpu": self.baseline_gpu.as_dict(), "cpu": self.baseline_cpu.as_dict()},
                "with_config": {"gpu": self.offload_gpu.as_dict(), "cpu": self.offload_cpu.as_dict()},
                "notes": self.notes}


LOOPS = ("deepspeed", "torch")


def _static_per_param(precision, loop, stage, ds):
    """(param, grad, optimizer-state) bytes per parameter on the GPU before partitioning.

    Gradients are freed between steps in both loops (DeepSpeed's engine sets `.grad` to None, ZeRO-1/2 release
    their gradient partitions in `step()`), so they peak apart from the activations. Mixed precision adds the
    fp32 gradients made for the step (4) and keeps an fp32 master (4) beside the moments (8). One exception:
    DeepSpeed's BF16_Optimizer (bf16, ZeRO-1, `data_types.grad_accum_dtype` fp32) keeps fp32 gradient
    accumulators for good, counted with its optimizer state.
    """
    if precision not in ("bf16", "fp16"):
        return 4, 4, 8
    if loop == "deepspeed" and bf16_optimizer_runs(stage, precision == "bf16", ds):
        return 2, 2, 16
    return 2, 6, 12


def estimate(spec: ModelSpec, config: Optional[OffloadConfig] = None, micro_batch=1, seq_len=None, gpus=1,
             precision=None, loop="deepspeed"):
    """An Estimate for `spec` trained with `config` (an OffloadConfig, as `ds_offload.config.load_config`
    returns it; None: plain DeepSpeed defaults, no offload) on `gpus` data-parallel ranks.

    `loop`: "deepspeed" for `ds_offload.initialize` (under DeepSpeed's ZeRO-1/2 optimizer the offloaded share's
    fp32 master, moments and fp32 gradient live on the CPU: 12 bytes per element freed, as measured; the same
    under bf16/fp16 ZeRO-0 (FP16_Optimizer) and BF16_Optimizer, cut the same way; under fp32 ZeRO-0 and
    `torch_adam` the wrapper keeps the fp32 masters, so 8); "torch" for a plain loop with
    `HybridDeviceOptimizer` / `ActivationOffloader` (with bf16 parameters the optimizer holds the fp32 masters
    too, so the offloaded share frees 12 bytes, and its fp32 gradients are made on the CPU).
    Checked against measured H200 peaks in both loops (`benchmarks/estimate_check.py`).
    """
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
    if config is None:
        config = OffloadConfig()
    if not isinstance(config, OffloadConfig):
        raise TypeError(f"config must be an OffloadConfig (ds_offload.config.load_config(dict_or_path)), "
                        f"got {type(config).__name__}")
    ds = config.deepspeed
    seq_len = seq_len or spec.seq_len or 2048
    precision = precision or precision_of(config)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    zero = ds.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0) or 0)
    est = Estimate(model=spec, micro_batch=micro_batch, seq_len=seq_len, gpus=gpus, zero_stage=stage,
                   precision=precision, config=config)
    n = spec.params
    pb, gb, ob = _static_per_param(precision, loop, stage, ds)
    mixed = precision in ("bf16", "fp16")
    params = n * pb / (gpus if stage >= 3 else 1)
    grads = n * gb / (gpus if stage >= 2 else 1)
    opt = n * ob / (gpus if stage >= 1 else 1)

    layer = layer_activation_bytes(spec, micro_batch, seq_len, precision)
    per_layer = sum(layer.values())
    offloadable = per_layer - layer["weight_copies"]
    head = sum(head_activation_bytes(spec, micro_batch, seq_len, precision).values())
    acts = spec.layers * per_layer + head
    est.layer_activation, est.layer_activation_offloadable = per_layer, offloadable
    est.baseline_gpu = Memory(params, grads, opt, acts)
    est.baseline_cpu = Memory()

    gpu, cpu = Memory(params, grads, opt, acts), Memory()
    m, o = config.model, config.optimizer
    k = weights_n = 0  # weights_n => parameters moved out of DeepSpeed's optimizer by weight offload
    if m.cpu_offloading:
        k = min(int(m.cpu_offloading_num_layers), max(spec.layers - 1, 0))
        if m.cpu_offloading_activations and k:
            gpu.activations -= k * offloadable
            cpu.activations += k * offloadable
        if m.cpu_offloading_weights and k:
            # Out of DeepSpeed's optimizer altogether: weights (but those in use at the peak: the running layer
            # and the prefetched ones), gradients and optimizer state; replicated, not partitioned, on the CPU.
            weights_n = k * spec.layer_params
            resident = min(k, 1 + int(m.cpu_offloading_prefetch_depth))
            gpu.params -= (k - resident) * spec.layer_params * pb
            gpu.grads -= weights_n * gb / (gpus if stage >= 2 else 1)
            gpu.optimizer -= weights_n * ob / (gpus if stage >= 1 else 1)
            cpu.params += weights_n * (pb if pb != 4 else 0)  # the working copy (fp32 models: the master is it)
            cpu.optimizer += weights_n * 16  # fp32 master, gradient accumulator, two moments
    if o.optimizer_cpu_offload:
        f = float(o.optimizer_offload_fraction)
        share = (n - weights_n) / (gpus if stage >= 1 else 1)
        # DeepSpeed's ZeRO-1/2 optimizer, its BF16_Optimizer (config optimizer) or its ZeRO-0 FP16_Optimizer
        cut = stage in (1, 2) or fused_optimizer_runs(stage, mixed, ds)
        if loop == "deepspeed" and mixed and cut:
            gpu.optimizer -= f * share * 12         # the cut partition's or flat group's masters and moments
        elif loop == "deepspeed" or not mixed:
            gpu.optimizer -= f * share * 8          # the moments; the fp32 master stays where the model needs it
        else:
            gpu.optimizer -= f * share * 12         # master and moments
            gpu.grads -= f * 4 * n / (gpus if stage >= 2 else 1)   # its fp32 gradient is made on the CPU
        # fp32 master + two moments + an fp32 gradient buffer for the offloaded share
        cpu.optimizer += f * share * 16
    est.offload_gpu, est.offload_cpu = gpu, cpu
    if stage >= 3 and o.optimizer_cpu_offload:
        est.notes.append("ZeRO stage 3 with the hybrid optimizer is refused by validation; "
                         "use zero_optimization.offload_optimizer.ratio")
    return est


