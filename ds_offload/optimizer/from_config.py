"""The hybrid optimizer built from a DeepSpeed config and the validated `cpu_offloading.optimizer` block."""
import copy

from .hybrid import HybridDeviceOptimizer


def prepare_hybrid_optimizer(ds_config, settings, model_parameters):
    """Build the hybrid optimizer from DeepSpeed's ``optimizer`` section and ``settings`` (the block as an
    ``OptimizerOffloadConfig``, already validated: offload on, an Adam-family ``optimizer.type``); return it
    with the DeepSpeed config to hand to ``deepspeed.initialize(optimizer=...)``: a copy with the
    ``optimizer`` section removed (the client optimizer replaces it) and ``zero_allow_untested_optimizer``
    set, since ZeRO and DeepSpeed's BF16/FP16 wrappers only accept client optimizers they do not know with it."""
    cfg = copy.deepcopy(ds_config)
    section = cfg.pop("optimizer", None) or {}
    kind = str(section.get("type", "AdamW")).lower()
    p = dict(section.get("params", {}))
    adamw_mode = True if kind == "adamw" else bool(p.get("adam_w_mode", True))
    opt = HybridDeviceOptimizer(
        model_parameters, offload_fraction=float(settings.optimizer_offload_fraction),
        lr=float(p.get("lr", 1e-3)), betas=tuple(p.get("betas", (0.9, 0.999))), eps=float(p.get("eps", 1e-8)),
        weight_decay=float(p.get("weight_decay", 0.0)), adamw_mode=adamw_mode,
        overlap_cpu_optimizer_d2h_h2d=bool(settings.overlap_cpu_optimizer_d2h_h2d),
        pin_cpu_grads=bool(settings.pin_cpu_grads), pin_cpu_params=bool(settings.pin_cpu_params),
        use_torch_optimizer_for_cpu_offload=bool(settings.use_torch_optimizer_for_cpu_offload))
    cfg["zero_allow_untested_optimizer"] = True
    zero = cfg.get("zero_optimization")
    if isinstance(zero, dict) and zero.get("elastic_checkpoint"):
        # Elastic ZeRO checkpoints read optimizer.state directly; this optimizer's state lives in its pieces.
        zero["elastic_checkpoint"] = False
    return opt, cfg
