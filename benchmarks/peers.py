"""Peer implementations measured beside ours, on the same model, batch, seed and hyper-parameters."""

import torch

import harness as H


def wrap_save_on_cpu(model, n):
    """torch.autograd.graph.save_on_cpu(pin_memory=True) around the forward of the model's first n layers."""
    pin = torch.cuda.is_available()
    for blk in list(H.layers_of(model))[:n]:
        orig = blk.forward

        def fwd(*a, _orig=orig, **k):
            with torch.autograd.graph.save_on_cpu(pin_memory=pin):
                return _orig(*a, **k)
        blk.forward = fwd


def save_on_cpu(shape, warm, steps, n):
    """torch's save_on_cpu around the first n layers, in a plain loop."""
    m = H.build_model(shape)
    wrap_save_on_cpu(m, n)
    opt = torch.optim.AdamW(m.parameters(), lr=H.LR, weight_decay=H.WD, betas=H.BETAS, eps=H.EPS,
                            fused=torch.cuda.is_available())
    idx, tgt = H.batch(shape)
    return H.measure(H.torch_train_step(m, opt, idx, tgt), shape, warm, steps, extra=dict(n=n))


MEGATRON_HDO = "megatron/core/optimizer/cpu_offloading/hybrid_optimizer.py"


def megatron_hdo(shape, warm, steps, f, overlap=True, fix_stream=False):
    """megatron-core 0.19.2's HybridDeviceOptimizer, loaded by path from the installed wheel (the module
    imports only torch), in its precision-aware mode: bf16 parameters, fp32 master (param_update_in_fp32)."""
    path = H.find_in_site(MEGATRON_HDO)
    if path is None:
        raise FileNotFoundError(f"{MEGATRON_HDO} not found on sys.path (install megatron-core 0.19.2)")
    mod = H.load_module_by_path("mc_hybrid_optimizer", path)
    m = H.build_model(shape, torch.bfloat16)
    opt = mod.HybridDeviceOptimizer(list(m.parameters()), offload_fraction=f, cpu_optimizer_cls=torch.optim.AdamW,
                                    gpu_optimizer_cls=torch.optim.AdamW, param_update_in_fp32=True,
                                    overlap_cpu_optimizer_d2h_h2d=overlap, lr=H.LR, weight_decay=H.WD,
                                    betas=H.BETAS, eps=H.EPS, fused=True)
    if fix_stream and opt.gpu_optimizer is not None:
        # Its step() converts the GPU part's bf16 grads to the fp32 masters' .grad on the side stream
        # _d2h_stream, then steps the GPU optimizer on the current stream without waiting for that stream.
        # The fix under test: make the current stream wait for the side stream first.
        gpu_step = opt.gpu_optimizer.step

        def step_after_d2h(*a, **k):
            torch.cuda.current_stream().wait_stream(opt._d2h_stream)
            return gpu_step(*a, **k)
        opt.gpu_optimizer.step = step_after_d2h
    idx, tgt = H.batch(shape)
    return H.measure(H.torch_train_step(m, opt, idx, tgt, use_autocast=False), shape, warm, steps,
                     extra=dict(fraction=f, overlap=overlap, fix_stream=fix_stream, source=path))


def torchao_offload(shape, warm, steps):
    try:
        from torchao.optim import CPUOffloadOptimizer
    except ImportError:
        from torchao.prototype.low_bit_optim import CPUOffloadOptimizer
    import torchao
    m = H.build_model(shape)
    opt = CPUOffloadOptimizer(m.parameters(), torch.optim.AdamW, offload_gradients=True, lr=H.LR,
                              weight_decay=H.WD, betas=H.BETAS, eps=H.EPS)
    idx, tgt = H.batch(shape)
    return H.measure(H.torch_train_step(m, opt, idx, tgt), shape, warm, steps,
                     extra=dict(torchao=torchao.__version__))


