"""`ds_offload.initialize`: `deepspeed.initialize` plus the `cpu_offloading` block.

The order matters: the config and the model are checked first (no process group, thread or GPU memory yet),
then DeepSpeed builds its engine from the config without our block, then the offload hooks go onto the
layers DeepSpeed placed. With the block absent or off this is exactly `deepspeed.initialize`.
"""
import contextlib
import copy
import logging
import warnings
from dataclasses import dataclass, field

import torch

from .config import BLOCK, OffloadConfig, bf16_optimizer_runs, fused_optimizer_runs, load_config
from .errors import ConfigError
from .layers import find_layers, unwrap

logger = logging.getLogger("ds_offload")


@dataclass
class OffloadState:
    """What ds_offload did to an engine, kept on it as `engine.ds_offload` for inspection and teardown."""
    config: OffloadConfig  # config => the validated config this run acts on
    layers: list = field(default_factory=list)  # layers => the transformer layers found, in forward order
    layers_path: str = None  # layers_path => where they were found (dotted path, or "layers=")
    activation_offload: object = None  # activation_offload => the LayerOffloadHandle, None when not installed
    optimizer: object = None  # optimizer => the HybridDeviceOptimizer, None without optimizer offload
    weights: object = None  # weights => the WeightOffload of the first layers, None without weight offload

    def summary(self):
        parts = []
        m, o = self.config.model, self.config.optimizer
        if self.activation_offload is not None:
            parts.append(f"activations of the first {m.cpu_offloading_num_layers} of {len(self.layers)} layers "
                         f"({self.layers_path}) to pinned CPU memory")
        elif m.enabled and m.cpu_offloading_activations:
            parts.append("activation offload requested but inactive (no CUDA device)")
        if self.weights is not None:
            parts.append(self.weights.summary())
        if self.optimizer is not None and o.enabled:
            backend = "torch AdamW" if o.use_torch_optimizer_for_cpu_offload else "DeepSpeed CPU Adam"
            n = self.optimizer.split_info()["cpu_numel"]
            # 16 bytes per element on the host: fp32 master, gradient buffer and both moments.
            freed = ("their fp32 masters and moments are freed on the GPU ({:.2f} GiB)".format(12 * n / 2**30)
                     if hasattr(self.optimizer, "tails") else  # HybridZero/FusedOptimizer: DeepSpeed's fp32 copy is cut
                     f"on the GPU their moments are freed ({8 * n / 2**30:.2f} GiB) while DeepSpeed keeps its fp32 "
                     "copy of them")
            zero = hasattr(self.optimizer, "tails")
            during = (" started during backward as the gradients arrive, kept where step() finds it is the one "
                      "plain DeepSpeed takes (nothing clipped) and taken back otherwise, else"
                      if getattr(self.optimizer, "speculation", None) is not None else "")
            overlapped = (f", its step{during} overlapping the next forward; reads of the weights outside a forward "
                          "or state_dict() need engine.ds_offload.wait() first"
                          if zero and self.optimizer.tail_steps.deferred
                          else ", overlapped" if o.overlap_cpu_optimizer_d2h_h2d and not zero else "")
            parts.append(f"{o.optimizer_offload_fraction:.0%} of the optimizer on the CPU ({backend}"
                         f"{overlapped}): {n / 1e6:.2f}M elements "
                         f"with fp32 masters, moments and gradient buffers in CPU memory ({16 * n / 2**30:.2f} GiB); "
                         + freed)
        return "ds_offload: " + ("; ".join(parts) if parts else "nothing offloaded")

    def wait(self):
        """Land the optimizer's last step in the weights. With `overlap_cpu_optimizer_d2h_h2d` under ZeRO-1/2 (or bf16/fp16 ZeRO-0),
        `step()` returns before the CPU share's updated weights are back; forwards, `state_dict()` and
        checkpoints wait for them by themselves, any other read of the parameters (`p.data`, an EMA, a
        functional call) must call this first."""
        if self.optimizer is not None and hasattr(self.optimizer, "wait"):
            self.optimizer.wait()

    def remove(self):
        """Uninstall the layer hooks; the optimizer keeps working."""
        if self.activation_offload is not None:
            self.activation_offload.remove()
            self.activation_offload = None

    def close(self):
        """End of training: uninstall the hooks, stop the CPU optimizer's worker, free pinned memory."""
        self.remove()
        if self.optimizer is not None:
            self.optimizer.close()


