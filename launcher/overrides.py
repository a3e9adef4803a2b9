"""KEY=VALUE overrides of `ds-offload launch`: parsing, the key paths they may name, and their checks.

Dotted JSON keys and Megatron Bridge's `model.X` / `optimizer.X` forms; a value is JSON or Python's
True/False/None. Keys DeepSpeed checks with a strict pydantic model are checked against it before launching.
"""
import copy
import difflib
import json

BLOCK = "cpu_offloading"

# Sections of the DeepSpeed config that DeepSpeed checks with a strict pydantic model (unknown keys are
# errors there too); an override into one of them is checked against that model before launching.
_PYDANTIC_SECTIONS = {
    "zero_optimization": ("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
    "bf16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
    "fp16": ("deepspeed.runtime.precision_config", "DeepSpeedFP16Config"),
    "activation_checkpointing": ("deepspeed.runtime.activation_checkpointing.config",
                                 "DeepSpeedActivationCheckpointingConfig"),
    "flops_profiler": ("deepspeed.runtime.config", "DeepSpeedFlopsProfilerConfig"),
    "comms_logger": ("deepspeed.runtime.config", "DeepSpeedCommsConfig"),
    "hybrid_engine": ("deepspeed.runtime.config", "HybridEngineConfig"),
    "compile": ("deepspeed.runtime.config", "CompileConfig"),
}


# Top-level DeepSpeed keys whose value is a scalar, with the JSON type DeepSpeed expects.
_SCALAR_KEYS = {
    "train_batch_size": int, "train_micro_batch_size_per_gpu": int, "gradient_accumulation_steps": int,
    "gradient_clipping": (int, float), "steps_per_print": int, "prescale_gradients": bool,
    "gradient_predivide_factor": (int, float), "sparse_gradients": bool, "wall_clock_breakdown": bool,
    "dump_state": bool, "memory_breakdown": bool, "zero_allow_untested_optimizer": bool,
    "zero_force_ds_cpu_optimizer": bool, "dataloader_drop_last": bool, "communication_data_type": (str, type(None)),
}
_TYPE_NAMES = {int: "an integer", bool: "true or false", str: "a string"}


class OverrideError(Exception):
    """Problems with KEY=VALUE overrides: a list of (key, message)."""

    def __init__(self, errors, config=None):
        self.errors = errors
        self.config = config  # config => the config with the overrides that were fine applied
        super().__init__("; ".join(f"{k}: {m}" for k, m in errors))


# ----------------------------------------------------------------------------------------------------------
# DeepSpeed's launcher options, read from its own argparse parser so that --help shows all of them.
# ----------------------------------------------------------------------------------------------------------


def parse_value(raw):
    """JSON, plus Python's True/False/None; anything else is taken as a string (`optimizer.type=AdamW`)."""
    if raw in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[raw]
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        if raw[:1] in "[{\"":
            raise ValueError(f"'{raw}' looks like JSON but does not parse") from None
        return raw


def _block_keys():
    from ds_offload.config import load_schema
    defs = load_schema()["$defs"]
    return {s: sorted(defs[s]["properties"]) for s in ("model", "optimizer")}


def _did_you_mean(word, options):
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def resolve_key(key, config):
    """The list of JSON keys an override KEY names; raises ValueError for an unknown key path."""
    from ds_offload.config import DEEPSPEED_TOP_LEVEL_KEYS
    parts = key.split(".")
    if any(p == "" for p in parts):
        raise ValueError("empty part in the key path")
    block = _block_keys()
    head = parts[0]
    # Megatron Bridge forms: model.X and optimizer.X for the block's keys.
    if head == "model" or (head == "optimizer" and len(parts) == 2 and parts[1] in block["optimizer"]):
        if len(parts) == 2 and parts[1] in block[head]:
            return [BLOCK, head, parts[1]]
        if head == "model":
            name = parts[-1]
            raise ValueError(f"unknown key path (the Megatron Bridge form model.X maps to cpu_offloading.model.X, "
                             f"whose keys are: {', '.join(block['model'])}).{_did_you_mean(name, block['model'])}")
    if head == BLOCK:
        if len(parts) < 3 or parts[1] not in block:
            sub = parts[1] if len(parts) > 1 else ""
            hint = _did_you_mean(sub, block) if sub else ""
            raise ValueError(f"unknown key path: cpu_offloading has the sections 'model' and 'optimizer', "
                             f"each with scalar keys (e.g. cpu_offloading.optimizer.optimizer_offload_fraction).{hint}")
        if len(parts) > 3 or parts[2] not in block[parts[1]]:
            raise ValueError(f"unknown key path: cpu_offloading.{parts[1]} has the keys "
                             f"{', '.join(block[parts[1]])}.{_did_you_mean(parts[2], block[parts[1]])}")
        return parts
    if head not in DEEPSPEED_TOP_LEVEL_KEYS and head not in config:
        hint = _did_you_mean(head, sorted(DEEPSPEED_TOP_LEVEL_KEYS))
        raise ValueError(f"unknown key path: DeepSpeed has no top-level key '{head}'.{hint}")
    if head == "optimizer" and len(parts) == 2 and parts[1] not in ("type", "params"):
        raise ValueError(f"unknown key path: the DeepSpeed optimizer section has 'type' and 'params'; the "
                         f"block's optimizer keys are {', '.join(block['optimizer'])}."
                         f"{_did_you_mean(parts[1], ['type', 'params'] + block['optimizer'])}")
    if head in _SCALAR_KEYS and len(parts) > 1:
        raise ValueError(f"unknown key path: DeepSpeed's '{head}' is a single value, not an object. "
                         f"Fix: write {head}=VALUE.")
    _check_pydantic_path(parts)
    return parts


def _check_scalar(parts, value):
    want = _SCALAR_KEYS.get(parts[0]) if len(parts) == 1 else None
    if want is None:
        return
    ok = isinstance(value, want) and not (isinstance(value, bool) and want in (int, (int, float)))
    if not ok:
        name = _TYPE_NAMES.get(want, "a number" if want == (int, float) else "a string or null")
        raise ValueError(f"bad value {json.dumps(value)}: DeepSpeed expects {name}.")


def _section_model(name):
    spec = _PYDANTIC_SECTIONS.get(name)
    if not spec:
        return None
    try:
        import importlib
        return getattr(importlib.import_module(spec[0]), spec[1])
    except Exception:  # pragma: no cover - a DeepSpeed without the class
        return None


def _model_in(annotation):
    """The pydantic model class inside an annotation such as Optional[Model], or None."""
    import typing
    from pydantic import BaseModel
    candidates = [annotation] + list(typing.get_args(annotation))
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def _check_pydantic_path(parts):
    model = _section_model(parts[0])
    for depth, part in enumerate(parts[1:], start=1):
        if model is None:
            return
        fields = model.model_fields
        names = {n: f for n, f in fields.items()}
        names.update({f.alias: f for f in fields.values() if f.alias})
        if part not in names:
            where = ".".join(parts[:depth])
            raise ValueError(f"unknown key path: DeepSpeed's '{where}' has no key '{part}'."
                             f"{_did_you_mean(part, sorted(names))}")
        model = _model_in(names[part].annotation)


def _set(config, parts, value, key):
    node = config
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            where = ".".join(parts[:i + 1])
            raise ValueError(f"cannot set it: '{where}' is {json.dumps(nxt)}, not a JSON object")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(config, overrides):
    """A copy of config with the overrides applied; raises OverrideError listing every bad one."""
    config = copy.deepcopy(config)
    errors, touched = [], set()
    for key, raw in overrides:
        if raw == "":
            errors.append((key, "empty value. Fix: give a value, e.g. KEY=0.5, KEY=true, KEY='\"text\"'."))
            continue
        try:
            value = parse_value(raw)
        except ValueError as e:
            errors.append((key, f"bad value: {e}. Fix: write valid JSON (or True/False/None)."))
            continue
        try:
            parts = resolve_key(key, config)
            _check_scalar(parts, value)
            _set(config, parts, value, key)
            touched.add(parts[0])
        except ValueError as e:
            errors.append((key, str(e)))
    errors += _check_sections(config, touched - {BLOCK})
    if errors:
        raise OverrideError(errors, config)
    return config


def _check_sections(config, sections):
    """Errors from DeepSpeed's own pydantic models for the sections an override touched."""
    errors = []
    for name in sorted(sections):
        model, section = _section_model(name), config.get(name)
        if model is None or not isinstance(section, dict):
            continue
        try:
            model(**section)
        except Exception as e:  # pydantic.ValidationError
            for err in getattr(e, "errors", lambda: [])():
                loc = ".".join([name, *map(str, err.get("loc", ()))])
                errors.append((loc, f"bad value {json.dumps(err.get('input'), default=str)}: {err.get('msg')}."))
    return errors
