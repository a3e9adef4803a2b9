"""The validated `cpu_offloading` block as typed, immutable objects: what every part of ds_offload reads.

The JSON Schema (`cpu_offloading.schema.json`) is the one place where a key's type, range, default and
description are written; the fields below take their defaults and docs from it, and a test checks that the
two name the same keys. Code receives these objects, never the dict, so a misspelt key is an
AttributeError at the line that reads it rather than a silent `.get(key, default)`.
"""
import copy
import json
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from types import MappingProxyType
from typing import Mapping, Optional

BLOCK = "cpu_offloading"


def load_schema():
    """The block's JSON Schema, shipped in the package and mirrored at schemas/ for editors."""
    return json.loads((resources.files(__package__) / "cpu_offloading.schema.json").read_text())


_DEFS = load_schema()["$defs"]


def _key(section, name):
    spec = _DEFS[section]["properties"][name]
    return field(default=spec["default"], metadata={"doc": spec["description"]})


def _document(cls, section):
    """Append each field's schema description to the class docstring, so help() shows the reference."""
    lines = [f"    {f.name} ({f.type.__name__}, default {json.dumps(f.default)}): {f.metadata['doc']}"
             for f in fields(cls)]
    cls.__doc__ = f"{cls.__doc__}\n\n    Fields (`{BLOCK}.{section}.<name>`):\n" + "\n".join(lines) + "\n"
    return cls


@dataclass(frozen=True)
class ModelOffloadConfig:
    """`cpu_offloading.model`: layer-level offload of the first N transformer layers."""
    cpu_offloading: bool = _key("model", "cpu_offloading")
    cpu_offloading_num_layers: int = _key("model", "cpu_offloading_num_layers")
    cpu_offloading_activations: bool = _key("model", "cpu_offloading_activations")
    cpu_offloading_weights: bool = _key("model", "cpu_offloading_weights")
    cpu_offloading_double_buffering: bool = _key("model", "cpu_offloading_double_buffering")
    cpu_offloading_retain_pinned_cpu_buffers: bool = _key("model", "cpu_offloading_retain_pinned_cpu_buffers")
    cpu_offloading_min_offload_bytes: int = _key("model", "cpu_offloading_min_offload_bytes")
    cpu_offloading_prefetch_depth: int = _key("model", "cpu_offloading_prefetch_depth")

    @property
    def enabled(self):
        """The switch is on and there is something to move (num_layers 0 is allowed, with a warning)."""
        return self.cpu_offloading and (self.cpu_offloading_activations or self.cpu_offloading_weights)


@dataclass(frozen=True)
class OptimizerOffloadConfig:
    """`cpu_offloading.optimizer`: the fraction of the Adam work held and stepped on the CPU."""
    optimizer_cpu_offload: bool = _key("optimizer", "optimizer_cpu_offload")
    optimizer_offload_fraction: float = _key("optimizer", "optimizer_offload_fraction")
    overlap_cpu_optimizer_d2h_h2d: bool = _key("optimizer", "overlap_cpu_optimizer_d2h_h2d")
    use_torch_optimizer_for_cpu_offload: bool = _key("optimizer", "use_torch_optimizer_for_cpu_offload")
    pin_cpu_grads: bool = _key("optimizer", "pin_cpu_grads")
    pin_cpu_params: bool = _key("optimizer", "pin_cpu_params")

    @property
    def enabled(self):
        return bool(self.optimizer_cpu_offload)


_document(ModelOffloadConfig, "model")
_document(OptimizerOffloadConfig, "optimizer")


def freeze(value):
    """A read-only deep view: dicts become mapping proxies, lists tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return copy.deepcopy(value)


def thaw(value):
    """A fresh, mutable deep copy of a frozen view (plain dicts and lists, as DeepSpeed wants them)."""
    if isinstance(value, Mapping):
        return {k: thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return copy.deepcopy(value)


@dataclass(frozen=True)
class OffloadConfig:
    """A whole config as `load_config` returns it: the typed block and DeepSpeed's own part, read-only."""
    model: ModelOffloadConfig = field(default_factory=ModelOffloadConfig)
    optimizer: OptimizerOffloadConfig = field(default_factory=OptimizerOffloadConfig)
    # DeepSpeed's config without the block and without "$schema", as a read-only mapping
    deepspeed: Mapping = field(default_factory=lambda: MappingProxyType({}))
    source: Optional[str] = field(default=None, compare=False)  # the file it was read from, None for a dict

    @classmethod
    def from_parts(cls, block, deepspeed, source=None):
        """From a block already checked against the schema (missing keys take their defaults)."""
        block = block or {}
        return cls(model=ModelOffloadConfig(**(block.get("model") or {})),
                   optimizer=OptimizerOffloadConfig(**(block.get("optimizer") or {})),
                   deepspeed=freeze({k: v for k, v in deepspeed.items() if k not in (BLOCK, "$schema")}),
                   source=source)

    def block(self):
        """The block with every key present, as JSON: what the run acts on is what the user can read."""
        return {"model": asdict(self.model), "optimizer": asdict(self.optimizer)}

    def deepspeed_config(self):
        """A fresh dict for `deepspeed.initialize` (DeepSpeed writes into the config it is given)."""
        return thaw(self.deepspeed)

    def to_dict(self):
        """DeepSpeed's config with the filled block: the resolved config a run can be reproduced from."""
        return {**self.deepspeed_config(), BLOCK: self.block()}
