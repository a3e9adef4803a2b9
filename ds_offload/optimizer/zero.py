"""The optimizer offload inside DeepSpeed's ZeRO-1/2 optimizer: each rank's flat fp32 partition cut in two.

Why a subclass: handed to DeepSpeed as a client optimizer, the hybrid can free only the moments of its share,
because DeepSpeed's ZeRO optimizer keeps the whole fp32 partition on the GPU and reads it right after
`step()`. Here DeepSpeed's own stage-1/2 optimizer is kept and its partition is cut at element `P - c`
(`c = round(f * P)` of the rank's `P` elements, per param group): the GPU keeps the head, stepped by
DeepSpeed's optimizer exactly as before; the tail's fp32 master, both moments and an fp32 gradient buffer
live in CPU memory and are stepped by DeepSpeed's CPU Adam op. Reduction, the global norm, clipping, loss
scaling and overflow skips stay DeepSpeed's (the cut acts after them), so the numbers are plain
DeepSpeed's; GPU bytes freed per offloaded element: 12 (master and moments). Checkpoints are written in
DeepSpeed's layout (whole partitions), so they load with or without the block, either way.

The tail's round trip (gradient D2H, CPU Adam, weights H2D) is tail_steps.py's. With
`overlap_cpu_optimizer_d2h_h2d` and one data-parallel rank, `step()` returns before it has landed and the
next forward waits per chunk (`attach`), which hides the CPU step behind that forward; with more ranks the
all-gather needs the whole partition, so `step()` waits. Where the gradient a parameter's hook sees is the
one `step()` reads (one rank, one micro-step, no loss scaling), each chunk is also stepped
during backward as its gradients arrive, and `step()` keeps or redoes it (speculate.py).
"""
import contextlib
import math
import warnings

import torch
from deepspeed import comm as dist
from deepspeed.runtime.utils import all_gather_dp_groups, is_invalid_grad_norm
from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID, DeepSpeedZeroOptimizer

from . import cut, fp32_views
from .cpu_adam import CpuAdamBackend, fit_worker_mode_to_shared_memory, pick_worker_mode
from .layout import unregister_host_buffers
from .speculate import Speculation
from .tail_steps import CpuTail, TailSteps, chunk_keys_of_params, chunk_spans, install_waits

_WEIGHTS_KEY = "ds_offload_weights"  # the optimizer state of the offloaded layers, in the optimizer's state dict