def _config_source(args, config):
    if config is not None:
        return config
    for name in ("deepspeed_config", "deepscale_config"):
        value = getattr(args, name, None) if args is not None else None
        if value is not None:
            return value
    raise ConfigError([("$", "no DeepSpeed config given. Fix: pass config=<dict or path> or set "
                             "args.deepspeed_config (ds_offload.add_config_arguments adds the flag).")])


def _model_facts(model, layers):
    from deepspeed.pipe import PipelineModule
    stages = model.num_stages if isinstance(model, PipelineModule) else None
    inner = unwrap(model)
    cfg = getattr(inner, "config", None)
    return dict(model_layers=len(layers) if layers else None,
                pipeline_stages=stages,
                gradient_checkpointing=_gradient_checkpointing(inner),
                fine_grained=bool(getattr(inner, "fine_grained_activation_offloading", False)
                                  or getattr(cfg, "fine_grained_activation_offloading", False)))


def _gradient_checkpointing(model):
    """transformers 5 renamed the flag; reading the old name there only warns, so try the new one first."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name) or name in vars(model):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return bool(getattr(model, name, False))
    return False


def _args_without_config(args):
    if args is None:
        return None
    args = copy.copy(args)
    for name in ("deepspeed_config", "deepscale_config"):
        if hasattr(args, name):
            setattr(args, name, None)
    return args


def _refresh_masters_after_load(engine, hybrid):
    """After any checkpoint load, the CPU masters are re-read from the loaded weights.

    ZeRO and DeepSpeed's bf16/fp16 wrappers write their fp32 partitions through `.data`, which the optimizer
    cannot see; a module-only load would otherwise leave CPU masters at their old values, and the next step
    would drag the weights back to them (the loss jumps back to where it was).
    """
    load = engine.load_checkpoint

    def load_checkpoint(*args, **kwargs):
        result = load(*args, **kwargs)
        hybrid.refresh_masters_from_params()
        return result

    load_checkpoint.__doc__ = load.__doc__
    engine.load_checkpoint = load_checkpoint


def _deepspeed_zero_optimizer_runs(ds_config):
    """Whether DeepSpeed will step with its ZeRO-1/2 optimizer (the path where the fp32 partition is cut).

    ZeRO-0 (FP16_Optimizer, the bare optimizer) and bf16 ZeRO-1 with fp32 gradient accumulation (BF16_Optimizer)
    are the other predicates' (`_cut_runs`); what none of them covers gets the hybrid as a client optimizer.
    """
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    bf16 = any((ds_config.get(k) or {}).get("enabled") for k in ("bf16", "bfloat16"))
    return stage in (1, 2) and not bf16_optimizer_runs(stage, bf16, ds_config)


def _deepspeed_fused_optimizer_runs(ds_config):
    """Whether DeepSpeed will step with its FP16_Optimizer around FusedAdam (the path where each flat fp32
    group is cut): ZeRO-0 with bf16 or fp16 and the config's Adam/AdamW."""
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    low = any((ds_config.get(k) or {}).get("enabled") for k in ("bf16", "bfloat16", "fp16"))
    return fused_optimizer_runs(stage, low, ds_config)


def _hybrid_fused(settings, weights=None):
    """DeepSpeed builds its ZeRO-0 FP16_Optimizer with each flat fp32 group cut (and the offloaded layers' step)."""
    from .optimizer.fused import deepspeed_builds_hybrid_fused
    return deepspeed_builds_hybrid_fused(settings, weights)


def _deepspeed_bf16_optimizer_runs(ds_config):
    """Whether DeepSpeed will step with its BF16_Optimizer (bf16 ZeRO-1 with fp32 gradient accumulation)."""
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    bf16 = any((ds_config.get(k) or {}).get("enabled") for k in ("bf16", "bfloat16"))
    return bf16_optimizer_runs(stage, bf16, ds_config)


def _hybrid_for(ds_config, settings, weights=None):
    """The optimizer class DeepSpeed must build for this config: its ZeRO-1/2 optimizer, its FP16_Optimizer or
    its BF16_Optimizer, each with the fp32 copy cut (weights: not under BF16_Optimizer, the rules refuse it)."""
    if _deepspeed_fused_optimizer_runs(ds_config):
        return _hybrid_fused(settings, weights)
    if _deepspeed_bf16_optimizer_runs(ds_config):
        from .optimizer.bf16 import deepspeed_builds_hybrid_bf16
        return deepspeed_builds_hybrid_bf16(settings)
    return _hybrid_zero(settings, weights)


