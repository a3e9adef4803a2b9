"""The activation-offload savings estimator (`ds_offload.memory.savings`)."""
import math

import pytest

from ds_offload.memory.savings import estimate_offloading_memory_savings


def test_estimator_reference_numbers():
    assert estimate_offloading_memory_savings(8000, 0.5) == {
        "gpu_memory_mb": 4000.0, "gpu_savings_mb": 4000.0, "cpu_usage_mb": 4000.0, "savings_percent": 50.0}
    assert estimate_offloading_memory_savings(1000, 0.0)["gpu_memory_mb"] == 1000.0
    assert estimate_offloading_memory_savings(1000, 1)["savings_percent"] == 100.0


@pytest.mark.parametrize("args,exc,text", [
    ((8000, 1.5), ValueError, "offload_ratio must be in [0.0, 1.0]"),
    ((8000, -0.1), ValueError, "offload_ratio"),
    ((-1, 0.5), ValueError, "activation_memory_gpu_mb must be >= 0"),
    (("8000", 0.5), TypeError, "activation_memory_gpu_mb must be a finite number"),
    ((8000, None), TypeError, "offload_ratio must be a finite number"),
    ((math.nan, 0.5), TypeError, "finite"),
    ((8000, True), TypeError, "offload_ratio"),
])
def test_estimator_input_errors(args, exc, text):
    with pytest.raises(exc) as err:
        estimate_offloading_memory_savings(*args)
    assert text in str(err.value)
