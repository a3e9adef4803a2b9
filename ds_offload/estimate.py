"""Memory and step-time estimates for a model, a DeepSpeed config and its `cpu_offloading` block.

Everything is counted in bytes per data-parallel rank, from first principles:

* parameters, gradients and optimizer state follow DeepSpeed's layout for the precision and ZeRO stage
  (stage >= 1 partitions optimizer state over the ranks, >= 2 gradients, 3 parameters); gradients are freed
  between steps, so the peak holds the larger of gradients and activations (see `_static_per_param`);
* the hybrid optimizer keeps `optimizer_offload_fraction` of the rank's fp32 master weights and Adam moments
  in CPU memory, plus an fp32 gradient buffer for that share (16 bytes per offloaded element); on the GPU that
  frees the share's moments, and its master too where the optimizer, not DeepSpeed, owned it (`loop`);
* activations are the tensors autograd saves for backward, counted per transformer layer (see
  `layer_activation_bytes`); layer-level offload moves those of the first `cpu_offloading_num_layers`
  layers to CPU memory.

Not counted: the CUDA context and allocator fragmentation (typically 0.5-2 GiB), communication buckets,
temporary buffers inside kernels.
"""
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

GiB = 1024 ** 3
MiB = 1024 ** 2

# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """The shape facts the estimate needs; `params` is the exact count when known."""
    name: str
    layers: int
    hidden: int
    heads: int
    vocab: int
    intermediate: int = 0          # MLP width; 0 means 4 * hidden
    kv_heads: int = 0              # 0 means heads (multi-head attention)
    gated_mlp: bool = False        # SwiGLU-style MLP (gate, up, down)
    tied_embeddings: bool = False
    seq_len: int = 0               # the model's own sequence length, used when --seq-len is not given
    params: int = 0                # total parameter count; 0 means computed from the shape
    layer_params: int = 0          # parameters of one transformer layer; 0 means computed

    def __post_init__(self):
        self.intermediate = self.intermediate or 4 * self.hidden
        self.kv_heads = self.kv_heads or self.heads
        if not self.layer_params:
            self.layer_params = self.layer_linear_params() + self._layer_small_params()
        if not self.params:
            emb = self.vocab * self.hidden
            self.params = self.layers * self.layer_params + emb * (1 if self.tied_embeddings else 2) + 2 * self.hidden

    @property
    def kv_dim(self):
        return self.hidden // self.heads * self.kv_heads

    def layer_linear_params(self):
        """Weights of the layer's matrix multiplications (what autocast keeps bf16 copies of)."""
        d, kv, i = self.hidden, self.kv_dim, self.intermediate
        attn = d * (d + 2 * kv) + d * d
        mlp = (3 if self.gated_mlp else 2) * d * i
        return attn + mlp

    def _layer_small_params(self):
        d, kv, i = self.hidden, self.kv_dim, self.intermediate
        # biases (the GPT of ds_offload.models has them) and two LayerNorms
        return (d + 2 * kv) + d + i + d + 4 * d


def spec_from_gpt(cfg, name="gpt"):
    """Exact for ds_offload.models.GPT (LayerNorms, biased linears, untied head)."""
    return ModelSpec(name=name, layers=cfg.num_layers, hidden=cfg.hidden, heads=cfg.num_heads, vocab=cfg.vocab_size,
                     seq_len=cfg.seq_len)


def _first(d, *keys, default=None):
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return default


