"""DeepSpeed's CPU Adam op, built with a binding that releases the GIL during a step.

DeepSpeed's own binding (`CPUAdamBuilder`, csrc/adam/cpu_adam.cpp) holds the GIL for the whole update. A step
run in a background thread then stalls every Python hook of the backward beside it: the gradient hooks of
DeepSpeed and ours, the saved-tensor hooks, each waits for the span in progress. That is why the optimizer's
deferred schedule used to step in a worker process. `gil_free_op` compiles DeepSpeed's kernel file
(csrc/adam/cpu_adam_impl.cpp) unchanged, with its builder's flags, beside `csrc/cpu_adam_gil_free.cpp` (three
bindings, the update with `gil_scoped_release`): the same arithmetic, bit for bit, and a thread overlaps.

Where it cannot be built (a DeepSpeed whose kernel file or signatures differ, no compiler), `load` falls back to
DeepSpeed's op, once, with a warning that says what overlaps less.
"""
import functools
import os
import warnings

_BINDING = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "cpu_adam_gil_free.cpp")


def builder():
    from deepspeed.ops.op_builder import CPUAdamBuilder

    class GilFreeCPUAdamBuilder(CPUAdamBuilder):
        """DeepSpeed's CPU Adam builder (flags, SIMD detection, include paths) with our binding file."""
        NAME = "ds_offload_cpu_adam"

        def absolute_name(self):
            return f"ds_offload.{self.NAME}_op"

        def sources(self):
            return [_BINDING] + [s for s in super().sources() if not s.endswith("adam/cpu_adam.cpp")]

    return GilFreeCPUAdamBuilder()


def deepspeed_op():
    """DeepSpeed's own CPU Adam op (its binding holds the GIL)."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    return CPUAdamBuilder().load()


@functools.lru_cache(maxsize=1)
def gil_free_op():
    """The GIL-free build, or None (with one warning) where it cannot be built."""
    if os.environ.get("DS_OFFLOAD_GIL_FREE_ADAM", "1") == "0":
        return None
    try:
        op = builder().load(verbose=False)
        if not hasattr(op, "adam_update"):
            raise RuntimeError("the built module has no adam_update")
        return op
    except Exception as e:  # a build failure must not stop training: DeepSpeed's op does the same arithmetic
        warnings.warn(f"ds_offload could not build DeepSpeed's CPU Adam kernel with a GIL-free binding ({e!s:.300}); "
                      "using DeepSpeed's op, whose steps hold the GIL: a CPU step that overlaps the training "
                      "thread runs in a worker process instead (set DS_OFFLOAD_GIL_FREE_ADAM=0 to skip the build)")
        return None


def load():
    """The GIL-free build where it exists, else DeepSpeed's op."""
    op = gil_free_op()
    return op if op is not None else deepspeed_op()
