"""Loading and checking a DeepSpeed config with a `cpu_offloading` block.

Everything here runs before DeepSpeed, a process group, a thread or any GPU memory is touched, so a bad
config costs the user seconds, not a queued job. Problems are collected, never raised one at a time: a user
fixing a config wants the whole list, each with its JSON path and the fix. Whatever the input (malformed
JSON, Python values JSON cannot hold, nesting thousands deep, wrong types in the DeepSpeed sections the
rules read), the outcome is a config or a ConfigError: a part found wrong is reported and then treated as
absent, so the remaining checks still run and nothing else can fail on it.
"""
import dataclasses
import difflib
import json
import math
import warnings
from functools import lru_cache
from pathlib import Path

from ..errors import ConfigError
from .rules import MSG_FRACTION, rules
from .settings import BLOCK, OffloadConfig, load_schema

MAX_DEPTH = 64  # DeepSpeed configs nest 4 deep; past this it is not a config (and recursion would fail)
# Sections whose values must be plain JSON: ours, and DeepSpeed's that the rules read.
STRICT_SECTIONS = frozenset({BLOCK, "$schema", "zero_optimization", "optimizer", "hybrid_engine", "compile",
                             "activation_checkpointing"})


def read_json(path):
    """Read a JSON file; malformed JSON is reported with file, line and column."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise ConfigError([("$", f"cannot read config file: {why}. Fix: pass the path of an existing "
                                 "DeepSpeed JSON config.")], source=str(path)) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError([("$", f"malformed JSON at {path}:{e.lineno}:{e.colno}: {e.msg}. Fix: correct the "
                                 "JSON syntax there (trailing commas and comments are not JSON).")],
                          source=str(path)) from None
    except RecursionError:
        raise ConfigError([("$", f"the JSON in {path} nests too deeply to be a DeepSpeed config. Fix: check "
                                 "the file's brackets.")], source=str(path)) from None


def _json_path(parts):
    return ".".join(map(str, parts)) if parts else "$"


def _plain(config):
    """(a JSON-clean copy, problems): bad keys and values are reported and left out of the copy.

    Iterative, so no input can exhaust the stack; tuples are taken as lists (Python users write betas as
    tuples). Outside the strict sections, values JSON cannot hold are DeepSpeed's business and pass as they are.
    """
    problems = []
    root = {}
    stack = [(config, root, [], False)]
    while stack:
        src, dst, path, strict = stack.pop()
        items = src.items() if isinstance(src, dict) else enumerate(src)
        for key, value in items:
            here = path + [key]
            if isinstance(src, dict) and not isinstance(key, str):
                problems.append((_json_path(path + [repr(key)]), f"key {key!r} is a {type(key).__name__}; JSON "
                                 "keys are strings. Fix: use a string key."))
                continue
            inner = strict or (not path and key in STRICT_SECTIONS)
            if isinstance(value, (dict, list, tuple)):
                if len(here) > MAX_DEPTH:
                    problems.append((_json_path(here), f"nested more than {MAX_DEPTH} levels deep. Fix: a "
                                     "DeepSpeed config nests a few levels; check the structure."))
                    continue
                child = {} if isinstance(value, dict) else []
                stack.append((value, child, here, inner))
            elif isinstance(value, float) and not math.isfinite(value) and inner:
                problems.append((_json_path(here), f"{value} is not a finite number. Fix: set a finite value."))
                continue
            elif inner and not (value is None or isinstance(value, (str, bool, int, float))):
                problems.append((_json_path(here), f"{type(value).__name__} value {value!r:.60} is not a JSON "
                                 "value. Fix: use a string, number, boolean, null, list or object."))
                continue
            else:
                child = value
            if isinstance(dst, dict):
                dst[key] = child
            else:
                dst.append(child)
    return root, problems


def _as_dict(config):
    if isinstance(config, (str, Path)):
        config, source = read_json(config), str(config)
    else:
        source = None
    if not isinstance(config, dict):
        raise ConfigError([("$", f"a DeepSpeed config is a JSON object (dict), got {type(config).__name__}. "
                                 "Fix: pass the config as a dict or the path of a JSON file holding an object.")],
                          source=source)
    return config, source


_FIXES = {"boolean": "true or false", "integer": "a whole number (no decimal point)", "number": "a number",
          "object": "a JSON object {...}", "string": "a string", "null": "null"}


@lru_cache(maxsize=1)
def _validator():
    from jsonschema import Draft202012Validator, validators
    # JSON Schema counts 2.0 as an integer; a layer count or depth of 2.0 is a typo to report, not to accept.
    checker = Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, x: isinstance(x, int) and not isinstance(x, bool))
    cls = validators.extend(Draft202012Validator, type_checker=checker)
    return cls(load_schema())


def _show(value):
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _drop(doc, parts):
    """Remove the value at `parts` from `doc` (the checks after the schema treat it as absent)."""
    *head, last = parts
    for p in head:
        doc = doc[p]
    del doc[last]


def _schema_errors(config):
    """Translate jsonschema's findings into (path, message-with-fix) pairs, and drop what they name."""
    defs = load_schema()["$defs"]
    found, drops = [], []
    for err in sorted(_validator().iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        parts = list(err.absolute_path)
        if err.validator == "additionalProperties":
            inside = parts[1:] if parts and parts[0] == BLOCK else []
            sub = defs[inside[-1]] if inside else defs[BLOCK]
            known = sorted(sub["properties"])
            for key in sorted(set(err.instance) - set(known)):
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}."
                found.append((_json_path(parts + [key]), f"unknown key '{key}'; {hint} Fix: rename or remove it."))
                drops.append(parts + [key])
            continue
        key = parts[-1] if parts else "$"
        value = _show(err.instance)
        if len(value) > 80:
            value = value[:77] + "..."
        if err.validator == "type":
            want = err.validator_value if isinstance(err.validator_value, list) else [err.validator_value]
            fix = " or ".join(_FIXES.get(w, w) for w in want)
            msg = f"expected {' or '.join(want)}, got {value}. Fix: set it to {fix}."
        elif key == "optimizer_offload_fraction" and err.validator in ("minimum", "maximum"):
            msg = f"{MSG_FRACTION} (got {value}). Fix: set a value between 0.0 and 1.0."
        elif err.validator in ("minimum", "maximum"):
            bound = "at least" if err.validator == "minimum" else "at most"
            msg = f"must be {bound} {err.validator_value}, got {value}. Fix: use a value {bound} {err.validator_value}."
        else:
            msg = f"{err.message}. Fix: see the config reference in the README."
        found.append((_json_path(parts), msg))
        drops.append(parts)
    for parts in sorted(drops, key=len, reverse=True):
        try:
            _drop(config, parts)
        except (KeyError, IndexError, TypeError):
            pass  # inside something dropped already
    return found


