"""The optimizer offload inside DeepSpeed's FP16_Optimizer (ZeRO-0 with bf16 or fp16): each group's flat fp32
masters cut in two.

Why a subclass: under ZeRO-0 with bf16 or fp16, DeepSpeed wraps the config's Adam/AdamW (its FusedAdam) in
FP16_Optimizer, which keeps one flat fp32 copy of each param group on the GPU and reads it right after
`step()`; handed to it as a client optimizer, the hybrid could free only the moments of its share (8 bytes per
element). Here FP16_Optimizer is kept and each flat fp32 group is cut at element `P - c`, as zero.py cuts a
ZeRO partition: the GPU keeps the head, stepped by FusedAdam as before; the tail's fp32 master, both moments
and an fp32 gradient buffer live in CPU memory and are stepped by DeepSpeed's CPU Adam op (12 bytes freed per
offloaded element). The overflow check, the global norm, clipping and loss scaling are FP16_Optimizer's,
computed over the whole group before the cut acts, so the numbers are plain DeepSpeed's.

ZeRO-0 replicates the model on every rank and DeepSpeed all-reduces the gradients before `step()`, and nothing
reads the weights between `step()` and the next forward; so with `overlap_cpu_optimizer_d2h_h2d` the deferred
schedule of tail_steps.py applies with any number of ranks. Checkpoints hold whole flat groups and whole
moments (DeepSpeed's layout): they load with or without the block, and with another fraction.
"""
import contextlib
import math

import torch
from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
from deepspeed.runtime.utils import get_flattened_grad_norm, get_global_norm, is_invalid_grad_norm
from torch._utils import _flatten_dense_tensors

from ..errors import ConfigError
from . import cut
from .cpu_adam import CpuAdamBackend, fit_worker_mode_to_shared_memory, pick_worker_mode
from .layout import unregister_host_buffers
from .tail_steps import CpuTail, TailSteps, chunk_keys_of_params, install_waits

_WEIGHTS_KEY = "ds_offload_weights"  # the optimizer state of the offloaded layers, in the optimizer's state dict


def _refuse(key, why):
    raise ConfigError([(key, why)])


