"""Planning arithmetic for activation offload: what offloading a share of the activations saves."""
import math

__all__ = ["estimate_offloading_memory_savings"]


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def estimate_offloading_memory_savings(activation_memory_gpu_mb, offload_ratio):
    """What offloading `offload_ratio` of `activation_memory_gpu_mb` activations leaves on the GPU.

    A planning aid: it assumes the offloaded share leaves the GPU entirely and lands in host memory
    one for one (pinned buffers are exactly sized), which is what `ds_offload.activations` does.
    """
    if not _is_number(activation_memory_gpu_mb):
        raise TypeError(f"activation_memory_gpu_mb must be a finite number, got {activation_memory_gpu_mb!r}")
    if not _is_number(offload_ratio):
        raise TypeError(f"offload_ratio must be a finite number, got {offload_ratio!r}")
    if activation_memory_gpu_mb < 0:
        raise ValueError(f"activation_memory_gpu_mb must be >= 0, got {activation_memory_gpu_mb}")
    if not 0.0 <= offload_ratio <= 1.0:
        raise ValueError(f"offload_ratio must be in [0.0, 1.0], got {offload_ratio}")
    saved = float(activation_memory_gpu_mb) * offload_ratio
    return {"gpu_memory_mb": float(activation_memory_gpu_mb) - saved, "gpu_savings_mb": saved,
            "cpu_usage_mb": saved, "savings_percent": float(offload_ratio) * 100.0}