def deepspeed_zero(shape, warm, steps, stage, ratio=None, sub_group_size=None):
    import deepspeed
    H.init_dist_env()
    deepspeed.init_distributed(verbose=False)
    off = {"device": "cpu", "pin_memory": True}
    if ratio is not None:
        off["ratio"] = ratio
    zero = {"stage": stage, "offload_optimizer": off}
    if sub_group_size:
        zero["sub_group_size"] = int(sub_group_size)
    return H.deepspeed_engine_case(deepspeed.initialize, shape, warm, steps, zero, wall_clock_breakdown=False,
                                   extra=dict(zero=zero, deepspeed=deepspeed.__version__))


# ---------------------------------------------------------------------------------------------- engine-path peers
# Each runs plain DeepSpeed (bf16, the stage given, clipping 1.0) with the peer's own mechanism, so that it
# compares with ds_offload.initialize of the same config.


def _engine_peer(shape, warm, steps, stage, zero=None, prepare=None, **extra):
    import deepspeed
    H.init_dist_env()
    z = {"stage": stage, **(zero or {})}
    return H.deepspeed_engine_case(deepspeed.initialize, shape, warm, steps, z, prepare=prepare,
                                   gradient_clipping=1.0, extra=dict(stage=stage, zero=z, **extra))


def engine_save_on_cpu(shape, warm, steps, stage, n):
    """torch's save_on_cpu around the first n layers, under plain DeepSpeed."""
    return _engine_peer(shape, warm, steps, stage, prepare=lambda m: wrap_save_on_cpu(m, n), n=n)


def ds_cpu_checkpointing(shape, warm, steps, stage):
    """DeepSpeed's activation checkpointing with checkpoint_in_cpu (`activation_checkpointing.cpu_checkpointing`):
    every layer recomputed in backward, its input kept in CPU memory."""
    import deepspeed

    def prepare(m):
        deepspeed.checkpointing.configure(None, partition_activations=False, checkpoint_in_cpu=True)
        for blk in H.layers_of(m):
            orig = blk.forward
            blk.forward = lambda *a, _orig=orig: deepspeed.checkpointing.checkpoint(_orig, *a)
    return _engine_peer(shape, warm, steps, stage, prepare=prepare, activation_checkpointing="cpu_checkpointing")


def hf_checkpoint_offload(shape, warm, steps, stage):
    """transformers' activation checkpointing with `offload=True` (save_on_cpu around each layer's checkpoint)."""
    import inspect
    import transformers

    def prepare(m):
        fn = getattr(m, "activation_checkpointing_enable", None)
        if fn is None or "offload" not in inspect.signature(fn).parameters:
            raise H.Skip(f"transformers {transformers.__version__} has no activation checkpointing offload "
                         "(activation_checkpointing_enable(offload=True))")
        fn(offload=True)
    return _engine_peer(shape, warm, steps, stage, prepare=prepare, transformers=transformers.__version__)


def ds_offload_optimizer(shape, warm, steps, stage):
    """DeepSpeed's own ZeRO-1/2 optimizer offload: every optimizer state on the CPU, stepped by its CPU Adam."""
    import deepspeed
    return _engine_peer(shape, warm, steps, stage, zero={"offload_optimizer": {"device": "cpu", "pin_memory": True}},
                        deepspeed=deepspeed.__version__)


ZENFLOW = {"topk_ratio": 0.1, "select_strategy": "step", "select_interval": 10, "update_interval": 4,
           "overlap_step": True, "full_warm_up_rounds": 0}


def ds_zenflow(shape, warm, steps, stage):
    """DeepSpeed ZenFlow on top of ZeRO-2 optimizer offload: the top-k gradient columns are stepped on the GPU
    every step, the rest accumulate and are stepped on the CPU every `update_interval` steps (stale updates:
    not the same training as Adam)."""
    import deepspeed
    return _engine_peer(shape, warm, steps, stage,
                        zero={"offload_optimizer": {"device": "cpu", "pin_memory": True}, "zenflow": dict(ZENFLOW)},
                        deepspeed=deepspeed.__version__, stale_updates=True)
