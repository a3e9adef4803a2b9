"""What `ds-offload estimate` builds on the memory model (ds_offload.memory): the least offloading that fits a
GPU, the quick-decision advice, the step-time cost from `ds-offload doctor`'s measurements, and sizes."""
import dataclasses
import re

from ds_offload.config import ModelOffloadConfig, OffloadConfig, OptimizerOffloadConfig, cuda_graphs_source
from ds_offload.memory import GiB, MiB, estimate


def _with(cfg, model=None, optimizer=None):
    """`cfg` with some fields of its model/optimizer sections replaced (dicts of field: value)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **(model or {})),
                               optimizer=dataclasses.replace(cfg.optimizer, **(optimizer or {})))


def what_fits(spec, config, gpu_bytes, micro_batch, seq_len=None, gpus=1, precision=None, reserve=GiB,
              loop="deepspeed"):
    """The least offloading that brings the GPU total under gpu_bytes - reserve, three ways.

    `config`: an OffloadConfig (None: no config). The variants keep its DeepSpeed part and start from the
    block's defaults.
    """
    config = config if config is not None else OffloadConfig()
    budget = gpu_bytes - reserve
    args = dict(micro_batch=micro_batch, seq_len=seq_len, gpus=gpus, precision=precision, loop=loop)
    base_cfg = dataclasses.replace(config, model=ModelOffloadConfig(), optimizer=OptimizerOffloadConfig())
    out = {"budget_bytes": budget, "baseline_fits": estimate(spec, base_cfg, **args).baseline_gpu.total <= budget}

    def frac_needed(cfg):
        for i in range(0, 101):
            f = i / 100
            c = _with(cfg, optimizer=dict(optimizer_cpu_offload=f > 0, optimizer_offload_fraction=f))
            if estimate(spec, c, **args).offload_gpu.total <= budget:
                return f
        return None

    def layers_needed(cfg):
        for k in range(0, max(spec.layers, 1)):
            c = _with(cfg, model=dict(cpu_offloading=k > 0, cpu_offloading_num_layers=k,
                                      cpu_offloading_activations=True))
            if estimate(spec, c, **args).offload_gpu.total <= budget:
                return k
        return None

    def weight_layers_needed(cfg):
        stage = int((cfg.deepspeed.get("zero_optimization") or {}).get("stage", 0) or 0)
        if stage not in (1, 2):  # weight offload lives in DeepSpeed's ZeRO-1/2 optimizer
            return None
        for k in range(1, max(spec.layers, 1)):
            c = _with(cfg, model=dict(cpu_offloading=True, cpu_offloading_num_layers=k,
                                      cpu_offloading_activations=False, cpu_offloading_weights=True))
            if estimate(spec, c, **args).offload_gpu.total <= budget:
                return k
        return None

    out["optimizer_fraction"] = frac_needed(base_cfg)
    out["activation_layers"] = layers_needed(base_cfg)
    out["weight_layers"] = weight_layers_needed(base_cfg)
    m = config.model
    n_cfg = int(m.cpu_offloading_num_layers) if m.cpu_offloading and m.cpu_offloading_activations else 0
    out["config_layers"] = n_cfg
    out["fraction_with_config_layers"] = frac_needed(
        _with(base_cfg, model=dict(cpu_offloading=n_cfg > 0, cpu_offloading_num_layers=n_cfg))) \
        if n_cfg else out["optimizer_fraction"]
    most_layers = max(spec.layers - 1, 0)
    out["fraction_with_all_activation_layers"] = frac_needed(
        _with(base_cfg, model=dict(cpu_offloading=most_layers > 0, cpu_offloading_num_layers=most_layers)))
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
    """The seeds' quick-decision rows that apply to this situation, as (key, situation, recommendation).

    `config`: an OffloadConfig (None: no config); its DeepSpeed part says whether CUDA graphs are on.
    """
    apply = []
    cuda_graphs = config is not None and bool(cuda_graphs_source(config.deepspeed))
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
            elif f is not None:
                apply.append("tunable")  # it fits, but only with more than half of the optimizer on the CPU
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
    """Predicted added seconds per optimizer step from doctor's measurements (a dict, see doctor.py).

    Weight offload: the CPU Adam step over the offloaded layers' parameters (the host's scaling and cast add to
    it). Optimizer offload: the CPU Adam step over the offloaded elements, plus the gradient copy down and the
    updated weights up (hidden behind the CPU step when overlap is on). Activation offload: the copies down in
    forward and up in backward; hidden where a layer's compute takes longer than its copy, so this is the
    upper bound.
    """
    out = {}
    m, o = est.config.model, est.config.optimizer
    pinned_d2h = measured.get("pinned_d2h_gbps")
    pinned_h2d = measured.get("pinned_h2d_gbps")
    page_d2h = measured.get("pageable_d2h_gbps") or pinned_d2h
    page_h2d = measured.get("pageable_h2d_gbps") or pinned_h2d
    if o.optimizer_cpu_offload and o.optimizer_offload_fraction > 0:
        share = est.model.params / (est.gpus if est.zero_stage >= 1 else 1) * o.optimizer_offload_fraction
        rate = measured.get("torch_adam_params_per_s") if o.use_torch_optimizer_for_cpu_offload else \
            measured.get("deepspeed_cpu_adam_params_per_s")
        rate = rate or measured.get("deepspeed_cpu_adam_params_per_s") or measured.get("torch_adam_params_per_s")
        cpu_s = share / rate if rate else None
        pb = 2 if est.precision in ("bf16", "fp16") else 4
        d2h_bw = (pinned_d2h if o.pin_cpu_grads else page_d2h)
        h2d_bw = (pinned_h2d if o.pin_cpu_params else page_h2d)
        xfer = None
        if d2h_bw and h2d_bw:
            xfer = share * pb / (d2h_bw * 1e9) + share * pb / (h2d_bw * 1e9)
        total = None
        if cpu_s is not None:
            total = max(cpu_s, xfer or 0) if o.overlap_cpu_optimizer_d2h_h2d else cpu_s + (xfer or 0)
        out["optimizer"] = {"offloaded_elements": share, "cpu_adam_s": cpu_s, "transfer_s": xfer, "added_s": total}
    if m.cpu_offloading and m.cpu_offloading_weights and m.cpu_offloading_num_layers:
        # Not hidden: the next forward needs the first layers first and backward produces their gradients last.
        n = min(m.cpu_offloading_num_layers, est.model.layers - 1) * est.model.layer_params
        rate = measured.get("torch_adam_params_per_s") if o.use_torch_optimizer_for_cpu_offload else \
            measured.get("deepspeed_cpu_adam_params_per_s")
        out["weights"] = {"offloaded_params": n, "cpu_adam_s": n / rate if rate else None}
    if m.cpu_offloading and m.cpu_offloading_activations and m.cpu_offloading_num_layers:
        k = min(m.cpu_offloading_num_layers, est.model.layers - 1)
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