def spec_from_hf_config(path):
    """From a transformers config.json (llama, mistral, qwen, gpt2, gpt-neox, opt, ...): shape from its fields,
    parameter count exact when transformers can build the model on the meta device."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    cfg = json.loads(path.read_text())
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(cfg, "num_attention_heads", "n_head", "num_heads")
    if not (hidden and layers and heads):
        raise ValueError(f"{path}: needs hidden_size, num_hidden_layers and num_attention_heads (or the GPT-2 names)")
    act = str(_first(cfg, "hidden_act", "activation_function", default="gelu"))
    model_type = cfg.get("model_type", "")
    gated = act in ("silu", "swiglu", "swish") and model_type not in ("gpt_neox", "gpt2", "opt")
    spec = ModelSpec(name=str(path), layers=int(layers), hidden=int(hidden), heads=int(heads),
                     vocab=int(_first(cfg, "vocab_size", default=32000)),
                     intermediate=int(_first(cfg, "intermediate_size", "n_inner", "ffn_dim", default=0) or 0),
                     kv_heads=int(_first(cfg, "num_key_value_heads", default=0) or 0), gated_mlp=gated,
                     tied_embeddings=bool(cfg.get("tie_word_embeddings", model_type == "gpt2")),
                     # the context window can be 128k; estimate at a typical training length unless told
                     seq_len=min(int(_first(cfg, "max_position_embeddings", "n_positions", default=0) or 0), 4096))
    exact = _count_hf_params(cfg)
    if exact:
        total, per_layer = exact
        spec.params = total
        spec.layer_params = per_layer or spec.layer_params
    return spec


def _count_hf_params(cfg_dict):
    try:
        import torch
        import transformers
        config = transformers.AutoConfig.for_model(**cfg_dict)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    except Exception:
        return None
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    lists = [m for m in model.modules() if type(m).__name__ == "ModuleList" and len(m) > 1]
    per_layer = sum(p.numel() for p in lists[0][0].parameters()) if lists else 0
    return total, per_layer


_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def _number(text):
    text = text.strip().lower().replace("_", "")
    if text and text[-1] in _SUFFIX:
        return float(text[:-1]) * _SUFFIX[text[-1]]
    return float(text)


def spec_from_kv(text):
    """`params=1.3B,layers=24,hidden=2048[,heads=16,vocab=50257,seq=2048,ffn=8192,kv_heads=..,gated=1]`."""
    vals = {}
    for item in text.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise ValueError(f"'{item}' is not KEY=VALUE (e.g. params=1.3B,layers=24,hidden=2048)")
        k, v = item.split("=", 1)
        vals[k.strip().lower()] = v.strip()
    known = {"params", "layers", "hidden", "heads", "vocab", "seq", "ffn", "kv_heads", "gated"}
    unknown = set(vals) - known
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    for k in ("layers", "hidden"):
        if k not in vals:
            raise ValueError(f"{k}= is required (e.g. params=1.3B,layers=24,hidden=2048)")
    hidden = int(_number(vals["hidden"]))
    heads = int(_number(vals.get("heads", str(max(1, hidden // 128)))))
    spec = ModelSpec(name=text, layers=int(_number(vals["layers"])), hidden=hidden, heads=heads,
                     vocab=int(_number(vals.get("vocab", "32000"))), intermediate=int(_number(vals.get("ffn", "0"))),
                     kv_heads=int(_number(vals.get("kv_heads", "0"))), gated_mlp=vals.get("gated", "0") in ("1", "true"),
                     seq_len=int(_number(vals.get("seq", "0"))))
    if "params" in vals:
        total = int(_number(vals["params"]))
        emb = spec.vocab * spec.hidden * 2
        spec.params = total
        spec.layer_params = max(1, (total - emb) // spec.layers) if total > emb else max(1, total // spec.layers)
    return spec


NAMED_MODELS = {"tiny-gpt": "GPTConfig()", "reference-gpt": "REFERENCE_GPT", "wide-gpt": "WIDE_GPT"}


def parse_model(text):
    """`tiny-gpt`, `reference-gpt`, `wide-gpt`, a transformers config.json (or its folder), or KEY=VALUE,..."""
    from . import models
    if text in NAMED_MODELS:
        cfg = {"tiny-gpt": models.GPTConfig(), "reference-gpt": models.REFERENCE_GPT,
               "wide-gpt": models.WIDE_GPT}[text]
        return spec_from_gpt(cfg, name=text)
    if "=" in text:
        return spec_from_kv(text)
    if Path(text).exists():
        return spec_from_hf_config(text)
    raise ValueError(f"'{text}' is not a known model ({', '.join(NAMED_MODELS)}), an existing config.json, "
                     "or params=...,layers=...,hidden=...")


# ----------------------------------------------------------------------------------------------------------
# Precision
# ----------------------------------------------------------------------------------------------------------
PRECISIONS = ("autocast", "bf16", "fp16", "fp32")


def precision_of(config):
    """autocast (fp32 weights, bf16/fp16 compute), bf16/fp16 (DeepSpeed casts the model), or fp32."""
    def on(key):
        sec = config.get(key)
        return isinstance(sec, dict) and bool(sec.get("enabled", False))
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
    block: dict
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


def default_block():
    return {"model": {"cpu_offloading": False, "cpu_offloading_num_layers": 0, "cpu_offloading_activations": True,
                      "cpu_offloading_weights": False, "cpu_offloading_double_buffering": False,
                      "cpu_offloading_prefetch_depth": 1},
            "optimizer": {"optimizer_cpu_offload": False, "optimizer_offload_fraction": 0.0,
                          "overlap_cpu_optimizer_d2h_h2d": False, "use_torch_optimizer_for_cpu_offload": False,
                          "pin_cpu_grads": True, "pin_cpu_params": True}}


def block_of(config):
    """The filled block of a config dict (defaults where keys are missing)."""
    out = default_block()
    raw = (config or {}).get("cpu_offloading") or {}
    for sec in ("model", "optimizer"):
        out[sec].update(raw.get(sec) or {})
    return out


LOOPS = ("deepspeed", "torch")


def _static_per_param(precision, loop, stage, config):
    """(param, grad, optimizer-state) bytes per parameter on the GPU before partitioning.

    Gradients are freed between steps in both loops (DeepSpeed's engine sets `.grad` to None, ZeRO-1/2 release
    their gradient partitions in `step()`), so they peak apart from the activations. Mixed precision adds the
    fp32 gradients made for the step (4) and keeps an fp32 master (4) beside the moments (8). One exception:
    DeepSpeed's BF16_Optimizer (bf16, ZeRO-1, `data_types.grad_accum_dtype` fp32) keeps fp32 gradient
    accumulators for good, counted with its optimizer state.
    """
    if precision not in ("bf16", "fp16"):
        return 4, 4, 8
    accum = str((config.get("data_types") or {}).get("grad_accum_dtype") or "").lower()
    if loop == "deepspeed" and precision == "bf16" and stage == 1 and accum in ("fp32", "float32", "float"):
        return 2, 2, 16
    return 2, 6, 12


def estimate(spec, config=None, micro_batch=1, seq_len=None, gpus=1, precision=None, loop="deepspeed"):
    """An Estimate for `spec` trained with DeepSpeed `config` (dict) on `gpus` data-parallel ranks.

    `loop`: "deepspeed" for `ds_offload.initialize` (DeepSpeed's mixed-precision wrappers own the fp32 masters,
    so the hybrid optimizer frees only the moments of its share on the GPU: 8 bytes per element); "torch" for a
    plain loop with `HybridDeviceOptimizer` / `ActivationOffloader` (with bf16 parameters the optimizer holds the
    fp32 masters too, so the offloaded share frees 12 bytes, and its fp32 gradients are made on the CPU).
    Checked against measured H200 peaks in both loops (`benchmarks/estimate_check.py`).
    """
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}")
    config = config or {}
    seq_len = seq_len or spec.seq_len or 2048
    precision = precision or precision_of(config)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    zero = config.get("zero_optimization") or {}
    stage = int(zero.get("stage", 0) or 0)
    block = block_of(config)
    est = Estimate(model=spec, micro_batch=micro_batch, seq_len=seq_len, gpus=gpus, zero_stage=stage,
                   precision=precision, block=block)
    n = spec.params
    pb, gb, ob = _static_per_param(precision, loop, stage, config)
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
    m, o = block["model"], block["optimizer"]
    if m["cpu_offloading"]:
        k = min(int(m["cpu_offloading_num_layers"]), max(spec.layers - 1, 0))
        if m["cpu_offloading_activations"] and k:
            gpu.activations -= k * offloadable
            cpu.activations += k * offloadable
        if m["cpu_offloading_weights"] and k:
            resident = min(k, 1 + int(m.get("cpu_offloading_prefetch_depth", 1) or 1))
            moved = (k - resident) * spec.layer_params * pb / (gpus if stage >= 3 else 1)
            gpu.params -= moved
            cpu.params += k * spec.layer_params * pb / (gpus if stage >= 3 else 1)
    if o["optimizer_cpu_offload"]:
        f = float(o["optimizer_offload_fraction"])
        share = n / (gpus if stage >= 1 else 1)
        if loop == "deepspeed" or not mixed:
            gpu.optimizer -= f * share * 8          # the moments; the fp32 master stays where the model needs it
        else:
            gpu.optimizer -= f * share * 12         # master and moments
            gpu.grads -= f * 4 * n / (gpus if stage >= 2 else 1)   # its fp32 gradient is made on the CPU
        # fp32 master + two moments + an fp32 gradient buffer for the offloaded share
        cpu.optimizer += f * share * 16
    est.offload_gpu, est.offload_cpu = gpu, cpu
    if stage >= 3 and o["optimizer_cpu_offload"]:
        est.notes.append("ZeRO stage 3 with the hybrid optimizer is refused by validation; "
                         "use zero_optimization.offload_optimizer.ratio")
    return est


# ----------------------------------------------------------------------------------------------------------
# What fits, advice, step time
# ----------------------------------------------------------------------------------------------------------
def with_block(config, **changes):
    """A copy of config with block keys changed: `model__x=..`/`optimizer__y=..`."""
    import copy
    cfg = copy.deepcopy(config or {})
    blk = cfg.setdefault("cpu_offloading", {})
    for key, value in changes.items():
        sec, name = key.split("__", 1)
        blk.setdefault(sec, {})[name] = value
    return cfg


def what_fits(spec, config, gpu_bytes, micro_batch, seq_len=None, gpus=1, precision=None, reserve=GiB,
              loop="deepspeed"):
    """The least offloading that brings the GPU total under gpu_bytes - reserve, three ways."""
    budget = gpu_bytes - reserve
    args = dict(micro_batch=micro_batch, seq_len=seq_len, gpus=gpus, precision=precision, loop=loop)
    base_cfg = {k: v for k, v in (config or {}).items() if k != "cpu_offloading"}
    out = {"budget_bytes": budget, "baseline_fits": estimate(spec, base_cfg, **args).baseline_gpu.total <= budget}

    def frac_needed(cfg):
        for i in range(0, 101):
            f = i / 100
            c = with_block(cfg, optimizer__optimizer_cpu_offload=f > 0, optimizer__optimizer_offload_fraction=f)
            if estimate(spec, c, **args).offload_gpu.total <= budget:
                return f
        return None

    def layers_needed(cfg):
        for k in range(0, max(spec.layers, 1)):
            c = with_block(cfg, model__cpu_offloading=k > 0, model__cpu_offloading_num_layers=k,
                           model__cpu_offloading_activations=True)
            if estimate(spec, c, **args).offload_gpu.total <= budget:
                return k
        return None

    out["optimizer_fraction"] = frac_needed(base_cfg)
    out["activation_layers"] = layers_needed(base_cfg)
    blk = block_of(config)["model"]
    n_cfg = int(blk["cpu_offloading_num_layers"]) if blk["cpu_offloading"] and blk["cpu_offloading_activations"] else 0
    out["config_layers"] = n_cfg
    out["fraction_with_config_layers"] = frac_needed(
        with_block(base_cfg, model__cpu_offloading=n_cfg > 0, model__cpu_offloading_num_layers=n_cfg)) \
        if n_cfg else out["optimizer_fraction"]
    most_layers = max(spec.layers - 1, 0)
    out["fraction_with_all_activation_layers"] = frac_needed(
        with_block(base_cfg, model__cpu_offloading=most_layers > 0, model__cpu_offloading_num_layers=most_layers))
    return out


QUICK_DECISION = [
    ("pipeline", "Pipeline parallelism (PP > 1) is needed", "optimizer offload: layer-level offload requires one "
     "pipeline stage"),
    ("cuda_graphs", "CUDA graphs are needed", "optimizer offload only: activation offload is incompatible"),
    ("moderate", "Memory pressure is moderate", "optimizer offload with optimizer_offload_fraction 0.25-0.5"),
    ("activations", "Small/medium model, one stage fits, activation memory dominates", "activation offload "
     "(cpu_offloading.model)"),
    ("throughput", "Throughput is the top priority (or it fits without offload)", "no offload: it always adds "
     "overhead"),
    ("tunable", "A tunable memory/speed trade-off is wanted", "optimizer offload with a fractional "
     "optimizer_offload_fraction"),
]


def advice(est, config=None, pipeline_stages=1, fits=None):
    """The seeds' quick-decision rows that apply to this situation, as (key, situation, recommendation)."""
    config = config or {}
    apply = []
    try:
        from .config import _cuda_graphs_on
        cuda_graphs = bool(_cuda_graphs_on(config))
    except Exception:
        cuda_graphs = False
    if pipeline_stages and pipeline_stages > 1:
        apply.append("pipeline")
    if cuda_graphs:
        apply.append("cuda_graphs")
    if fits is not None:
        if fits["baseline_fits"]:
            apply.append("throughput")
        else:
            f = fits["optimizer_fraction"]
            if f is not None and f <= 0.5:
                apply.append("moderate")
            acts = est.baseline_gpu.activations
            static = est.baseline_gpu.total - acts
            if acts > static and pipeline_stages <= 1 and not cuda_graphs and fits["activation_layers"] is not None:
                apply.append("activations")
    else:
        acts = est.baseline_gpu.activations
        if acts > est.baseline_gpu.total - acts and pipeline_stages <= 1 and not cuda_graphs:
            apply.append("activations")
    return [row for row in QUICK_DECISION if row[0] in apply]


