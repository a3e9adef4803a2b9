"""The optimizer offload inside DeepSpeed's BF16_Optimizer (bf16 ZeRO-1 with `data_types.grad_accum_dtype` fp32):
each rank's flat fp32 partition cut in two.

Why a subclass: BF16_Optimizer keeps, per param group, the rank's fp32 partition on the GPU and steps it right
after `step()` computed the norm and clipped its fp32 gradient accumulators; handed to it as a client optimizer,
the hybrid could free only the moments of its share. Here the partition is cut at `P - c` as zero.py cuts a ZeRO
partition: the GPU keeps the head, stepped by DeepSpeed's optimizer as before; the tail's fp32 master, both
moments and an fp32 gradient buffer live in CPU memory and are stepped by DeepSpeed's CPU Adam op (12 bytes freed
per offloaded element). The norm and the clipping are BF16_Optimizer's own, applied in place to the whole fp32
accumulators before the tail's part leaves. The accumulators themselves stay on the GPU: BF16_Optimizer's
backward hooks add every micro-step into them (4 bytes per element, as without the block).

With `overlap_cpu_optimizer_d2h_h2d` and one data-parallel rank, `step()` returns before the tail's weights
have landed and the next forward waits per chunk; with more ranks the all-gather needs the whole partition.
Checkpoints hold whole partitions and whole moments (DeepSpeed's layout); universal checkpoints are refused.
"""
import contextlib

import torch
from deepspeed import comm as dist
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.utils import (all_gather_dp_groups, clip_tensors_by_global_norm, get_global_norm_of_tensors,
                                     is_invalid_grad_norm)

from ..errors import ConfigError
from . import cut, fp32_views
from .cpu_adam import CpuAdamBackend, fit_worker_mode_to_shared_memory, pick_worker_mode
from .layout import unregister_host_buffers
from .tail_steps import CpuTail, TailSteps, chunk_keys_of_params, install_waits

_FP32_PARTITIONS = "single_partition_of_fp32_groups"  # DeepSpeed's state-dict key of the fp32 partitions


