"""HybridDeviceOptimizer: Adam/AdamW with a fraction of its state in CPU memory, stepped by a CPU op.

Per step, the offloaded share travels grad D2H -> CPU Adam -> updated master H2D, bucket by bucket,
while the GPU share is stepped by torch's fused kernel on the compute stream. On CUDA with overlap on:

* gradient copies start from post-accumulate-grad hooks on a side stream as soon as a bucket's
  gradients exist (the offloaded share is the last layers, whose gradients come first); ``step()``
  re-copies any bucket whose gradient changed since (clipping, unscaling, accumulation), detected by
  the gradient's identity and version counter, so early copies are never stale;
* the CPU step runs off the main thread (see cpu_adam for why not under the GIL), bucket by
  bucket in forward order from ``step()``; with ``step_in_backward=True`` (for loops that touch no
  gradient between backward and step) each bucket starts from its backward hook instead, which is what
  hides the CPU step behind the rest of backward;
* updated weights go back on another side stream, and ``step()`` returns once they have landed (the
  compute stream ordered after them), so every read after it (``model.state_dict()``, ``torch.save``,
  an evaluation through a functional call) sees the update. With ``defer_weight_updates=True`` (a
  promise that weights are read only by modules' forward until ``wait()``), ``step()`` returns at once
  instead and a global forward pre-hook makes the compute stream wait for a bucket's event only at the
  first module that owns one of its parameters, which hides the CPU step behind the next forward. When a
  wrapper (DeepSpeed ZeRO-1/2, its BF16/FP16 optimizers) replaced the params with its flat partitions,
  the wrapper reads them right after ``step()``, so there ``step()`` always waits.

Without CUDA both shares run on the CPU with the same split and the same arithmetic, which is how CI
checks the numbers. The split and its buffers are in layout.py, the copies and their ordering in
transfers.py, the CPU kernels in cpu_adam.py; this class decides what is stepped when.
"""
import weakref

import torch
from torch.nn.modules.module import register_module_forward_pre_hook

from .cpu_adam import CpuAdamBackend, fit_worker_mode_to_shared_memory, pick_worker_mode
from .layout import (BUCKET_NUMEL, allocate_layout, bucket_runs, device_adam_step, plan_layout,
                     unregister_host_buffers)
from .state import gather_state, scatter_state
from .transfers import make_transfers


def _grad_hook(ref):
    def hook(param):
        opt = ref()
        if opt is not None:
            opt._on_grad_ready(param)
    return hook


def _forward_pre_hook(ref):
    def hook(module, args):
        opt = ref()
        if opt is not None and opt._pending:
            opt._before_forward(module)
    return hook


