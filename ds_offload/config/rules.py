"""Rules across fields, against the model and against DeepSpeed's own sections.

They read an OffloadConfig whose every value has passed the schema (a value that failed it was dropped and
reported), so each rule can rely on the types it reads. The first five messages quote Megatron's own.
"""
import difflib
from collections.abc import Mapping

from .settings import BLOCK

SUPPORTED_OPTIMIZERS = ("Adam", "AdamW")

# Top-level keys DeepSpeed 0.19 reads. DeepSpeed ignores anything else silently, so a typo there
# ("zero_optimisation") turns a feature off without a word; we warn instead.
DEEPSPEED_TOP_LEVEL_KEYS = frozenset("""
train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps optimizer scheduler fp16 bf16
bfloat16 amp torch_autocast zero_optimization zero_allow_untested_optimizer zero_force_ds_cpu_optimizer
gradient_clipping prescale_gradients gradient_predivide_factor sparse_gradients communication_data_type
seq_parallel_communication_data_type steps_per_print wall_clock_breakdown dump_state memory_breakdown
activation_checkpointing flops_profiler comms_logger monitor_config tensorboard wandb csv_monitor comet
aio nvme elasticity autotuning compression_training data_efficiency curriculum_learning
data_types checkpoint hybrid_engine compile pipeline eigenvalue progressive_layer_drop quantize_training
sparse_attention dataloader_drop_last disable_allgather use_data_before_expert_parallelism
timers tensor_parallel weight_quantization zenflow graph_harvesting use_node_local_storage
load_universal_checkpoint train_data_path vocabulary_size mics_shard_size mics_hierarchical_params_gather
sequence_parallel_size fp32 gradient_allreduce_op local_rank
""".split()) | {"$schema", BLOCK}

MSG_NUM_LAYERS = "CPU offloading can be done only for layers less than {num_layers}"
MSG_PIPELINE = "Currently there is no support for Pipeline parallelism with CPU offloading"
MSG_RECOMPUTE = "CPU offloading does not work when activation recomputation is enabled"
MSG_CUDA_GRAPHS = "CUDA graphs not supported with CPU offloading."
MSG_FINE_GRAINED = "fine_grained_activation_offloading cannot be enabled with cpu_offloading."
MSG_FRACTION = "optimizer_offload_fraction must be in [0.0, 1.0]"

_RECOMPUTE_KEYS = ("partition_activations", "cpu_checkpointing", "contiguous_memory_optimization")


def section(ds, key):
    """DeepSpeed's section `key` as a mapping ({} when absent, null or not a mapping: DeepSpeed's own checks
    report a malformed section; the rules here must not crash on one)."""
    value = ds.get(key) if isinstance(ds, Mapping) else None
    return value if isinstance(value, Mapping) else {}


def bf16_optimizer_runs(stage, bf16, ds):
    """Whether DeepSpeed 0.19 wraps the optimizer in its BF16_Optimizer rather than its ZeRO-1/2 optimizer:
    bf16 ZeRO-1 with `data_types.grad_accum_dtype` fp32 (it keeps fp32 gradient accumulators; bf16.py cuts its
    fp32 partitions)."""
    accum = str(section(ds, "data_types").get("grad_accum_dtype") or "").lower()
    return bool(bf16) and stage == 1 and accum in ("fp32", "float32", "float")


def fused_optimizer_runs(stage, low_precision, ds):
    """Whether DeepSpeed 0.19 wraps the config's Adam/AdamW (its FusedAdam) in its FP16_Optimizer: ZeRO-0 with
    bf16 or fp16, without `torch_adam` (which gets FP16_UnfusedOptimizer). There the flat fp32 groups are cut."""
    opt = section(ds, "optimizer")
    adam = str(opt.get("type", "")).lower() in ("adam", "adamw")
    return bool(low_precision) and stage == 0 and adam and not section(opt, "params").get("torch_adam", False)


def cuda_graphs_source(ds):
    """Where DeepSpeed's config `ds` asks for CUDA graph capture, or None.

    Only `hybrid_engine.enable_cuda_graph` does in DeepSpeed 0.19: its `compile` section (CompileConfig)
    forbids extra keys and has no torch.compile `mode`, and `graph_harvesting` was removed.
    """
    return "hybrid_engine.enable_cuda_graph" if section(ds, "hybrid_engine").get("enable_cuda_graph") else None


