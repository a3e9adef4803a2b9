"""Loading and checking the `cpu_offloading` block of a DeepSpeed config.

Everything here runs before DeepSpeed, a process group, a thread or any GPU memory is touched, so a bad
config costs the user seconds, not a queued job. Problems are collected, never raised one at a time: a
user fixing a config wants the whole list, each with its JSON path and the fix.
"""
import copy
import difflib
import json
import warnings
from importlib import resources
from pathlib import Path

from .errors import ConfigError

BLOCK = "cpu_offloading"
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

CUDA_GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")

MSG_NUM_LAYERS = "CPU offloading can be done only for layers less than {num_layers}"
MSG_PIPELINE = "Currently there is no support for Pipeline parallelism with CPU offloading"
MSG_RECOMPUTE = "CPU offloading does not work when activation recomputation is enabled"
MSG_CUDA_GRAPHS = "CUDA graphs not supported with CPU offloading."
MSG_FINE_GRAINED = "fine_grained_activation_offloading cannot be enabled with cpu_offloading."
MSG_FRACTION = "optimizer_offload_fraction must be in [0.0, 1.0]"


def load_schema():
    """The block's JSON Schema, shipped in the package and mirrored at schemas/ for editors."""
    return json.loads((resources.files("ds_offload") / "cpu_offloading.schema.json").read_text())


def read_json(path):
    """Read a JSON file; malformed JSON is reported with file, line and column."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError([("$", f"cannot read config file: {e.strerror}. Fix: pass the path of an existing "
                                 "DeepSpeed JSON config.")], source=str(path)) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError([("$", f"malformed JSON at {path}:{e.lineno}:{e.colno}: {e.msg}. Fix: correct the "
                                 "JSON syntax there (trailing commas and comments are not JSON).")],
                          source=str(path)) from None


def _as_dict(config):
    if isinstance(config, dict):
        return copy.deepcopy(config), None
    if isinstance(config, (str, Path)):
        return read_json(config), str(config)
    raise ConfigError([("$", f"config must be a dict or a path to a JSON file, got {type(config).__name__}. "
                             "Fix: pass the DeepSpeed config as a dict or a file path.")])


def _json_path(parts):
    return ".".join([BLOCK, *map(str, parts)]) if parts else BLOCK


def _schema_errors(block, schema):
    """Translate jsonschema's findings into (path, message-with-fix) pairs a user can act on."""
    from jsonschema import Draft202012Validator
    defs = schema["$defs"]
    validator = Draft202012Validator({**defs["cpu_offloading"], "$defs": defs})
    found = []
    for err in sorted(validator.iter_errors(block), key=lambda e: list(map(str, e.absolute_path))):
        parts = list(err.absolute_path)
        if err.validator == "additionalProperties":
            sub = defs[parts[-1]] if parts else defs["cpu_offloading"]
            known = sorted(sub["properties"])
            for key in sorted(set(err.instance) - set(known)):
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}."
                found.append((_json_path(parts + [key]), f"unknown key '{key}'; {hint} Fix: rename or remove it."))
            continue
        key = parts[-1] if parts else BLOCK
        value = json.dumps(err.instance)
        if err.validator == "type":
            want = err.validator_value
            fix = {"boolean": "true or false", "integer": "a whole number", "number": "a number",
                   "object": "a JSON object {...}"}.get(want, want)
            msg = f"expected {want}, got {value}. Fix: set it to {fix}."
        elif key == "optimizer_offload_fraction" and err.validator in ("minimum", "maximum"):
            msg = f"{MSG_FRACTION} (got {value}). Fix: set a value between 0.0 and 1.0."
        elif err.validator in ("minimum", "maximum"):
            bound = "at least" if err.validator == "minimum" else "at most"
            msg = f"must be {bound} {err.validator_value}, got {value}. Fix: use a value {bound} {err.validator_value}."
        else:
            msg = f"{err.message}. Fix: see the config reference in the README."
        found.append((_json_path(parts), msg))
    return found


def fill_defaults(block, schema=None):
    """The block with every key present: what the engine acts on is exactly what the user sees."""
    defs = (schema or load_schema())["$defs"]
    out = {}
    for section in ("model", "optimizer"):
        given = dict((block or {}).get(section) or {})
        out[section] = {k: given.get(k, spec["default"]) for k, spec in defs[section]["properties"].items()}
    return out


def layer_offload_on(block):
    m = block["model"]
    return bool(m["cpu_offloading"]) and (m["cpu_offloading_activations"] or m["cpu_offloading_weights"])


def optimizer_offload_on(block):
    return bool(block["optimizer"]["optimizer_cpu_offload"])


def _recompute_on(config, gradient_checkpointing):
    ac = config.get("activation_checkpointing") or {}
    keys = ("partition_activations", "cpu_checkpointing", "contiguous_memory_optimization")
    return gradient_checkpointing or (isinstance(ac, dict) and any(ac.get(k) for k in keys))


def _cuda_graphs_on(config):
    if (config.get("hybrid_engine") or {}).get("enable_cuda_graph"):
        return "hybrid_engine.enable_cuda_graph"
    comp = config.get("compile") or {}
    if isinstance(comp, dict) and comp.get("enabled", True) and comp:
        kwargs = comp.get("kwargs") or {}
        if kwargs.get("mode") in CUDA_GRAPH_COMPILE_MODES or (kwargs.get("options") or {}).get("triton.cudagraphs"):
            return "compile.kwargs"
    return None