def step_time_cost(est, measured):
    """Predicted added seconds per optimizer step from doctor's measurements (a dict, see launcher/doctor.py).

    Optimizer offload: the CPU Adam step over the offloaded elements, plus the gradient copy down and the
    updated weights up (hidden behind the CPU step when overlap is on). Activation offload: the copies down in
    forward and up in backward; hidden where a layer's compute takes longer than its copy, so this is the
    upper bound.
    """
    out = {}
    m, o = est.block["model"], est.block["optimizer"]
    pinned_d2h = measured.get("pinned_d2h_gbps")
    pinned_h2d = measured.get("pinned_h2d_gbps")
    page_d2h = measured.get("pageable_d2h_gbps") or pinned_d2h
    page_h2d = measured.get("pageable_h2d_gbps") or pinned_h2d
    if o["optimizer_cpu_offload"] and o["optimizer_offload_fraction"] > 0:
        share = est.model.params / (est.gpus if est.zero_stage >= 1 else 1) * o["optimizer_offload_fraction"]
        rate = measured.get("torch_adam_params_per_s") if o["use_torch_optimizer_for_cpu_offload"] else \
            measured.get("deepspeed_cpu_adam_params_per_s")
        rate = rate or measured.get("deepspeed_cpu_adam_params_per_s") or measured.get("torch_adam_params_per_s")
        cpu_s = share / rate if rate else None
        pb = 2 if est.precision in ("bf16", "fp16") else 4
        d2h_bw = (pinned_d2h if o["pin_cpu_grads"] else page_d2h)
        h2d_bw = (pinned_h2d if o["pin_cpu_params"] else page_h2d)
        xfer = None
        if d2h_bw and h2d_bw:
            xfer = share * pb / (d2h_bw * 1e9) + share * pb / (h2d_bw * 1e9)
        total = None
        if cpu_s is not None:
            total = max(cpu_s, xfer or 0) if o["overlap_cpu_optimizer_d2h_h2d"] else cpu_s + (xfer or 0)
        out["optimizer"] = {"offloaded_elements": share, "cpu_adam_s": cpu_s, "transfer_s": xfer, "added_s": total}
    if m["cpu_offloading"] and m["cpu_offloading_activations"] and m["cpu_offloading_num_layers"]:
        k = min(m["cpu_offloading_num_layers"], est.model.layers - 1)
        nbytes = k * est.layer_activation_offloadable
        if pinned_d2h and pinned_h2d:
            down, up = nbytes / (pinned_d2h * 1e9), nbytes / (pinned_h2d * 1e9)
            out["activations"] = {"bytes_per_step": nbytes, "d2h_s": down, "h2d_s": up, "added_s_upper_bound": down + up,
                                  "per_layer_copy_s": est.layer_activation_offloadable / (pinned_d2h * 1e9)}
        else:
            out["activations"] = {"bytes_per_step": nbytes, "added_s_upper_bound": None}
    return out


def fmt_bytes(n):
    if n is None:
        return "n/a"
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.1f} MiB"


def parse_size(text):
    """'80GiB', '80GB', '80G', '81920MiB', '80' (GiB) -> bytes."""
    t = str(text).strip().replace(" ", "")
    mt = re.fullmatch(r"([0-9.]+)([KMGT]i?B?|[kmgt]i?b?)?", t)
    if not mt:
        raise ValueError(f"'{text}' is not a size (e.g. 80GiB, 141GB, 24G)")
    value, unit = float(mt.group(1)), (mt.group(2) or "G").upper()
    base = 1000 if ("B" in unit and "I" not in unit and len(unit) == 2) else 1024
    power = "KMGT".index(unit[0]) + 1
    return int(value * base ** power)