def _cut_runs(ds_config):
    """Whether DeepSpeed's own optimizer for this config is one ds_offload cuts (else: the client path)."""
    return (_deepspeed_zero_optimizer_runs(ds_config) or _deepspeed_fused_optimizer_runs(ds_config)
            or _deepspeed_bf16_optimizer_runs(ds_config))


def _keep_out_of_allreduce(engine, params):
    """ZeRO-0: DeepSpeed's engine all-reduces every parameter's gradient after backward and gives a zero one to
    those without; the offloaded layers' gradients already left (reduced by WeightOffload), and their parameters
    sit in CPU memory between uses. They sit out the engine's reduction."""
    reduce = engine.allreduce_gradients

    def allreduce_gradients(*args, **kwargs):
        trainable = [p for p in params if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        try:
            return reduce(*args, **kwargs)
        finally:
            for p in trainable:
                p.requires_grad_(True)

    engine.allreduce_gradients = allreduce_gradients


def _hybrid_zero(settings, weights=None):
    """DeepSpeed builds its ZeRO-1/2 optimizer with the partition cut (and the offloaded layers' step)."""
    from .optimizer.zero import deepspeed_builds_hybrid_zero
    return deepspeed_builds_hybrid_zero(settings, weights)


def _plan_weights(cfg, ds_config, model, layers, model_parameters, optimizer):
    """The WeightOffload of the first layers and the parameters DeepSpeed gets instead (the others)."""
    from .weights import WeightOffload, WeightPlan, check_host_memory
    m, o = cfg.model, cfg.optimizer
    if not (_deepspeed_zero_optimizer_runs(ds_config) or _deepspeed_fused_optimizer_runs(ds_config)):
        # the rules refuse this already; never build half of it
        raise ConfigError([(f"{BLOCK}.model.cpu_offloading_weights", "weight offload needs DeepSpeed's ZeRO-1/2 "
                            "optimizer, or its bf16/fp16 ZeRO-0 FP16_Optimizer. Fix: set zero_optimization.stage "
                            "1 or 2.")])
    if _deepspeed_fused_optimizer_runs(ds_config) and optimizer is not None:
        raise ConfigError([(f"{BLOCK}.model.cpu_offloading_weights", f"under ZeRO-0 weight offload builds on the "
                            f"FusedAdam DeepSpeed makes from the config's optimizer section, and a client optimizer "
                            f"({type(optimizer).__name__}) was passed. Fix: drop optimizer= (describe it in the "
                            "optimizer section), or use zero_optimization.stage 1 or 2.")])
    client = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
    params = list(model_parameters) if model_parameters is not None else None
    n = m.cpu_offloading_num_layers
    plan = WeightPlan(layers[:n], unwrap(model), params, client)
    low = any((ds_config.get(k) or {}).get("enabled") for k in ("bf16", "bfloat16", "fp16"))
    gas = int(ds_config.get("gradient_accumulation_steps") or 1)
    needed = plan.host_bytes(2 if low else 4, accumulating=gas > 1)
    if o.enabled:
        rest = sum(p.numel() for p in model.parameters() if p.requires_grad) - plan.numel
        needed += 16 * int(o.optimizer_offload_fraction * rest)
    check_host_memory(needed)
    if client is not None:
        plan.strip_client_optimizer(client)
    kept = plan.keep(params if params is not None else model.parameters())
    return WeightOffload(plan, layers[n:n + m.cpu_offloading_prefetch_depth], m.cpu_offloading_prefetch_depth), kept


def _rank0():
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None, lr_scheduler=None,
               config=None, layers=None, _deepspeed_initialize=None, **deepspeed_kwargs):
    """Drop-in for `deepspeed.initialize`; returns (engine, optimizer, dataloader, lr_scheduler).

    `_deepspeed_initialize`: the DeepSpeed entry point to call (`patch_deepspeed_initialize` passes the original).
    """
    if model is None:
        raise ConfigError([("model", "ds_offload.initialize needs model=. Fix: pass the nn.Module to train.")])
    source = _config_source(args, config)
    found, where = find_layers(model, layers) if isinstance(model, torch.nn.Module) else ([], None)
    cfg = load_config(source, **_model_facts(model, found))
    ds_config = cfg.deepspeed_config()
    state = OffloadState(config=cfg, layers=found, layers_path=where)

    if cfg.model.enabled:
        if not found:
            raise ConfigError([(f"{BLOCK}.model.cpu_offloading", f"no transformer layer list found on "
                                f"{type(unwrap(model)).__name__}. Fix: pass layers=<module list or dotted path>.")])

    builds = contextlib.nullcontext()
    weights = None
    if cfg.model.enabled and cfg.model.cpu_offloading_weights:
        weights, model_parameters = _plan_weights(cfg, ds_config, model, found, model_parameters, optimizer)
        builds = _hybrid_for(ds_config, cfg.optimizer, weights)  # it owns the layers' step, with or without a cut
    if cfg.optimizer.enabled:
        from .optimizer import HybridDeviceOptimizer, prepare_hybrid_optimizer
        client_adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and \
            _deepspeed_zero_optimizer_runs(ds_config)  # DeepSpeed's ZeRO optimizer wraps it; the cut applies
        if optimizer is not None and not isinstance(optimizer, HybridDeviceOptimizer) and not client_adam:
            raise ConfigError([(f"{BLOCK}.optimizer.optimizer_cpu_offload",
                                f"a client optimizer ({type(optimizer).__name__}) was passed while the block asks "
                                "ds_offload to build the hybrid optimizer. Fix: drop optimizer= and describe it in "
                                "the config's optimizer section (Adam or AdamW); under ZeRO-1/2 a torch.optim.Adam "
                                "or AdamW is accepted too.")])
        if client_adam:
            builds = _hybrid_zero(cfg.optimizer, weights)
        elif optimizer is None:
            if "optimizer" not in ds_config:
                raise ConfigError([("optimizer", "optimizer offload needs an optimizer section. Fix: add "
                                                 "\"optimizer\": {\"type\": \"AdamW\", \"params\": {\"lr\": ...}}.")])
            if _cut_runs(ds_config):
                builds = _hybrid_for(ds_config, cfg.optimizer, weights)
            else:
                params = model_parameters if model_parameters is not None else model.parameters()
                optimizer, ds_config = prepare_hybrid_optimizer(ds_config, cfg.optimizer, params)
                model_parameters = None
        state.optimizer = None if client_adam else optimizer

    import deepspeed
    with builds:
        engine, opt, loader, sched = (_deepspeed_initialize or deepspeed.initialize)(
            args=_args_without_config(args), model=model, optimizer=optimizer, model_parameters=model_parameters,
            training_data=training_data, lr_scheduler=lr_scheduler, config=ds_config, **deepspeed_kwargs)
    if (cfg.optimizer.enabled and state.optimizer is None) or weights is not None:
        from .optimizer.bf16 import HybridBF16Optimizer
        from .optimizer.fused import HybridFusedOptimizer
        from .optimizer.zero import HybridZeroOptimizer
        if not isinstance(engine.optimizer, (HybridZeroOptimizer, HybridFusedOptimizer, HybridBF16Optimizer)):
            raise RuntimeError(f"ds_offload: DeepSpeed built {type(engine.optimizer).__name__}, not the optimizer "
                               "ds_offload cuts (ZeRO-1/2, FP16_Optimizer, BF16_Optimizer), so the optimizer offload "
                               "did not take; this is a bug, please report it with your config")
        state.optimizer = engine.optimizer
        state.optimizer.attach(engine.module)

    if cfg.model.enabled and cfg.model.cpu_offloading_activations:
        m = cfg.model
        if torch.cuda.is_available():
            from .activations import install_layer_offload
            state.activation_offload = install_layer_offload(
                found, m.cpu_offloading_num_layers, min_offload_bytes=m.cpu_offloading_min_offload_bytes,
                prefetch_depth=m.cpu_offloading_prefetch_depth,
                double_buffering=m.cpu_offloading_double_buffering,
                retain_pinned_buffers=m.cpu_offloading_retain_pinned_cpu_buffers)
        else:
            warnings.warn("ds_offload: no CUDA device, so activation offloading is off for this run "
                          "(the optimizer split and weight offload still run, both sides on the CPU).", stacklevel=2)
    if weights is not None:
        weights.install()  # after the activation hooks: its saved-tensor hooks nest inside theirs
        state.weights = weights
        if _deepspeed_fused_optimizer_runs(ds_config):
            _keep_out_of_allreduce(engine, [p for L in weights.layers for p in L.params])
    if state.optimizer is not None and hasattr(state.optimizer, "refresh_masters_from_params"):
        _refresh_masters_after_load(engine, state.optimizer)  # the client-optimizer path (fp32 ZeRO-0, torch_adam)
    engine.ds_offload = state
    if _rank0():
        logger.warning(state.summary())
    return engine, opt, loader, sched