class HybridDeviceOptimizer(torch.optim.Optimizer):
    """Adam(W) whose last ``offload_fraction`` of elements keep fp32 master and moments on the CPU."""

    def __init__(self, params, offload_fraction=0.5, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 adamw_mode=True, overlap_cpu_optimizer_d2h_h2d=True, pin_cpu_grads=True, pin_cpu_params=True,
                 use_torch_optimizer_for_cpu_offload=False, bucket_numel=BUCKET_NUMEL, cpu_worker=None,
                 step_in_backward=False, defer_weight_updates=False):
        if not 0.0 <= float(offload_fraction) <= 1.0:
            raise ValueError(f"optimizer_offload_fraction must be in [0.0, 1.0], got {offload_fraction}")
        if cpu_worker not in (None, "inline", "thread", "process"):
            raise ValueError(f"cpu_worker must be None, 'inline', 'thread' or 'process', got {cpu_worker!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.offload_fraction = float(offload_fraction)
        self.adamw_mode = bool(adamw_mode)
        self.overlap = bool(overlap_cpu_optimizer_d2h_h2d)
        self.pin_cpu_grads, self.pin_cpu_params = bool(pin_cpu_grads), bool(pin_cpu_params)
        self.use_torch_cpu = bool(use_torch_optimizer_for_cpu_offload)
        self.bucket_numel = int(bucket_numel)
        # Opt-in: the caller promises that every backward is followed by step() with its gradients untouched
        # (no clipping, unscaling or accumulation in between), so a bucket's CPU step may start as soon as
        # its gradients are on the host, during backward. step() raises if the promise was broken.
        self.step_in_backward = bool(step_in_backward)
        # Opt-in: the caller promises to read the weights only through modules' forward (or after wait())
        # until the next step, so step() may return before the offloaded share's updates have landed.
        self.defer_weight_updates = bool(defer_weight_updates)
        self._cpu_worker = cpu_worker
        self._layout = None
        self._backend = None
        self._transfers = None  # HostTransfers or CudaTransfers, made with the layout
        self._pending_state = None
        self._refresh_fp32_masters = False
        self._pending = {}  # id(param) -> buckets whose H2D the next forward must wait for
        self._hook_handles = []
        self._model_param_ids = {id(p) for g in self.param_groups for p in g["params"]}
        if self.overlap and torch.cuda.is_available():
            ref = weakref.ref(self)
            for g in self.param_groups:
                for p in g["params"]:
                    if p.requires_grad and p.is_cuda:
                        self._hook_handles.append(p.register_post_accumulate_grad_hook(_grad_hook(ref)))
            self._hook_handles.append(register_module_forward_pre_hook(_forward_pre_hook(ref)))

    # ----------------------------------------------------------------------------------------- layout
    def _params_key(self):
        return tuple(id(p) for g in self.param_groups for p in g["params"])

    def _ensure_layout(self):
        key = self._params_key()
        if self._layout is not None and self._layout.key == key:
            return self._layout
        if self._layout is not None:  # a wrapper swapped the params: state of the old ones is meaningless
            self._teardown()
        lay = plan_layout(key, self.param_groups, self.offload_fraction, self.bucket_numel, self._model_param_ids)
        mode = pick_worker_mode(self._cpu_worker, lay.on_cuda, self.overlap, self.use_torch_cpu)
        mode = fit_worker_mode_to_shared_memory(mode, lay.cpu_numel)
        self._backend = CpuAdamBackend(self.use_torch_cpu, self.adamw_mode, use_process=mode == "process")
        shared = CpuAdamBackend.wants_shared_memory(self.use_torch_cpu, mode == "process")
        allocate_layout(lay, self._backend, self.pin_cpu_params, self.pin_cpu_grads, shared)
        if lay.buckets:
            self._backend.start()
        self._transfers = make_transfers(lay, self._backend, threaded=mode in ("thread", "process"))
        self._layout = lay
        self._apply_pending_state(lay)
        self._record_versions(lay.params_by_index.values())
        return lay

    def _apply_pending_state(self, lay):
        """A state dict loaded before the layout existed goes into its pieces now."""
        if self._pending_state is not None:
            scatter_state(lay.pieces_by_index, self._pending_state)
            self._pending_state = None

    @property
    def _executor(self):
        """The worker thread of the CPU steps, if any (benchmarks/optimizer_probe.py reports it)."""
        return None if self._transfers is None else self._transfers.executor

    def _teardown(self):
        self._finish_pending(early=True)
        if self._transfers is not None:
            self._transfers.close()
            self._transfers = None
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        if self._layout is not None:
            unregister_host_buffers(self._layout.buckets)
            self._layout = None

    def split_info(self):
        """Element counts of the split (builds the layout from the current param groups if needed)."""
        lay = self._ensure_layout()
        return {"total_numel": lay.total, "cpu_numel": lay.cpu_numel, "gpu_numel": lay.total - lay.cpu_numel,
                "num_buckets": len(lay.buckets), "fraction": self.offload_fraction}

    # ------------------------------------------------------------------------------- masters refresh
    def _record_versions(self, params):
        versions = self._layout.versions
        for p in params:
            versions[id(p)] = p._version

    def refresh_masters_from_params(self):
        """Re-read fp32 masters from the parameters, e.g. after model weights were loaded without
        optimizer state. ``step()`` does this by itself for parameters written in place through autograd's
        version counter (``module.load_state_dict``); writes through ``.data`` escape it, so engines
        that load that way (DeepSpeed's ``load_checkpoint`` under ZeRO-1/2 or bf16/fp16) must call this."""
        self._refresh_masters(lambda pc: True)

    def _refresh_masters(self, wanted):
        if self._layout is None:
            return
        self._finish_pending()
        lay = self._layout
        for pc in lay.pieces:
            if pc.master is None or (not pc.on_cpu and pc.param.dtype == torch.float32):
                continue  # a device piece of an fp32 param steps the param itself
            if wanted(pc):
                pc.master.copy_(pc.param_view())
        self._record_versions(lay.params_by_index.values())

    # ---------------------------------------------------------------------------------------- hooks
    def _on_grad_ready(self, param):
        lay = self._layout
        if lay is None or not self._transfers.on_cuda or not lay.owns_model_params:
            return
        for b in lay.param_buckets.get(id(param), ()):
            b.seen.add(id(param))
            if len(b.seen) == b.num_params:
                self._transfers.copy_grads_to_host(b)
                if self.step_in_backward and self._transfers.executor is not None:
                    # The H2D needs only this bucket's backward done, which its gradient copy waited for.
                    b.early = self._submit(b, b.d2h_event)

    def _before_forward(self, module):
        if not self._pending:
            return
        for p in module._parameters.values():
            if p is not None and id(p) in self._pending:
                for b in self._pending.pop(id(p)):
                    self._transfers.wait_bucket(b)
                self._layout.versions[id(p)] = p._version

    # ----------------------------------------------------------------------------------- transfers
    def _submit(self, b, after):
        """Start bucket ``b``'s CPU step (in the worker when there is one); False if it has no gradients."""
        runs = bucket_runs(b, self.param_groups)
        if not runs:
            return False
        live = [pc for pc in b.pieces if pc.param.grad is not None]
        self._transfers.submit(b, runs, live, after)
        return True

    def _finish_pending(self, early=False):
        """Land every update in flight; buckets stepped from this backward's hooks only when ``early``."""
        lay = self._layout
        if lay is None:
            return
        for b in lay.buckets:
            if b.future is not None and (early or not b.early):
                self._transfers.wait_bucket(b)
        if self._pending:
            self._pending.clear()
            self._record_versions(lay.params_by_index.values())

    # ---------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._finish_pending()
        lay = self._ensure_layout()
        if self._refresh_fp32_masters:
            self._refresh_masters(lambda pc: pc.param.dtype == torch.float32)
            self._refresh_fp32_masters = False
        else:
            busy = {id(pc.param) for b in lay.buckets if b.early for pc in b.pieces}  # being written back now
            self._refresh_masters(lambda pc: id(pc.param) not in busy and
                                  lay.versions.get(id(pc.param)) != pc.param._version)
        submitted = []
        after_backward = self._transfers.backward_done()
        # Buckets were filled in gradient-arrival order (last layers first); step them in forward order, so
        # the first offloaded layer the next forward reaches is the first one back on the GPU.
        for b in reversed(lay.buckets):
            if b.early:
                b.early = False
                if not b.copy_is_current():
                    raise RuntimeError("step_in_backward=True but gradients changed between backward and step() "
                                       "(clipping, loss-scale unscaling or accumulation): the offloaded share "
                                       "was already stepped with the earlier ones; turn step_in_backward off")
                submitted.append(b)
                continue
            if not b.copy_is_current() and any(pc.param.grad is not None for pc in b.pieces):
                self._transfers.copy_grads_to_host(b)
            if self._submit(b, after_backward):
                submitted.append(b)
        device_adam_step(lay.device_pieces, self.param_groups, self.adamw_mode)
        for b in lay.buckets:
            b.copied = None  # the next step needs the next backward's gradients
        self._transfers.order_after_d2h(submitted)  # grads may be zeroed or freed on the compute stream after this
        if self.defer_weight_updates and self._transfers.lands_later and lay.owns_model_params:
            for b in submitted:
                for pc in b.pieces:
                    self._pending.setdefault(id(pc.param), []).append(b)
        else:
            self._finish_pending()
            self._transfers.order_after_h2d(submitted)
        self._record_versions(p for p in lay.params_by_index.values() if id(p) not in self._pending)
        return loss

    # ---------------------------------------------------------------------------------- state dicts
    def state_dict(self):
        """torch.optim.AdamW's format with CPU tensors only (plus ``master`` for low-precision params)."""
        self._finish_pending(early=True)
        index, groups = 0, []
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            # The keys torch's Adam(W) and DeepSpeed's FusedAdam read from a loaded group, so a checkpoint
            # made with offload resumes under either of them.
            packed.update(amsgrad=False, maximize=False, bias_correction=True,
                          params=list(range(index, index + len(g["params"]))))
            index += len(g["params"])
            groups.append(packed)
        if self._layout is not None and self._layout.key == self._params_key():
            state = gather_state(self._layout.pieces_by_index, self._layout.params_by_index)
        else:
            state = dict(self._pending_state or {})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        self._finish_pending(early=True)
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)):
            raise ValueError("loaded state dict does not match this optimizer's param groups")
        remap, group_steps = {}, {}
        for s, g in zip(saved_groups, self.param_groups):
            if "step" in s and "bias_correction" in s:
                # DeepSpeed's FusedAdam: it advances only the last param's state["step"] of a group and steps
                # the whole group with it, so that one is the group's count.
                steps = [int(state_dict["state"][i]["step"]) for i in s["params"]
                         if i in state_dict["state"] and "step" in state_dict["state"][i]]
                group_steps.update((i, max(steps)) for i in s["params"] if steps)
            for saved_idx, new_idx in zip(s["params"], range(len(remap), len(remap) + len(g["params"]))):
                remap[saved_idx] = new_idx
            for k, v in s.items():
                if k != "params" and k not in ("amsgrad", "maximize", "foreach", "capturable", "differentiable",
                                               "fused", "decoupled_weight_decay", "bias_correction", "step"):
                    g[k] = tuple(v) if k == "betas" else v
        state = {remap[k]: v for k, v in state_dict["state"].items() if k in remap}
        for k, step in group_steps.items():
            if k in remap and remap[k] in state:
                state[remap[k]] = {**state[remap[k]], "step": step}
        if self._layout is not None and self._layout.key == self._params_key():
            scatter_state(self._layout.pieces_by_index, state)
            # Wrappers (ZeRO) restore their fp32 partitions through .data after this call, unseen by the
            # version counter; fp32 params are the authority for their masters, so re-read them at the next step.
            self._refresh_fp32_masters = True
        else:
            self._pending_state = state

    def wait(self):
        """Land every update in flight and order the current stream after it; with
        ``defer_weight_updates=True``, for code that reads offloaded weights after step() outside a
        module's forward (state_dict, torch.save, EMA, functional calls, timing)."""
        self._finish_pending(early=True)

    def close(self):
        """Stop the CPU worker and release pinned host memory; the optimizer is unusable afterwards."""
        self._teardown()
        for h in self._hook_handles:
            h.remove()
        self._hook_handles = []

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