def _weights_rules(key, ds):
    """Weight offload lives inside DeepSpeed's ZeRO-1/2 optimizer or its ZeRO-0 FP16_Optimizer (it owns the
    offloaded layers' step there)."""
    errors = []
    zero = section(ds, "zero_optimization")
    stage = zero.get("stage", 0)
    bf16 = any(section(ds, k).get("enabled") for k in ("bf16", "bfloat16"))
    low = bf16 or section(ds, "fp16").get("enabled")
    if stage == 3:
        errors.append((key, "ZeRO stage 3 partitions and offloads parameters itself. Fix: use "
                            "zero_optimization.offload_param with device \"cpu\" instead of cpu_offloading_weights."))
    elif stage == 0 and not fused_optimizer_runs(stage, low, ds):
        errors.append((key, "under ZeRO-0 weight offload runs inside DeepSpeed's FP16_Optimizer around the FusedAdam "
                            "it builds from the optimizer section: bf16 or fp16, an optimizer section of type Adam or "
                            "AdamW without torch_adam, no client optimizer (with fp32 the engine clips the gradients "
                            "itself and would leave the offloaded ones out). Fix: enable bf16 (or fp16) and describe "
                            "the optimizer in the optimizer section, or set zero_optimization.stage to 1 or 2."))
    elif stage not in (0, 1, 2):
        errors.append((key, f"weight offload runs inside DeepSpeed's ZeRO-0/1/2 optimizers, and this config has ZeRO "
                            f"stage {stage}. Fix: set zero_optimization.stage to 1 or 2."))
    elif bf16_optimizer_runs(stage, bf16, ds):
        errors.append((key, "bf16 ZeRO-1 with data_types.grad_accum_dtype fp32 runs DeepSpeed's BF16_Optimizer, not "
                            "its ZeRO-1/2 optimizer that weight offload builds on. Fix: remove "
                            "data_types.grad_accum_dtype, or use zero_optimization.stage 2."))
    if section(zero, "offload_optimizer").get("device") in ("cpu", "nvme"):
        errors.append((key, "zero_optimization.offload_optimizer moves DeepSpeed's partitions to the CPU with its own "
                            "optimizer, which weight offload does not build on. Fix: remove offload_optimizer and use "
                            "cpu_offloading.optimizer (fraction 1.0 offloads the whole optimizer)."))
    opt = ds.get("optimizer")
    if opt is not None and str(opt.get("type", "")).lower() not in ("adam", "adamw"):
        errors.append((key, f"the offloaded layers are stepped by CPU Adam, and the optimizer is "
                            f"'{opt.get('type')}'. Fix: use one of {', '.join(SUPPORTED_OPTIMIZERS)}."))
    return errors


