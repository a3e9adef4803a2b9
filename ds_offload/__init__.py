"""ds_offload: Megatron-Bridge-style CPU offloading for DeepSpeed users."""
from .errors import ConfigError

__all__ = ["ConfigError"]