def _model_fact_errors(model_layers, pipeline_stages, gradient_checkpointing, fine_grained):
    errors = []
    for name, value, low in (("model_layers", model_layers, 0), ("pipeline_stages", pipeline_stages, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            errors.append((name, f"must be a whole number >= {low} or None, got {value!r}. Fix: pass the model's "
                                 f"{'layer count' if low == 0 else 'pipeline stage count'} as an int."))
    for name, value in (("gradient_checkpointing", gradient_checkpointing), ("fine_grained", fine_grained)):
        if not isinstance(value, bool):
            errors.append((name, f"must be True or False, got {value!r}. Fix: pass a bool."))
    return errors


def _check(config, model_layers, pipeline_stages, gradient_checkpointing, fine_grained):
    """(OffloadConfig or None, errors, warnings) for a config dict; raises only for an unreadable source."""
    errors = _model_fact_errors(model_layers, pipeline_stages, gradient_checkpointing, fine_grained)
    if errors:
        return None, errors, []
    clean, problems = _plain(config)
    errors = problems + _schema_errors(clean)
    cfg = OffloadConfig.from_parts(clean.get(BLOCK), clean)
    e, warns = rules(cfg, model_layers, pipeline_stages, gradient_checkpointing, fine_grained)
    reported = {p for p, _ in errors}
    # A value already reported was treated as absent; what the rules then say about it repeats the report.
    e = [(p, m) for p, m in e if p not in reported]
    warns = [(p, m) for p, m in warns if p not in reported]
    return (None if errors or e else cfg), errors + e, warns


def check_config(config, *, model_layers=None, pipeline_stages=None, gradient_checkpointing=False,
                 fine_grained=False):
    """(errors, warnings), each a list of (json_path, message); every problem of the config in one pass."""
    config, _ = _as_dict(config)
    _, errors, warns = _check(config, model_layers, pipeline_stages, gradient_checkpointing, fine_grained)
    return errors, warns


def load_config(config, *, model_layers=None, pipeline_stages=None, gradient_checkpointing=False,
                fine_grained=False):
    """The config (a dict or a JSON file's path) as an OffloadConfig, defaults filled in.

    Raises ConfigError listing every problem; warnings go through `warnings.warn` once each.
    """
    config, source = _as_dict(config)
    cfg, errors, warns = _check(config, model_layers, pipeline_stages, gradient_checkpointing, fine_grained)
    if errors:
        raise ConfigError(errors, source=source)
    for path, msg in warns:
        warnings.warn(f"{path}: {msg}", stacklevel=2)
    return dataclasses.replace(cfg, source=source)
