"""`patch_deepspeed_initialize`: the `cpu_offloading` block for transformers' Trainer and for accelerate.

Both reach DeepSpeed through `accelerate.Accelerator._prepare_deepspeed`, which looks `deepspeed.initialize` up
when it runs and passes the config as `config_params` (the JSON's `optimizer` section gives DeepSpeed the
optimizer; `Trainer.create_optimizer()` gives it a torch AdamW). While the context is active,
`deepspeed.initialize` is `ds_offload.initialize`; on exit the original is back, and code that does not opt in
never sees a change.
"""
import contextlib
import threading

_LOCK = threading.Lock()


@contextlib.contextmanager
def patch_deepspeed_initialize():
    """Route `deepspeed.initialize` through `ds_offload.initialize` while the block runs.

        with ds_offload.patch_deepspeed_initialize():
            trainer.train()
    """
    import deepspeed

    from .engine import initialize as ds_offload_initialize

    if getattr(deepspeed.initialize, "_ds_offload", False):  # already routed by an outer context
        yield
        return
    with _LOCK:
        original = deepspeed.initialize

        def initialize(args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
                       lr_scheduler=None, config=None, config_params=None, **kwargs):
            return ds_offload_initialize(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                                         training_data=training_data, lr_scheduler=lr_scheduler,
                                         config=config if config is not None else config_params,
                                         _deepspeed_initialize=original, **kwargs)

        initialize.__doc__ = f"ds_offload.initialize in place of deepspeed.initialize.\n\n{original.__doc__ or ''}"
        initialize.__wrapped__ = original
        initialize._ds_offload = True
        deepspeed.initialize = initialize
    try:
        yield
    finally:
        with _LOCK:
            deepspeed.initialize = original
