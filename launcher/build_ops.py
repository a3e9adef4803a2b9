"""`ds-offload build-ops`: compile DeepSpeed's CPU Adam op now instead of on first use."""
import os
import time

import click

from . import CONTEXT

OPS = {"cpu_adam": "CPUAdamBuilder", "cpu_adagrad": "CPUAdagradBuilder"}


def op_cache_dir(name):
    """Where torch's JIT extension loader keeps the built op (TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory
        return _get_build_directory(name, verbose=False)
    except Exception:
        return None


def build_op(name, verbose=False, echo=click.echo):
    """Build (or load from the cache) one DeepSpeed op, saying what happens; returns seconds taken."""
    import deepspeed.ops.op_builder as ob
    builder = getattr(ob, OPS[name])()
    where = op_cache_dir(name)
    if not builder.is_compatible(verbose=True):
        raise click.ClickException(f"DeepSpeed says {name} cannot be built here (see the messages above).")
    echo(f"{name}: compiling DeepSpeed's C++ {name} kernel (SIMD, OpenMP) with the system compiler and ninja; "
         f"the result is cached in {where} and reused by every later run (otherwise this happens on first use: "
         "~60 s on 2 cores, ~40 s on 16)...")
    t0 = time.perf_counter()
    builder.load(verbose=verbose)
    secs = time.perf_counter() - t0
    echo(f"{name}: ready in {secs:.1f} s" + (" (it was already built)" if secs < 5 else ""))
    return secs


@click.command("build-ops", context_settings=CONTEXT)
@click.option("--op", "ops", type=click.Choice(sorted(OPS)), multiple=True, default=["cpu_adam"], show_default=True,
              help="Op to build; repeat for several.")
@click.option("--verbose", is_flag=True, help="Show the compiler's output.")
def build_ops(ops, verbose):
    """Prebuild DeepSpeed's CPU Adam op, which the hybrid optimizer uses for the CPU share.

    DeepSpeed compiles it just in time on first use, which stalls the first training step for about a
    minute; building it here once (per machine, Python and torch version) removes that stall. Set
    TORCH_EXTENSIONS_DIR to put the cache on a shared filesystem for multi-node runs.
    """
    os.environ.setdefault("MAX_JOBS", str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                          else os.cpu_count() or 1))
    for name in ops:
        build_op(name, verbose=verbose)
