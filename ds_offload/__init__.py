"""ds_offload: Megatron-Bridge-style CPU offloading for DeepSpeed users.

Public names are imported lazily so `import ds_offload` (and `ds-offload validate`) stays fast and never
imports DeepSpeed or touches a GPU until a feature is used.
"""
from importlib import import_module

from .config import ModelOffloadConfig, OffloadConfig, OptimizerOffloadConfig, check_config, load_config
from .errors import ConfigError

_LAZY = {
    "initialize": "engine",
    "find_layers": "layers",
    "HybridDeviceOptimizer": "optimizer",
    "ActivationOffloader": "activations",
    "estimate_offloading_memory_savings": "memory",
    "install_layer_offload": "activations",
    "add_config_arguments": "arguments",
    "patch_deepspeed_initialize": "integrations",
}

__all__ = ["ConfigError", "OffloadConfig", "ModelOffloadConfig", "OptimizerOffloadConfig", "load_config",
           "check_config", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ds_offload' has no attribute '{name}'")
