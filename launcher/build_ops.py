"""`ds-offload build-ops`: compile DeepSpeed's CPU Adam op (and ds_offload's GIL-free build of its kernel) now
instead of on first use."""
import os
import time

import click

from . import CONTEXT

OPS = {"cpu_adam": "CPUAdamBuilder", "cpu_adagrad": "CPUAdagradBuilder", "fused_adam": "FusedAdamBuilder",
       "cpu_adam_gil_free": None}  # None => ds_offload.optimizer.ds_op's builder (DeepSpeed's kernel, our binding)
CACHE_NAMES = {"cpu_adam_gil_free": "ds_offload_cpu_adam"}  # name => the JIT cache's name, where they differ


def _builder(name):
    if OPS[name] is None:
        from ds_offload.optimizer import ds_op
        return ds_op.builder()
    import deepspeed.ops.op_builder as ob
    return getattr(ob, OPS[name])()


def fix_cuda_arch_list(echo=click.echo):
    """DeepSpeed 0.19 parses torch's CUDA arch list as numbers, and torch 2.11 (CUDA 13) lists `sm_90a`: its JIT
    builds then fail with "invalid literal for int() with base 10: '0a'" (pytorch issue 144037). Without a
    TORCH_CUDA_ARCH_LIST of the user's, set it to this GPU's compute capability for the builds started here."""
    import torch
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or not torch.cuda.is_available():
        return None
    if not any(a[-1:].isalpha() for a in torch.cuda.get_arch_list()):  # sm_90a, sm_100f, ...
        return None
    major, minor = torch.cuda.get_device_capability()
    value = f"{major}.{minor}"
    os.environ["TORCH_CUDA_ARCH_LIST"] = value
    echo(f"TORCH_CUDA_ARCH_LIST={value} set for these builds: torch lists arch-specific targets "
         f"({', '.join(torch.cuda.get_arch_list())}) that DeepSpeed 0.19's JIT build cannot parse. For builds inside "
         f"your own runs, export TORCH_CUDA_ARCH_LIST={value} too.")
    return value


def is_built(name):
    name = CACHE_NAMES.get(name, name)
    where = op_cache_dir(name)
    return bool(where) and os.path.exists(os.path.join(where, f"{name}.so"))


def op_cache_dir(name):
    """Where torch's JIT extension loader keeps the built op (TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory
        return _get_build_directory(name, verbose=False)
    except Exception:
        return None


def build_op(name, verbose=False, echo=click.echo):
    """Build (or load from the cache) one DeepSpeed op, saying what happens; returns seconds taken."""
    builder = _builder(name)
    where = op_cache_dir(CACHE_NAMES.get(name, name))
    if not builder.is_compatible(verbose=True):
        raise click.ClickException(f"DeepSpeed says {name} cannot be built here (see the messages above).")
    if is_built(name):
        echo(f"{name}: already built in {where}; loading it")
    else:
        echo(f"{name}: compiling DeepSpeed's {name} kernel with the system compiler and ninja; the result is "
             f"cached in {where} and reused by every later run (otherwise this happens on first use: ~60-100 s on "
             "2 cores, ~40 s on 16)...")
    t0 = time.perf_counter()
    builder.load(verbose=verbose)
    secs = time.perf_counter() - t0
    echo(f"{name}: ready in {secs:.1f} s")
    return secs


@click.command("build-ops", context_settings=CONTEXT)
@click.option("--op", "ops", type=click.Choice(sorted(OPS)), multiple=True,
              default=["cpu_adam", "cpu_adam_gil_free"], show_default=True, help="Op to build; repeat for several.")
@click.option("--verbose", is_flag=True, help="Show the compiler's output.")
def build_ops(ops, verbose):
    """Prebuild DeepSpeed's CPU Adam op, which the hybrid optimizer uses for the CPU share.

    `cpu_adam_gil_free` is the same kernel with a binding that releases the GIL, which ds_offload steps with
    (`cpu_adam`, DeepSpeed's own, is its fallback). Both compile just in time on first use, which stalls the
    first training step for about a minute each; building them here once (per machine, Python and torch
    version) removes that stall. Set TORCH_EXTENSIONS_DIR to put the cache on a shared filesystem for multi-node runs.
    """
    os.environ.setdefault("MAX_JOBS", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                          else os.cpu_count() or 1))
    fix_cuda_arch_list()
    for name in ops:
        build_op(name, verbose=verbose)
