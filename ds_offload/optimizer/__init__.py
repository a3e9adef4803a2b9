"""The hybrid CPU/GPU Adam(W): ``hybrid`` (the optimizer), ``layout`` (the split and its buffers), ``state``
(state dicts), ``transfers`` (D2H/H2D and the CPU step's scheduling), ``cpu_adam`` (the CPU kernels),
``from_config`` (built from a DeepSpeed config)."""
from .from_config import prepare_hybrid_optimizer
from .hybrid import HybridDeviceOptimizer

__all__ = ["HybridDeviceOptimizer", "prepare_hybrid_optimizer"]
