"""Weight offloading of the first N layers (offload.py) and its checks before the engine exists (plan.py)."""
from .offload import WeightOffload
from .plan import WeightPlan, check_host_memory

__all__ = ["WeightOffload", "WeightPlan", "check_host_memory"]
