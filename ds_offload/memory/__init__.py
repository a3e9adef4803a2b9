"""Memory of a training run per rank, with and without offloading: the model's shape (`model_spec`), the
memory model (`estimate`), and the savings of an activation offloader (`savings`)."""
from .footprint import (LOOPS, PRECISIONS, Estimate, GiB, Memory, MiB, estimate, head_activation_bytes,
                       layer_activation_bytes, precision_of)
from .model_spec import ModelSpec, parse_model, spec_from_gpt, spec_from_hf_config, spec_from_kv
from .savings import estimate_offloading_memory_savings

__all__ = ["GiB", "LOOPS", "MiB", "PRECISIONS", "Estimate", "Memory", "ModelSpec", "estimate",
           "estimate_offloading_memory_savings", "head_activation_bytes", "layer_activation_bytes", "parse_model",
           "precision_of", "spec_from_gpt", "spec_from_hf_config", "spec_from_kv"]