class HybridBF16Optimizer(BF16_Optimizer):
    """DeepSpeed's BF16_Optimizer with the last `optimizer_offload_fraction` of each partition on the CPU."""

    offload = None  # the OptimizerOffloadConfig, set by `bf16_optimizer_class`
    weights = None  # fp32_views reads it: weight offload does not run on this path

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.has_moe_layers or self._uses_muon or not self.using_real_optimizer:
            raise ConfigError([("cpu_offloading.optimizer.optimizer_cpu_offload", "MoE layers, Muon and a DummyOptim "
                                "under DeepSpeed's BF16_Optimizer are not supported with the optimizer offload. Fix: "
                                "use zero_optimization.stage 2, or remove data_types.grad_accum_dtype.")])
        if any(not g.get("bias_correction", True) for g in self.optimizer.param_groups):
            raise ConfigError([("optimizer.params.bias_correction", "the CPU Adam op always corrects the bias. Fix: "
                                "remove bias_correction: false.")])
        o = self.offload
        self.adamw_mode = bool(getattr(self.optimizer, "adam_w_mode", isinstance(self.optimizer, torch.optim.AdamW)))
        cuda = torch.cuda.is_available()
        self.device = self.fp32_groups_flat_partition[0].device if self.fp32_groups_flat_partition else "cpu"
        one_rank = all(dist.get_world_size(group=g) == 1 for g in self.real_dp_process_group)
        sizes = [fp32.numel() for fp32 in self.fp32_groups_flat_partition]
        cuts = [int(round(o.optimizer_offload_fraction * n)) for n in sizes]
        deferred = o.overlap_cpu_optimizer_d2h_h2d and one_rank and any(cuts)
        mode = pick_worker_mode(None, cuda, deferred, o.use_torch_optimizer_for_cpu_offload)
        mode = fit_worker_mode_to_shared_memory(mode, sum(cuts))
        self.backend = CpuAdamBackend(o.use_torch_optimizer_for_cpu_offload, self.adamw_mode,
                                      use_process=mode == "process")
        shared = CpuAdamBackend.wants_shared_memory(o.use_torch_optimizer_for_cpu_offload, mode == "process")
        self.tails = []  # tails => per param group, its CpuTail, or None when nothing of it is offloaded
        for i, (fp32, size, c) in enumerate(zip(self.fp32_groups_flat_partition, sizes, cuts)):
            if c == 0:
                self.tails.append(None)
                continue
            tail = CpuTail(size - c, c, cuda and o.pin_cpu_params, cuda and o.pin_cpu_grads, shared)
            tail.master.copy_(fp32.detach()[size - c:])
            head = fp32.detach()[:size - c].clone()
            head.requires_grad = True
            self.fp32_groups_flat_partition[i] = head
            self.optimizer.param_groups[i]["params"] = [head]
            self.backend.register((tail.master, tail.grad, tail.exp_avg, tail.exp_avg_sq))
            self.tails.append(tail)
        self._unlink_hp_params()
        self.tail_steps = TailSteps(self.backend, deferred, cuda)
        self._hook_handles = []  # _hook_handles => forward and (load_)state_dict pre-hooks from attach()
        if any(self.tails):
            self.backend.start()

    # fp32_views.py reads the ZeRO optimizer's names
    bit16_groups = property(lambda self: self.bf16_groups)
    single_partition_of_fp32_groups = property(lambda self: self.fp32_groups_flat_partition)

    def _unlink_hp_params(self):
        """DeepSpeed's fp32 views point into the uncut partition and would keep it alive; fp32_views.py serves
        the `safe_get/set_full_*` helpers instead."""
        fp32_views.record_fragments(self)
        for group in self.bf16_groups:
            for p in group:
                p._hp_mapping = None
        self._hp_optimizer_states_linked = True  # no lazy re-link into the heads after the first step
        fp32_views.link(self)

    def _link_all_hp_params(self):
        if not getattr(self, "tails", None):  # during DeepSpeed's own set-up, before the cut
            return super()._link_all_hp_params()

    # ------------------------------------------------------------------------------------------ step
    def step(self, closure=None):
        if not any(self.tails):
            return super().step(closure)
        if closure is not None:
            raise NotImplementedError(f"{type(self).__name__} does not support closure.")
        self.tail_steps.land()
        self.overflow = False
        norm = get_global_norm_of_tensors(input_tensors=self.get_grads_for_norm()[0], mpu=self.mpu,
                                          norm_type=self.norm_type)
        self._global_grad_norm = norm
        if is_invalid_grad_norm(norm):
            self.overflow = True
            self._global_grad_norm = float("inf")
            self.clear_hp_grads()
            self.clear_lp_grads()
            return
        if self.clip_grad > 0.:  # in place on the whole accumulators, the tail's part included
            clip_tensors_by_global_norm(input_tensors=self.get_grads_for_norm(for_clipping=True),
                                        max_norm=self.clip_grad, global_norm=norm, mpu=self.mpu)
        jobs, sent = [], []
        for i, (head, tail, grad) in enumerate(zip(self.fp32_groups_flat_partition, self.tails,
                                                   self.fp32_groups_gradient_flat_partition)):
            cut = head.numel()
            if tail is not None:  # its gradient leaves first, then the GPU head steps while it crosses
                chunks = self.tail_steps.send_grads(tail, grad[cut:], 1.0)
                sent += chunks
                g = self.optimizer.param_groups[i]
                beta1, beta2 = g["betas"]
                hyper = (tail.step, float(g["lr"]), float(beta1), float(beta2), float(g["eps"]),
                         float(g["weight_decay"]))
                tail.step += 1
                lp = self.bf16_partitioned_groups[i][dist.get_rank(group=self.real_dp_process_group[i])]
                jobs.append((self._tail_id(i), tail, lp[cut:], lambda a, b, hyper=hyper: [(a, b, *hyper)], chunks,
                             1.0))
            head.grad = grad[:cut] if cut else None
        self.optimizer.step()
        for i, head in enumerate(self.fp32_groups_flat_partition):
            head.grad = None
            if head.numel():
                lp = self.bf16_partitioned_groups[i][dist.get_rank(group=self.real_dp_process_group[i])]
                lp[:head.numel()].copy_(head.detach())
        self.tail_steps.start(jobs)
        all_gather_dp_groups(groups_flat=self.bf16_groups_flat, partitioned_param_groups=self.bf16_partitioned_groups,
                             dp_process_group=self.real_dp_process_group,
                             start_alignment_factor=self.nccl_start_alignment_factor,
                             allgather_bucket_size=self.allgather_bucket_size)
        for c in sent:  # the accumulators are zeroed on the compute stream: after their copies to the host
            if c.d2h_event is not None:
                torch.cuda.current_stream().wait_event(c.d2h_event)
        self.clear_hp_grads()

    def _tail_id(self, i):
        return sum(1 for t in self.tails[:i] if t is not None)

    def _restore_from_bit16_weights(self):
        """The masters from the model's low-precision weights (DeepSpeed's `refresh_fp32_params`)."""
        self.tail_steps.land()
        for i, (partitions, head) in enumerate(zip(self.bf16_partitioned_groups, self.fp32_groups_flat_partition)):
            lp = partitions[dist.get_rank(group=self.real_dp_process_group[i])].detach()
            head.data.copy_(lp[:head.numel()])
            if self.tails[i] is not None:
                self.tails[i].master.copy_(lp[head.numel():])

    # ---------------------------------------------------------------------------------- checkpoints
    @contextlib.contextmanager
    def _whole_partitions(self):
        """Swap in whole fp32 partitions and whole optimizer state (CPU tensors), in DeepSpeed's layout."""
        heads = self.fp32_groups_flat_partition
        with cut.whole_state(self.optimizer, heads, self.tails) as wholes:
            self.fp32_groups_flat_partition = wholes  # a new list: the state dict keeps it, the optimizer gets `heads` back
            try:
                yield heads
            finally:
                self.fp32_groups_flat_partition = heads

    def state_dict(self):
        self.tail_steps.land()
        with self._whole_partitions():
            return super().state_dict()

    def load_state_dict(self, state_dict_list, checkpoint_folder=None, load_optimizer_states=True,
                        load_from_fp32_weights=False, load_serial=None, param_shapes=None):
        if checkpoint_folder:
            raise NotImplementedError("universal checkpoints are not supported with cpu_offloading.optimizer; "
                                      "load a regular DeepSpeed checkpoint, or remove the block to load this one")
        self.tail_steps.land()
        with self._whole_partitions() as heads:
            super().load_state_dict(state_dict_list, None, load_optimizer_states, load_from_fp32_weights)
            for i, (head, tail) in enumerate(zip(heads, self.tails)):
                if tail is not None:
                    cut.take_apart(self.optimizer, self.fp32_groups_flat_partition[i], head, tail, load_optimizer_states)
        self._unlink_hp_params()

    # ------------------------------------------------------------------------------------ the rest
    def split_info(self):
        return cut.split_info(self.fp32_groups_flat_partition, self.tails, self.offload, self.tail_steps.deferred)

    def attach(self, module):
        """With the deferred schedule, make `module`'s forwards wait for the chunks their own parameters are in,
        and any `state_dict()` or `load_state_dict()` of it for everything; returns whether hooks were installed."""
        if not self.tail_steps.deferred or self._hook_handles:
            return bool(self._hook_handles)
        where = {}  # where => id(param) => [(tail id, chunk index)] of the chunks holding its weights
        for i, tail in enumerate(self.tails):
            if tail is not None:  # one rank: the partition is the whole flat group
                where.update(chunk_keys_of_params(self.bf16_partitioned_groups[i][0], tail, self._tail_id(i),
                                                  self.bf16_groups[i]))
        self._hook_handles += install_waits(module, self.tail_steps, where)
        return True

    def wait(self):
        """Land the last step's CPU share in the model's weights, for reads outside a forward or state_dict."""
        self.tail_steps.land()

    def close(self):
        for h in self._hook_handles:
            h.remove()
        self._hook_handles = []
        try:
            self.tail_steps.close()
        finally:
            self.backend.close()
            unregister_host_buffers([t for t in self.tails if t is not None])


def bf16_optimizer_class(settings):
    """HybridBF16Optimizer bound to the block's `cpu_offloading.optimizer` settings."""
    return type("HybridBF16Optimizer", (HybridBF16Optimizer,), {"offload": settings})


@contextlib.contextmanager
def deepspeed_builds_hybrid_bf16(settings):
    """While active, DeepSpeed's engine builds its BF16_Optimizer as a HybridBF16Optimizer."""
    import deepspeed.runtime.engine as ds_engine
    original = ds_engine.BF16_Optimizer
    ds_engine.BF16_Optimizer = bf16_optimizer_class(settings)
    try:
        yield
    finally:
        ds_engine.BF16_Optimizer = original
