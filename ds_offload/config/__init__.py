"""The `cpu_offloading` block: its schema, its typed form, and the checks that run before DeepSpeed does."""
from .check import check_config, load_config, read_json
from .rules import (DEEPSPEED_TOP_LEVEL_KEYS, SUPPORTED_OPTIMIZERS, bf16_optimizer_runs, cuda_graphs_source,
                    fused_optimizer_runs)
from .settings import BLOCK, ModelOffloadConfig, OffloadConfig, OptimizerOffloadConfig, load_schema

__all__ = ["BLOCK", "DEEPSPEED_TOP_LEVEL_KEYS", "SUPPORTED_OPTIMIZERS", "bf16_optimizer_runs", "ModelOffloadConfig", "OffloadConfig",
           "OptimizerOffloadConfig", "check_config", "cuda_graphs_source", "fused_optimizer_runs", "load_config", "load_schema", "read_json"]