def rules(cfg, model_layers, pipeline_stages, gradient_checkpointing, fine_grained):
    """(errors, warnings) of an OffloadConfig, each a list of (json_path, message with the fix)."""
    errors, warns = [], []
    m, o, ds = cfg.model, cfg.optimizer, cfg.deepspeed
    mp = f"{BLOCK}.model"
    if m.cpu_offloading:
        if not m.cpu_offloading_activations and not m.cpu_offloading_weights:
            errors.append((mp, "cpu_offloading is true but both cpu_offloading.model.cpu_offloading_activations and "
                               "cpu_offloading.model.cpu_offloading_weights are false, so nothing would be offloaded. "
                               "Fix: set one of them to true, or set cpu_offloading to false."))
        n = m.cpu_offloading_num_layers
        if model_layers is not None and n >= model_layers:
            errors.append((f"{mp}.cpu_offloading_num_layers",
                           MSG_NUM_LAYERS.format(num_layers=model_layers) +
                           f" (got {n}). Fix: set it between 1 and {model_layers - 1}."))
        if n == 0:
            warns.append((f"{mp}.cpu_offloading_num_layers",
                          "cpu_offloading is true but cpu_offloading_num_layers is 0: nothing is offloaded. "
                          "Fix: set the number of layers to offload, or turn cpu_offloading off."))
        if m.cpu_offloading_weights:
            errors += _weights_rules(f"{mp}.cpu_offloading_weights", ds)
    if m.enabled:
        if pipeline_stages is not None and pipeline_stages > 1:
            errors.append((f"{mp}.cpu_offloading", MSG_PIPELINE + f" (the model has {pipeline_stages} stages). "
                           "Fix: use one pipeline stage, or use optimizer offload (cpu_offloading.optimizer) instead."))
        ac = section(ds, "activation_checkpointing")
        if gradient_checkpointing or any(ac.get(k) for k in _RECOMPUTE_KEYS):
            errors.append((f"{mp}.cpu_offloading", MSG_RECOMPUTE + ". Fix: turn off activation_checkpointing "
                           "(partition_activations, cpu_checkpointing, contiguous_memory_optimization) and the "
                           "model's gradient checkpointing, or turn cpu_offloading off."))
        where = cuda_graphs_source(ds)
        if where:
            errors.append((f"{mp}.cpu_offloading", MSG_CUDA_GRAPHS + f" ({where} captures CUDA graphs.) Fix: turn "
                           "CUDA graphs off, or use only optimizer offload, which works with them."))
        if m.cpu_offloading_activations and section(ds, "compile").get("offload_activation"):
            errors.append((f"{mp}.cpu_offloading_activations", "two activation offloads: this one and DeepSpeed's "
                           "compile.offload_activation would move the same saved tensors. Fix: keep one of them."))
        if fine_grained:
            errors.append((f"{mp}.cpu_offloading", MSG_FINE_GRAINED + " Fix: use either the layer-level block or "
                           "ds_offload.ActivationOffloader, not both."))
    if o.enabled:
        op = f"{BLOCK}.optimizer.optimizer_cpu_offload"
        zero = section(ds, "zero_optimization")
        dev = section(zero, "offload_optimizer").get("device")
        if dev in ("cpu", "nvme"):
            errors.append((op, f"two optimizer offloads: {op} and zero_optimization.offload_optimizer.device="
                               f"{dev}. Fix: keep one of them."))
        elif zero.get("stage", 0) == 3:
            errors.append((op, "the hybrid optimizer supports ZeRO stages 0, 1 and 2. Fix: with ZeRO stage 3 use "
                               "DeepSpeed's own zero_optimization.offload_optimizer.ratio for a fractional offload."))
        if section(ds, "compile").get("offload_opt_states"):
            errors.append((op, f"two optimizer offloads: {op} and compile.offload_opt_states. Fix: keep one of them."))
        opt = ds.get("optimizer")
        if opt is not None:
            kind = str(opt.get("type", ""))
            if kind.lower() not in ("adam", "adamw"):
                errors.append(("optimizer.type", f"optimizer offload needs an Adam-family optimizer, got '{kind}'. "
                                                 f"Fix: use one of {', '.join(SUPPORTED_OPTIMIZERS)}."))
        if o.optimizer_offload_fraction == 0.0:
            warns.append((f"{BLOCK}.optimizer.optimizer_offload_fraction",
                          "optimizer_cpu_offload is true but the fraction is 0.0: everything stays on the GPU. "
                          "Fix: set optimizer_offload_fraction above 0."))
    if not o.optimizer_cpu_offload:  # the switch is off: say so rather than ignore what was asked for
        op = f"{BLOCK}.optimizer"
        if o.optimizer_offload_fraction > 0:
            warns.append((f"{op}.optimizer_offload_fraction", f"the fraction is {o.optimizer_offload_fraction} but "
                          "optimizer_cpu_offload is false, so nothing of the optimizer is offloaded. Fix: set "
                          "optimizer_cpu_offload to true, or remove the fraction."))
        if o.overlap_cpu_optimizer_d2h_h2d and not (m.enabled and m.cpu_offloading_weights):  # weights: their step
            warns.append((f"{op}.overlap_cpu_optimizer_d2h_h2d", "overlap is on but optimizer_cpu_offload is false, "
                          "so there is no CPU step to overlap. Fix: set optimizer_cpu_offload to true, or remove it."))
    for key in ds:
        if key not in DEEPSPEED_TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(key, sorted(DEEPSPEED_TOP_LEVEL_KEYS), n=1, cutoff=0.75)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            warns.append((key, f"DeepSpeed does not know the top-level key '{key}' and will ignore it.{hint}"))
    return errors, warns
