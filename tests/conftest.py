"""Test setup: one-process DeepSpeed on whatever accelerator is present, GPU tests skipped without CUDA."""
import pytest
import torch

from ds_offload.single_process import ensure_single_process_env

ensure_single_process_env()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def dist():
    """A one-rank process group (gloo on CPU, nccl on GPU) shared by every engine test."""
    import deepspeed
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    yield


@pytest.fixture
def live_tensors():
    """A function counting the torch tensors alive after a collection: a graph that outlives its forward shows."""
    import gc

    def count():
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))
    return count