def _rules(config, block, model_layers, pipeline_stages, gradient_checkpointing, fine_grained):
    """Rules across fields and against the model; the first five quote Megatron's own messages."""
    errors, warns = [], []
    m, o = block["model"], block["optimizer"]
    mp = f"{BLOCK}.model"
    if m["cpu_offloading"]:
        if not m["cpu_offloading_activations"] and not m["cpu_offloading_weights"]:
            errors.append((mp, "cpu_offloading is true but both cpu_offloading.model.cpu_offloading_activations and "
                               "cpu_offloading.model.cpu_offloading_weights are false, so nothing would be offloaded. "
                               "Fix: set one of them to true, or set cpu_offloading to false."))
        n = m["cpu_offloading_num_layers"]
        if model_layers is not None and n >= model_layers:
            errors.append((f"{mp}.cpu_offloading_num_layers",
                           MSG_NUM_LAYERS.format(num_layers=model_layers) +
                           f" (got {n}). Fix: set it between 1 and {model_layers - 1}."))
        if n == 0:
            warns.append((f"{mp}.cpu_offloading_num_layers",
                          "cpu_offloading is true but cpu_offloading_num_layers is 0: nothing is offloaded. "
                          "Fix: set the number of layers to offload, or turn cpu_offloading off."))
        if m["cpu_offloading_weights"]:
            warns.append((f"{mp}.cpu_offloading_weights",
                          "weight offloading is not implemented yet; ds_offload.initialize refuses this config. "
                          "Fix: set cpu_offloading_weights to false."))
    if layer_offload_on(block):
        if pipeline_stages is not None and pipeline_stages > 1:
            errors.append((f"{mp}.cpu_offloading", MSG_PIPELINE + f" (the model has {pipeline_stages} stages). "
                           "Fix: use one pipeline stage, or use optimizer offload (cpu_offloading.optimizer) instead."))
        if _recompute_on(config, gradient_checkpointing):
            errors.append((f"{mp}.cpu_offloading", MSG_RECOMPUTE + ". Fix: turn off activation_checkpointing "
                           "(partition_activations, cpu_checkpointing, contiguous_memory_optimization) and the "
                           "model's gradient checkpointing, or turn cpu_offloading off."))
        where = _cuda_graphs_on(config)
        if where:
            errors.append((f"{mp}.cpu_offloading", MSG_CUDA_GRAPHS + f" ({where} captures CUDA graphs.) Fix: turn "
                           "CUDA graphs off, or use only optimizer offload, which works with them."))
        if fine_grained:
            errors.append((f"{mp}.cpu_offloading", MSG_FINE_GRAINED + " Fix: use either the layer-level block or "
                           "ds_offload.ActivationOffloader, not both."))
    if o["optimizer_cpu_offload"]:
        op = f"{BLOCK}.optimizer.optimizer_cpu_offload"
        zero = config.get("zero_optimization") or {}
        dev = (zero.get("offload_optimizer") or {}).get("device")
        if dev in ("cpu", "nvme"):
            errors.append((op, f"two optimizer offloads: {op} and zero_optimization.offload_optimizer.device="
                               f"{dev}. Fix: keep one of them."))
        elif int(zero.get("stage", 0) or 0) == 3:
            errors.append((op, "the hybrid optimizer supports ZeRO stages 0, 1 and 2. Fix: with ZeRO stage 3 use "
                               "DeepSpeed's own zero_optimization.offload_optimizer.ratio for a fractional offload."))
        opt = config.get("optimizer")
        if opt is not None:
            kind = str((opt or {}).get("type", ""))
            if kind.lower() not in ("adam", "adamw"):
                errors.append(("optimizer.type", f"optimizer offload needs an Adam-family optimizer, got '{kind}'. "
                                                 f"Fix: use one of {', '.join(SUPPORTED_OPTIMIZERS)}."))
        if o["optimizer_offload_fraction"] == 0.0:
            warns.append((f"{BLOCK}.optimizer.optimizer_offload_fraction",
                          "optimizer_cpu_offload is true but the fraction is 0.0: everything stays on the GPU. "
                          "Fix: set optimizer_offload_fraction above 0."))
    for key in config:
        if key not in DEEPSPEED_TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(key, sorted(DEEPSPEED_TOP_LEVEL_KEYS), n=1, cutoff=0.75)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            warns.append((key, f"DeepSpeed does not know the top-level key '{key}' and will ignore it.{hint}"))
    return errors, warns


def check_config(config, *, model_layers=None, pipeline_stages=None, gradient_checkpointing=False,
                 fine_grained=False):
    """(errors, warnings), each a list of (json_path, message); raises only for unreadable input."""
    config, _ = _as_dict(config)
    raw = config.get(BLOCK)
    if raw is None:
        return [], _rules(config, fill_defaults({}), None, None, False, False)[1]
    schema = load_schema()
    errors = _schema_errors(raw, schema)
    if errors:
        return errors, []
    block = fill_defaults(raw, schema)
    e, w = _rules(config, block, model_layers, pipeline_stages, gradient_checkpointing, fine_grained)
    return errors + e, w


def load_config(config, **model_facts):
    """The whole DeepSpeed config with the block validated and its defaults filled in.

    Raises ConfigError listing every problem; warnings go through `warnings.warn` once each.
    """
    config, src = _as_dict(config)
    errors, warns = check_config(config, **model_facts)
    if errors:
        raise ConfigError(errors, source=src)
    for path, msg in warns:
        warnings.warn(f"{path}: {msg}", stacklevel=2)
    config[BLOCK] = fill_defaults(config.get(BLOCK) or {})
    return config


def split_config(config):
    """(DeepSpeed's config without our block or editor keys, the filled block)."""
    ds = {k: v for k, v in config.items() if k not in (BLOCK, "$schema")}
    return ds, fill_defaults(config.get(BLOCK) or {})