class HybridZeroOptimizer(DeepSpeedZeroOptimizer):
    """DeepSpeed's ZeRO-1/2 optimizer with the last `optimizer_offload_fraction` of each partition on the CPU."""

    offload = None  # the OptimizerOffloadConfig, set by `zero_optimizer_class`
    weights = None  # the WeightOffload of the first layers, or None, set by `zero_optimizer_class`
    speculate = True  # whether the deferred schedule may step the CPU share during backward (tests compare)
    speculation_trial_steps = 3  # steps timed with and without it before keeping the faster (None: always)

    def __init__(self, *args, **kwargs):
        o = self.offload
        self.speculation = None  # speculation => the Speculation of the deferred schedule, or None
        self._grad_hooks = []  # _grad_hooks => post-accumulate-grad hooks feeding it, registered before DeepSpeed's
        if self.speculate and o.optimizer_cpu_offload and o.overlap_cpu_optimizer_d2h_h2d:
            init_optimizer = args[0] if args else kwargs["init_optimizer"]
            self._grad_hooks = [p.register_post_accumulate_grad_hook(self._grad_ready)
                                for g in init_optimizer.param_groups for p in g["params"] if p.requires_grad]
        super().__init__(*args, **kwargs)
        if self.cpu_offload:
            raise ValueError("HybridZeroOptimizer with zero_optimization.offload_optimizer: config validation "
                             "refuses two optimizer offloads; this is a bug if you see it")
        basic = self.optimizer
        self.adamw_mode = bool(getattr(basic, "adam_w_mode", isinstance(basic, torch.optim.AdamW)))
        cuda = torch.cuda.is_available()
        one_rank = all(dist.get_world_size(group=g) == 1 for g in self.real_dp_process_group)
        if o.overlap_cpu_optimizer_d2h_h2d and not one_rank and dist.get_rank() == 0:
            warnings.warn("cpu_offloading.optimizer.overlap_cpu_optimizer_d2h_h2d: with more than one data-parallel "
                          "rank the all-gather after step() needs each rank's whole partition, so step() waits for "
                          "the CPU share (its copies still pipeline by chunk); the overlap with the next forward "
                          "applies to one rank only.", stacklevel=2)
        sizes = [fp32.numel() for fp32 in self.single_partition_of_fp32_groups]
        fraction = o.optimizer_offload_fraction if o.optimizer_cpu_offload else 0.0  # weights alone: no cut
        cuts = [int(round(fraction * n)) for n in sizes]
        w = self.weights
        # Deferred only where it pays: a tail, the last layers' share, whose step the next forward reaches last.
        deferred = o.overlap_cpu_optimizer_d2h_h2d and one_rank and any(cuts)
        # The offloaded layers' CPU steps during backward (weights/speculate.py), where the hook's gradient is
        # the one step() reads times 1 (their reduction is weights/offload.py's, so any number of ranks).
        layer_steps = w is not None and o.overlap_cpu_optimizer_d2h_h2d and self._unscaled_and_decoupled()
        # overlap for pick_worker_mode is `deferred` alone: the layers' steps need no worker (its docstring)
        mode = pick_worker_mode(None, cuda, deferred, o.use_torch_optimizer_for_cpu_offload)
        mode = fit_worker_mode_to_shared_memory(mode, sum(cuts) + (w.numel if w is not None else 0))
        self.backend = CpuAdamBackend(o.use_torch_optimizer_for_cpu_offload, self.adamw_mode,
                                      use_process=mode == "process")
        shared = CpuAdamBackend.wants_shared_memory(o.use_torch_optimizer_for_cpu_offload, mode == "process")
        self.tails = []  # tails => per param group, its CpuTail, or None when nothing of it is offloaded
        for i, (fp32, size, c) in enumerate(zip(self.single_partition_of_fp32_groups, sizes, cuts)):
            if c == 0:
                self.tails.append(None)
                continue
            tail = CpuTail(size - c, c, cuda and o.pin_cpu_params, cuda and o.pin_cpu_grads, shared)
            tail.master.copy_(fp32.detach()[size - c:])
            head = fp32.detach()[:size - c].clone()
            head.requires_grad = True
            self.single_partition_of_fp32_groups[i] = head
            self.optimizer.param_groups[i]["params"] = [head]
            self.backend.register((tail.master, tail.grad, tail.exp_avg, tail.exp_avg_sq))
            self.tails.append(tail)
        self._unlink_hp_params()
        busy = any(self.tails) or w is not None
        if o.overlap_cpu_optimizer_d2h_h2d and not any(cuts) and w is not None and not layer_steps \
                and dist.get_rank() == 0:
            cut.warn_overlap_does_nothing()
        self.tail_steps = TailSteps(self.backend, deferred, cuda)
        self.speculation = self._make_speculation()
        self._hook_handles = []  # _hook_handles => forward and (load_)state_dict pre-hooks from attach()
        if w is not None:
            w.allocate(shared, o.pin_cpu_params, self.dp_process_group)
            w.register(self.backend)
            w.tail_steps = self.tail_steps
            w.boundary = self.is_gradient_accumulation_boundary
            if layer_steps:
                w.speculate(self.optimizer.param_groups, o.use_torch_optimizer_for_cpu_offload)
        if busy:
            self.backend.start()

    def _unscaled_and_decoupled(self):
        """No loss scaling (so step() multiplies gradients by exactly 1 unless it clips) and weight decay that
        Adam's undo can take back (decoupled, or none)."""
        return (cut.decoupled(self.adamw_mode, self.optimizer.param_groups) and not self.dynamic_loss_scale
                and float(self.loss_scale) == 1.0)

    def _make_speculation(self):
        """A Speculation where a parameter's gradient at its hook is what step() will read, else None."""
        if not (self._grad_hooks and self.tail_steps.deferred and any(self.tails)):
            return None
        if (not self._unscaled_and_decoupled() or self.gradient_accumulation_steps != 1
                or self.gradient_predivide_factor != 1.0):
            return None
        s = Speculation(self.tail_steps, self.speculation_trial_steps, verbose=dist.get_rank() == 0)
        for i, tail in enumerate(self.tails):
            if tail is not None:
                s.add_tail(self._tail_id(i), tail, self.parallel_partitioned_bit16_groups[i][0], self.bit16_groups[i],
                           lambda i=i: self._hyper(i))
        return s

    def _grad_ready(self, p):
        if self.speculation is not None and self.is_gradient_accumulation_boundary():
            self.speculation.grad_ready(p)

    def _cancel_speculation(self):
        """Before a read or write of the optimizer state between backward and step(): take back its CPU steps."""
        if self.speculation is not None:
            self.speculation.cancel()

    def _hyper(self, i):
        """(step_before, lr, beta1, beta2, eps, weight_decay) of group `i`'s tail's next step."""
        g = self.optimizer.param_groups[i]
        beta1, beta2 = g["betas"]
        return (self.tails[i].step, float(g["lr"]), float(beta1), float(beta2), float(g["eps"]),
                float(g["weight_decay"]))

    def _unlink_hp_params(self):
        """DeepSpeed's fp32 views of each parameter point into the uncut partition and would keep it alive; the
        `safe_get/set_full_*` helpers are served by fp32_views.py instead (universal checkpoints are not)."""
        fp32_views.record_fragments(self)
        for group in self.bit16_groups:
            for p in group:
                p._hp_mapping = None
        self._hp_optimizer_states_linked = True
        fp32_views.link(self)

    # ------------------------------------------------------------------------------------------ step
    def step(self, closure=None):
        w = self.weights
        if not any(self.tails) and w is None:
            return super().step(closure)
        self.tail_steps.land()
        spec = self.speculation.finish() if self.speculation is not None else None  # chunks stepped in backward
        w_sq = w.finish_backward() if w is not None else 0.0  # the offloaded layers' share of the norm
        self.micro_step_id = INITIAL_MICRO_STEP_ID
        if not self.compute_grad_norm:
            self._global_grad_norm = None
        self.overflow = False
        if self.check_grad_overflow:
            self.check_overflow(partition_gradients=self.partition_gradients)
            self.overflow = self.overflow or not math.isfinite(w_sq)
        norm = None
        if self.compute_grad_norm and not self.overflow:
            norm = self.scaled_global_norm()
            if w is not None:
                norm = torch.sqrt(norm.double() ** 2 + w_sq).to(norm.dtype)
            if (self.dtype != torch.bfloat16 or self.check_grad_overflow) and is_invalid_grad_norm(norm):
                self.overflow = True
        prev_scale = self.loss_scale
        self._update_scale(self.overflow)
        if self.overflow:  # the whole step is skipped, every part: DeepSpeed's rule
            if self.compute_grad_norm:
                self._global_grad_norm = float("inf")
            self.zero_grad(set_to_none=True)
            self._release_preflattened_grad_buffers()
            for k in self.averaged_gradients.keys():
                self.averaged_gradients[k] = None
                self.all_grad_tensors[k] = None
            if w is not None:
                w.discard_grads()
            if spec is not None:
                self.speculation.take_back(spec)
                self.speculation.predict({}, clipped=True, rolled_back=True)
            return
        if norm is not None:
            self._global_grad_norm = norm / prev_scale
        inverse_scale = self._inverse_scale(norm)  # one device sync per step, for all the tails
        # The offloaded layers first: they are the first the next forward needs.
        jobs = w.jobs(self.optimizer.param_groups, inverse_scale) if w is not None else []
        tail_jobs = [job for i in range(len(self.bit16_groups)) for job in self._step_group(i, norm, inverse_scale,
                                                                                           spec)]
        if self.speculation is not None:
            self.speculation.predict({(job[0], k): c for job in tail_jobs for k, c in enumerate(job[4])},
                                     clipped=inverse_scale != 1.0,
                                     rolled_back=spec is not None and any(c.redo for c in spec.values()))
        self.tail_steps.start(jobs + tail_jobs)
        all_gather_dp_groups(groups_flat=self.bit16_groups_flat,
                             partitioned_param_groups=self.parallel_partitioned_bit16_groups,
                             dp_process_group=self.real_dp_process_group,
                             start_alignment_factor=self.nccl_start_alignment_factor,
                             allgather_bucket_size=self.allgather_bucket_size)
        for i in range(len(self.bit16_groups)):
            self._update_model_bit16_weights(i)

    def _flat_grad_partition(self, i, partition_id):
        flat = self._get_preflattened_grad_partition(i)
        if flat is not None:
            return flat
        if partition_id == dist.get_world_size(group=self.real_dp_process_group[i]) - 1:
            return self.flatten_dense_tensors_aligned(self.averaged_gradients[i], int(self.partition_size[i]))
        return self.flatten(self.averaged_gradients[i])

    def _inverse_scale(self, norm):
        """The factor `unscale_and_clip_grads` multiplies gradients by, as a float for the CPU tail."""
        if self.clip_grad == 0.0 and self.loss_scale == 1.0:
            return 1.0
        combined = self.loss_scale
        if self.clip_grad > 0.:
            clip_norm = norm
            if is_invalid_grad_norm(clip_norm):
                clip_norm = torch.tensor(float("inf"), dtype=torch.float, device=self.device)
            clip = torch.clamp(((clip_norm / self.loss_scale) + 1e-6) / self.clip_grad, min=1.0)
            combined = clip * self.loss_scale
        return float(1. / combined)

    def _step_group(self, i, norm, inverse_scale, spec=None):
        """The GPU head's step; returns the tail's job for TailSteps (none without a tail). `spec`: the chunks
        stepped during backward (speculate.py), whose gradients are on the host already."""
        partition_id = dist.get_rank(group=self.real_dp_process_group[i])
        self.free_grad_in_param_list(self.params_not_in_partition[i])
        flat = self._flat_grad_partition(i, partition_id)
        head, tail = self.single_partition_of_fp32_groups[i], self.tails[i]
        lp_partition = self.parallel_partitioned_bit16_groups[i][partition_id]
        cut = tail.start if tail is not None else flat.numel()
        chunks, scale = None, 1.0
        if tail is not None and spec is not None:
            hyper = self._hyper(i)
            chunks = [spec[(self._tail_id(i), k)] for k in range(len(chunk_spans(tail.numel)))]
            for c in chunks:  # kept where the step taken was this one: nothing clipped, same hyper-parameters
                c.redo = inverse_scale != 1.0 or c.speculated != hyper
            scale = inverse_scale  # the redone chunks' gradients on the host are unscaled
        elif tail is not None:  # its gradient leaves first; the streams order the copies before the frees below
            chunks = self.tail_steps.send_grads(tail, flat[cut:], inverse_scale)
        grad = flat[:cut].to(head.dtype)
        del flat
        self.free_grad_in_param_list(self.params_in_partition[i])
        self._release_preflattened_grad_buffers(i)
        self.averaged_gradients[i] = None
        self.all_grad_tensors[i] = None
        self.unscale_and_clip_grads([grad], norm)
        if head.numel():
            head.grad = grad
            self._optimizer_step(i)
            head.grad = None
            lp_partition[:cut].copy_(head.detach())
        del grad
        if tail is None:
            return []
        hyper = self._hyper(i)
        tail.step += 1
        return [(self._tail_id(i), tail, lp_partition[tail.start:], lambda a, b: [(a, b, *hyper)], chunks, scale)]

    def _tail_id(self, i):
        """The backend's bucket id of group `i`'s tail (tails were registered in group order)."""
        return sum(1 for t in self.tails[:i] if t is not None)

    # ------------------------------------------------------------------------------ masters refresh
    def _restore_from_bit16_weights(self):
        """The masters from the model's low-precision weights (DeepSpeed's `refresh_fp32_params`)."""
        self.tail_steps.land()
        self._cancel_speculation()
        if self.weights is not None:
            self.weights.refresh_masters()
        for i, (partitions, head) in enumerate(zip(self.parallel_partitioned_bit16_groups,
                                                   self.single_partition_of_fp32_groups)):
            lp = partitions[dist.get_rank(group=self.real_dp_process_group[i])].detach()
            tail = self.tails[i]
            cut = tail.start if tail is not None else lp.numel()
            if head.numel() == cut:
                head.data.copy_(lp[:cut])
                if tail is not None:
                    tail.master.copy_(lp[cut:])
            else:  # inside `_whole_partitions` (a checkpoint load): the whole partition is there
                head.data.copy_(lp)

    # ---------------------------------------------------------------------------------- checkpoints
    @contextlib.contextmanager
    def _whole_partitions(self):
        """Swap in whole fp32 partitions and whole optimizer state (CPU tensors), in DeepSpeed's layout."""
        heads = list(self.single_partition_of_fp32_groups)
        with cut.whole_state(self.optimizer, heads, self.tails) as wholes:
            self.single_partition_of_fp32_groups[:] = wholes
            try:
                yield heads
            finally:
                self.single_partition_of_fp32_groups[:] = heads

    def state_dict(self):
        self.tail_steps.land()
        self._cancel_speculation()
        with self._whole_partitions():
            sd = super().state_dict()
        if self.weights is not None:
            sd[_WEIGHTS_KEY] = self.weights.state_dict()
        return sd

    def load_state_dict(self, state_dict_list, load_optimizer_states=True, load_from_fp32_weights=False,
                        checkpoint_folder=None, load_serial=None, param_shapes=None):
        if checkpoint_folder:
            raise NotImplementedError("universal checkpoints are not supported with cpu_offloading.optimizer; "
                                      "load a regular DeepSpeed checkpoint, or remove the block to load this one")
        self.tail_steps.land()
        self._cancel_speculation()
        mine = dist.get_rank(group=self.dp_process_group)
        weights_sd = [sd.pop(_WEIGHTS_KEY, None) if isinstance(sd, dict) else None for sd in state_dict_list]
        if self.weights is not None:
            if weights_sd[min(mine, len(weights_sd) - 1)] is None:
                raise ValueError("this checkpoint was saved without cpu_offloading.model.cpu_offloading_weights, so its "
                                 "optimizer state does not hold the offloaded layers in this layout. Fix: load it with "
                                 "engine.load_checkpoint(..., load_optimizer_states=False) (weights only; the masters "
                                 "are re-read from them), or without the weights offload.")
            self.weights.load_state_dict(weights_sd[min(mine, len(weights_sd) - 1)])
        elif any(x is not None for x in weights_sd):
            raise ValueError("this checkpoint was saved with cpu_offloading.model.cpu_offloading_weights: its optimizer "
                             "state leaves the offloaded layers out of DeepSpeed's partitions. Fix: load it with the same "
                             "weights offload, or with engine.load_checkpoint(..., load_optimizer_states=False).")
        with self._whole_partitions() as heads:
            super().load_state_dict(state_dict_list, load_optimizer_states, load_from_fp32_weights)
            for i, (head, tail) in enumerate(zip(heads, self.tails)):
                if tail is not None:
                    cut.take_apart(self.optimizer, self.single_partition_of_fp32_groups[i], head, tail,
                                   load_optimizer_states)
        self._unlink_hp_params()

    # ------------------------------------------------------------------------------------ reporting
    def split_info(self):
        info = cut.split_info(self.single_partition_of_fp32_groups, self.tails, self.offload, self.tail_steps.deferred)
        s = self.speculation
        info["speculative"] = s is not None and s.disabled is None and s.trial.choice is not False
        if s is not None:
            info["speculation_trial"] = s.trial.summary()
        info["rollbacks"] = s.rollbacks if s is not None else 0
        if self.weights is not None:
            info.update(self.weights.speculation_info())
        return info

    # ------------------------------------------------------------------------ deferred weight updates
    def attach(self, module):
        """With the deferred schedule, make `module`'s forwards wait for the chunks their own parameters are in,
        and any `state_dict()` or `load_state_dict()` of it for everything; returns whether hooks were installed."""
        if not self.tail_steps.deferred or self._hook_handles:
            return bool(self._hook_handles)
        where = {}  # where => id(param) => [(tail id, chunk index)] of the chunks holding its weights
        for i, tail in enumerate(self.tails):
            if tail is not None:  # one rank: the partition is the whole group
                where.update(chunk_keys_of_params(self.parallel_partitioned_bit16_groups[i][0], tail,
                                                  self._tail_id(i), self.bit16_groups[i]))
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
        self._cancel_speculation()
        for h in self._hook_handles + self._grad_hooks:
            h.remove()
        self._hook_handles, self._grad_hooks = [], []
        try:
            self.tail_steps.close()
        finally:
            self.backend.close()
            layers = self.weights.layers if self.weights is not None else []
            unregister_host_buffers([t for t in self.tails if t is not None] + layers)


def zero_optimizer_class(settings, weights=None):
    """HybridZeroOptimizer bound to the block's `cpu_offloading.optimizer` settings (and a WeightOffload)."""
    return type("HybridZeroOptimizer", (HybridZeroOptimizer,), {"offload": settings, "weights": weights})


@contextlib.contextmanager
def deepspeed_builds_hybrid_zero(settings, weights=None):
    """While active, DeepSpeed's engine builds its ZeRO-1/2 optimizer as a HybridZeroOptimizer."""
    import deepspeed.runtime.engine as ds_engine
    original = ds_engine.DeepSpeedZeroOptimizer
    ds_engine.DeepSpeedZeroOptimizer = zero_optimizer_class(settings, weights)
    try:
        yield
    finally:
        ds_engine.DeepSpeedZeroOptimizer = original