class HybridFusedOptimizer(FP16_Optimizer):
    """DeepSpeed's FP16_Optimizer with the last `optimizer_offload_fraction` of each flat group on the CPU."""

    offload = None  # the OptimizerOffloadConfig, set by `fused_optimizer_class`
    weights = None  # the WeightOffload of the first layers, or None, set by `fused_optimizer_class`

    def __init__(self, init_optimizer, *args, **kwargs):
        super().__init__(init_optimizer, *args, **kwargs)  # its zero-gradient warm-up step runs on whole groups
        if self.fused_adam_legacy:
            _refuse("optimizer.legacy_fusion", "the legacy fused step bypasses the cut. Fix: remove legacy_fusion.")
        if self.has_moe_layers:
            _refuse("cpu_offloading.optimizer.optimizer_cpu_offload", "MoE layers under ZeRO-0 are not supported "
                    "with the optimizer offload. Fix: use ZeRO stage 1 or 2.")
        if any(not g.get("bias_correction", True) for g in self.optimizer.param_groups):
            _refuse("optimizer.params.bias_correction", "the CPU Adam op always corrects the bias. Fix: remove "
                    "bias_correction: false.")
        o, w = self.offload, self.weights
        self.adamw_mode = bool(getattr(self.optimizer, "adam_w_mode", True))
        cuda = torch.cuda.is_available()
        sizes = [flat.numel() for flat in self.fp32_groups_flat]
        fraction = o.optimizer_offload_fraction if o.optimizer_cpu_offload else 0.0  # weights alone: no cut
        cuts = [int(round(fraction * n)) for n in sizes]
        deferred = o.overlap_cpu_optimizer_d2h_h2d and any(cuts)
        # The offloaded layers' CPU steps during backward (weights/speculate.py): no loss scaling, decoupled decay.
        layer_steps = (w is not None and o.overlap_cpu_optimizer_d2h_h2d and not self.loss_scale_config.use_grad_scaling
                       and cut.decoupled(self.adamw_mode, self.optimizer.param_groups))
        # overlap for pick_worker_mode is `deferred` alone: the layers' steps need no worker (its docstring)
        mode = pick_worker_mode(None, cuda, deferred, o.use_torch_optimizer_for_cpu_offload)
        mode = fit_worker_mode_to_shared_memory(mode, sum(cuts) + (w.numel if w is not None else 0))
        self.backend = CpuAdamBackend(o.use_torch_optimizer_for_cpu_offload, self.adamw_mode,
                                      use_process=mode == "process")
        shared = CpuAdamBackend.wants_shared_memory(o.use_torch_optimizer_for_cpu_offload, mode == "process")
        self.tails = []  # tails => per param group, its CpuTail, or None when nothing of it is offloaded
        for i, (size, c) in enumerate(zip(sizes, cuts)):
            if c == 0:
                self.tails.append(None)
                continue
            flat = self.fp32_groups_flat[i]
            tail = CpuTail(size - c, c, cuda and o.pin_cpu_params, cuda and o.pin_cpu_grads, shared)
            tail.master.copy_(flat.detach()[size - c:])
            st = self.optimizer.state.pop(flat, {})  # after the warm-up step: its count and (zero) moments
            tail.step = int(st.get("step", 0))
            head = flat.detach()[:size - c].clone()
            head.requires_grad = True
            kept = {"step": st["step"]} if "step" in st else {}
            for key in cut.MOMENTS:
                if key in st:
                    getattr(tail, key).copy_(st[key][size - c:])
                    kept[key] = st[key][:size - c].clone()
            if head.numel() and kept:
                self.optimizer.state[head] = kept
            self.fp32_groups_flat[i] = head
            self.optimizer.param_groups[i]["params"] = [head]
            self.backend.register((tail.master, tail.grad, tail.exp_avg, tail.exp_avg_sq))
            self.tails.append(tail)
            del flat, st, kept
        self.tail_steps = TailSteps(self.backend, deferred, cuda)
        self._hook_handles = []  # _hook_handles => forward and (load_)state_dict pre-hooks from attach()
        if w is not None:
            w.allocate(shared, o.pin_cpu_params, self.deepspeed.seq_data_parallel_group)
            w.register(self.backend)
            w.tail_steps = self.tail_steps
            w.boundary = self.deepspeed.is_gradient_accumulation_boundary
            if layer_steps:
                w.speculate(self.optimizer.param_groups, o.use_torch_optimizer_for_cpu_offload)
            elif o.overlap_cpu_optimizer_d2h_h2d and not any(cuts) and torch.distributed.get_rank() == 0:
                cut.warn_overlap_does_nothing()
        if any(self.tails) or w is not None:
            self.backend.start()
        if w is not None:
            self._warm_up_weights(w)

    def _warm_up_weights(self, w):
        """FP16_Optimizer's zero-gradient warm-up step (DeepSpeed takes it at set-up) for the offloaded layers
        too, as plain DeepSpeed takes it for them: it counts one step and applies weight decay to the fp32
        masters, not to the working weights."""
        for bucket_id, layer, _lp, runs_of, _chunks, _scale in w.jobs(self.optimizer.param_groups, 1.0):
            layer.grad.zero_()
            self.backend.run(bucket_id, runs_of(0, layer.numel))

    # ------------------------------------------------------------------------------------------ step
    def step(self, closure=None):
        w = self.weights
        if not any(self.tails) and w is None:
            return super().step(closure)
        self.tail_steps.land()
        w_sq = w.finish_backward() if w is not None else 0.0  # the offloaded layers' share of the norm
        self.overflow = self.overflow_checker.has_overflow([p for g in self.fp16_groups for p in g
                                                            if p.grad is not None]) or not math.isfinite(w_sq)
        if self.overflow:  # the whole step is skipped, every part: DeepSpeed's rule
            return self._skip(w)
        grads, holders = [], []  # holders => detached aliases whose .grad is a group's flat gradient (for the norm)
        for group in self.fp16_groups:
            flat = _flatten_dense_tensors([torch.zeros(p.size(), dtype=torch.float32, device=p.device)
                                           if p.grad is None else p.grad.to(torch.float32) for p in group])
            if not self.has_executed_step:
                self.flatten_grad_norm_mask_list.append(self._get_norm_mask_idx(group))
            for p in group:
                p.grad = None
            holder = flat.detach()
            holder.grad = flat
            grads.append(flat)
            holders.append(holder)
        norm = get_global_norm(norm_list=[get_flattened_grad_norm(holders, mpu=self.mpu,
                                                                  grad_norm_mask=self.flatten_grad_norm_mask_list)])
        del holders
        if is_invalid_grad_norm(norm):
            return self._skip(w)
        if w is not None:
            norm = math.sqrt(norm ** 2 + w_sq)
        if self.loss_scale_config.use_grad_scaling:
            self._update_scale(False)
        self._global_grad_norm = norm / self.loss_scale_config.cur_scale
        inverse = float(1. / self.unscale_and_clip_grads(grads, norm, apply_scale=False))
        # The offloaded layers first: they are the first the next forward needs.
        jobs = w.jobs(self.optimizer.param_groups, inverse) if w is not None else []
        for i, (head, tail, flat) in enumerate(zip(self.fp32_groups_flat, self.tails, grads)):
            cut = head.numel()
            if tail is not None:  # its gradient leaves first, then the GPU head steps while it crosses
                chunks = self.tail_steps.send_grads(tail, flat[cut:], inverse)
                g = self.optimizer.param_groups[i]
                beta1, beta2 = g["betas"]
                hyper = (tail.step, float(g["lr"]), float(beta1), float(beta2), float(g["eps"]),
                         float(g["weight_decay"]))
                tail.step += 1
                jobs.append((self._tail_id(i), tail, self.fp16_groups_flat[i][cut:],
                             lambda a, b, hyper=hyper: [(a, b, *hyper)], chunks, 1.0))
            head.grad = flat[:cut].mul_(inverse) if cut else None
        del grads, flat
        self.optimizer.step()
        for i, head in enumerate(self.fp32_groups_flat):
            head.grad = None
            if head.numel():
                self.fp16_groups_flat[i][:head.numel()].copy_(head.detach())
        self.tail_steps.start(jobs)
        self.has_executed_step = True
        return self.overflow

    def _skip(self, w):
        if w is not None:
            w.discard_grads()
        return self._skip_invalid_grad_norm()

    def _tail_id(self, i):
        """The backend's bucket id of group `i`'s tail (tails were registered in group order, before layers)."""
        return sum(1 for t in self.tails[:i] if t is not None)

    def refresh_fp32_params(self):
        """The masters from the model's low-precision weights (after a module-only checkpoint load)."""
        self.tail_steps.land()
        if self.weights is not None:
            self.weights.refresh_masters()
        for head, tail, lp in zip(self.fp32_groups_flat, self.tails, self.fp16_groups_flat):
            head.data.copy_(lp[:head.numel()])
            if tail is not None:
                tail.master.copy_(lp[tail.start:])

    # ---------------------------------------------------------------------------------- checkpoints
    @contextlib.contextmanager
    def _whole_groups(self):
        """Swap in whole flat fp32 groups and whole optimizer state (CPU tensors), in DeepSpeed's layout."""
        heads = self.fp32_groups_flat
        with cut.whole_state(self.optimizer, heads, self.tails) as wholes:
            self.fp32_groups_flat = wholes  # a new list: the state dict keeps it, the optimizer gets `heads` back
            try:
                yield heads
            finally:
                self.fp32_groups_flat = heads

    def state_dict(self):
        self.tail_steps.land()
        with self._whole_groups():
            sd = super().state_dict()
        if self.weights is not None:
            sd[_WEIGHTS_KEY] = self.weights.state_dict()
        return sd

    def load_state_dict(self, state_dict, load_optimizer_states=True):
        self.tail_steps.land()
        weights_sd = state_dict.get(_WEIGHTS_KEY)
        if (self.weights is None) != (weights_sd is None):
            raise ValueError(f"this checkpoint was saved {'without' if weights_sd is None else 'with'} "
                             "cpu_offloading.model.cpu_offloading_weights, and under ZeRO-0 DeepSpeed's fp32 groups "
                             "then hold other parameters. Fix: load it with the same weights offload, or only its "
                             "weights with engine.load_checkpoint(..., load_module_only=True).")
        if self.weights is not None:
            self.weights.load_state_dict(weights_sd)
            state_dict = {k: v for k, v in state_dict.items() if k != _WEIGHTS_KEY}
        with self._whole_groups() as heads:
            super().load_state_dict(state_dict, load_optimizer_states)
            for i, (head, tail) in enumerate(zip(heads, self.tails)):
                if tail is not None:
                    cut.take_apart(self.optimizer, self.fp32_groups_flat[i], head, tail, load_optimizer_states)

    # ------------------------------------------------------------------------------------ the rest
    def split_info(self):
        info = cut.split_info(self.fp32_groups_flat, self.tails, self.offload, self.tail_steps.deferred)
        if self.weights is not None:
            info.update(self.weights.speculation_info())
        return info

    def attach(self, module):
        """With the deferred schedule, make `module`'s forwards wait for the chunks their own parameters are in,
        and any `state_dict()` or `load_state_dict()` of it for everything; returns whether hooks were installed."""
        if not self.tail_steps.deferred or self._hook_handles:
            return bool(self._hook_handles)
        where = {}  # where => id(param) => [(tail id, chunk index)] of the chunks holding its weights
        for i, tail in enumerate(self.tails):
            if tail is not None:
                where.update(chunk_keys_of_params(self.fp16_groups_flat[i], tail, self._tail_id(i),
                                                  self.fp16_groups[i]))
        self._hook_handles += install_waits(module, self.tail_steps, where)
        return True

    def wait(self):
        """Land the last step's CPU share in the model's weights, for reads outside a forward or state_dict."""
        if self.weights is not None:
            self.weights.land()
        self.tail_steps.land()

    def close(self):
        if self.weights is not None:
            self.weights.close()
        for h in self._hook_handles:
            h.remove()
        self._hook_handles = []
        try:
            self.tail_steps.close()
        finally:
            self.backend.close()
            layers = self.weights.layers if self.weights is not None else []
            unregister_host_buffers([t for t in self.tails if t is not None] + layers)


def fused_optimizer_class(settings, weights=None):
    """HybridFusedOptimizer bound to the block's `cpu_offloading.optimizer` settings (and a WeightOffload)."""
    return type("HybridFusedOptimizer", (HybridFusedOptimizer,), {"offload": settings, "weights": weights})


@contextlib.contextmanager
def deepspeed_builds_hybrid_fused(settings, weights=None):
    """While active, DeepSpeed's engine builds its ZeRO-0 FP16_Optimizer (bf16, fp16) as a HybridFusedOptimizer."""
    import deepspeed.runtime.engine as ds_engine
    original = ds_engine.FP16_Optimizer
    ds_engine.FP16_Optimizer = fused_optimizer_class(settings, weights)
    try:
        yield
    finally:
        ds_engine.FP16_Optimizer = original
