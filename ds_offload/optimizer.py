"""HybridDeviceOptimizer: Adam/AdamW with a fraction of its state in CPU memory, stepped by a CPU op.

Per step, the offloaded share travels grad D2H -> CPU Adam -> updated master H2D, bucket by bucket,
while the GPU share is stepped by torch's fused kernel on the compute stream. On CUDA with overlap on:

* gradient copies start from post-accumulate-grad hooks on a side stream as soon as a bucket's
  gradients exist (the offloaded share is the last layers, whose gradients come first); ``step()``
  re-copies any bucket whose gradient changed since (clipping, unscaling, accumulation), detected by
  the gradient's identity and version counter, so early copies are never stale;
* the CPU step runs off the main thread (see cpu_adam_worker for why not under the GIL), bucket by
  bucket in forward order from ``step()``; with ``step_in_backward=True`` (for loops that touch no
  gradient between backward and step) each bucket starts from its backward hook instead, which is what
  hides the CPU step behind the rest of backward;
* updated weights go back on another side stream; when this optimizer steps the model's own
  parameters, ``step()`` returns at once and a global forward pre-hook makes the compute stream wait
  for a bucket's event only at the first module that owns one of its parameters. When a wrapper
  (DeepSpeed ZeRO-1/2, its BF16/FP16 optimizers) replaced the params with its flat partitions, the
  wrapper reads them right after ``step()``, so ``step()`` waits for everything first.

Without CUDA both shares run on the CPU with the same split and the same arithmetic, which is how CI
checks the numbers.
"""
import concurrent.futures
import copy
import warnings
import weakref

import torch
from torch.nn.modules.module import register_module_forward_pre_hook

from .errors import ConfigError
from .cpu_adam_worker import CpuAdamBackend
from .hybrid_layout import (BUCKET_NUMEL, allocate_bucket, allocate_device_piece, bucket_runs, device_adam_step,
                            gather_state, make_buckets, plan_split, scatter_state, shared_memory_fits,
                            unregister_host_buffers)


class _Layout:
    def __init__(self, key):
        self.key = key
        self.pieces, self.buckets, self.device_pieces = [], [], []
        self.pieces_by_index, self.params_by_index, self.param_buckets = {}, {}, {}
        self.total = 0
        self.cpu_numel = 0
        self.owns_model_params = False
        self.streams = None  # (d2h, h2d) when the CPU share moves over CUDA
        self.versions = {}


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
                 step_in_backward=False):
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
        self._cpu_worker = cpu_worker
        self._layout = None
        self._backend = None
        self._executor = None
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
        lay = _Layout(key)
        pieces, lay.total = plan_split(self.param_groups, self.offload_fraction)
        lay.pieces = pieces
        cpu_pieces = [pc for pc in pieces if pc.on_cpu]
        lay.device_pieces = [pc for pc in pieces if not pc.on_cpu]
        lay.cpu_numel = sum(pc.numel for pc in cpu_pieces)
        lay.owns_model_params = all(id(pc.param) in self._model_param_ids for pc in pieces)
        any_cuda = any(pc.param.is_cuda for pc in cpu_pieces)
        mode = self._cpu_worker or ("inline" if not (any_cuda and self.overlap) else
                                    "thread" if self.use_torch_cpu else "process")
        if mode == "process" and not shared_memory_fits(16 * lay.cpu_numel):
            warnings.warn("not enough /dev/shm for the CPU Adam worker process's buffers; stepping DeepSpeed's "
                          "CPU Adam in a thread instead (its binding holds the GIL: less overlap)")
            mode = "thread"
        shared = CpuAdamBackend.wants_shared_memory(self.use_torch_cpu, mode == "process")
        lay.buckets = make_buckets(cpu_pieces, self.bucket_numel)
        self._backend = CpuAdamBackend(self.use_torch_cpu, self.adamw_mode, use_process=mode == "process")
        for b in lay.buckets:
            allocate_bucket(b, self.pin_cpu_params, self.pin_cpu_grads, shared)
            self._backend.register(b.buffers())
            for pc in b.pieces:
                lay.param_buckets.setdefault(id(pc.param), []).append(b)
        for pc in lay.device_pieces:
            allocate_device_piece(pc)
        for pc in pieces:
            lay.pieces_by_index.setdefault(pc.index, []).append(pc)
            lay.params_by_index[pc.index] = pc.param
        if lay.buckets:
            self._backend.start()
        if any_cuda:
            lay.streams = (torch.cuda.Stream(), torch.cuda.Stream())
            for b in lay.buckets:
                # The worker sleeps on d2h_event; a blocking event leaves its core to the CPU Adam.
                b.d2h_event, b.h2d_event = torch.cuda.Event(blocking=True), torch.cuda.Event()
        if mode in ("thread", "process") and lay.buckets:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ds_offload_cpu_adam")
        self._layout = lay
        if self._pending_state is not None:
            scatter_state(lay.pieces_by_index, self._pending_state)
            self._pending_state = None
        self._record_versions(lay.params_by_index.values())
        return lay

    def _teardown(self):
        self._finish_pending(early=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
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
        if lay is None or lay.streams is None or not lay.owns_model_params:
            return
        for b in lay.param_buckets.get(id(param), ()):
            b.seen.add(id(param))
            if len(b.seen) == b.num_params:
                self._copy_grads_to_host(b)
                if self.step_in_backward and self._executor is not None:
                    # The H2D needs only this bucket's backward done, which its gradient copy waited for.
                    b.early = self._submit(b, b.d2h_event)

    def _before_forward(self, module):
        if not self._pending:
            return
        for p in module._parameters.values():
            if p is not None and id(p) in self._pending:
                for b in self._pending.pop(id(p)):
                    self._wait_bucket(b)
                self._layout.versions[id(p)] = p._version

    # ----------------------------------------------------------------------------------- transfers
    def _copy_grads_to_host(self, b):
        lay = self._layout
        if b.future is not None:  # a parameter used outside any module forward: its update is still landing
            self._wait_bucket(b)
        b.seen.clear()
        b.mark_copied()
        if lay.streams is None:
            for pc in b.pieces:
                g = pc.grad_view()
                if g is not None:
                    b.grad[pc.offset:pc.offset + pc.numel].copy_(g)
            return
        d2h = lay.streams[0]
        d2h.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(d2h):
            views = [pc.grad_view() for pc in b.pieces]
            if all(v is not None for v in views):  # one transfer per bucket, cast on the GPU
                staged = torch.cat(views) if len(views) > 1 else views[0]
                b.grad.copy_(staged.float(), non_blocking=True)
            else:
                for pc, v in zip(b.pieces, views):
                    if v is not None:
                        b.grad[pc.offset:pc.offset + pc.numel].copy_(v.float(), non_blocking=True)
            for pc in b.pieces:
                if pc.param.grad is not None:
                    pc.param.grad.record_stream(d2h)
            b.d2h_event.record(d2h)

    def _cpu_bucket_task(self, b, runs, live, after_backward=None):
        """Step one bucket and send it back; ``live`` (pieces that had a gradient) is decided by the
        caller, since the gradients may be gone (zero_grad) by the time this runs."""
        lay = self._layout
        if lay.streams is not None:
            b.d2h_event.synchronize()
        self._backend.run(b.id, runs)
        if lay.streams is None:
            for pc in live:
                pc.param_view().copy_(pc.master)
            return
        h2d = lay.streams[1]
        with torch.cuda.device(h2d.device), torch.cuda.stream(h2d):
            h2d.wait_event(after_backward)  # backward kernels still queued may read these params
            dev = torch.empty(b.numel, dtype=torch.float32, device=b.pieces[0].param.device)
            dev.copy_(b.master, non_blocking=True)
            torch._foreach_copy_([pc.param_view() for pc in live],
                                 [dev[pc.offset:pc.offset + pc.numel] for pc in live])
            b.h2d_event.record(h2d)
        for pc in live:  # our own write, not a weight load: keep step()'s refresh check quiet
            lay.versions[id(pc.param)] = pc.param._version

    def _submit(self, b, after):
        """Start bucket ``b``'s CPU step (in the worker when there is one); False if it has no gradients."""
        runs = bucket_runs(b, self.param_groups)
        if not runs:
            return False
        live = [pc for pc in b.pieces if pc.param.grad is not None]
        if self._executor is not None:
            b.future = self._executor.submit(self._cpu_bucket_task, b, runs, live, after)
        else:
            self._cpu_bucket_task(b, runs, live, after)
        return True

    def _wait_bucket(self, b):
        if b.future is not None:
            fut, b.future = b.future, None
            fut.result()
        if self._layout.streams is not None:
            torch.cuda.current_stream().wait_event(b.h2d_event)

    def _finish_pending(self, early=False):
        """Land every update in flight; buckets stepped from this backward's hooks only when ``early``."""
        lay = self._layout
        if lay is None:
            return
        for b in lay.buckets:
            if b.future is not None and (early or not b.early):
                self._wait_bucket(b)
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
        after_backward = None
        if lay.streams is not None and lay.buckets:
            after_backward = torch.cuda.Event()
            after_backward.record()
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
                self._copy_grads_to_host(b)
            if self._submit(b, after_backward):
                submitted.append(b)
        device_adam_step(lay.device_pieces, self.param_groups, self.adamw_mode)
        for b in lay.buckets:
            b.copied = None  # the next step needs the next backward's gradients
        if lay.streams is not None:
            for b in submitted:  # grads may be zeroed or freed on the compute stream after this
                torch.cuda.current_stream().wait_event(b.d2h_event)
        if self._executor is not None and lay.owns_model_params and lay.streams is not None:
            for b in submitted:
                for pc in b.pieces:
                    self._pending.setdefault(id(pc.param), []).append(b)
        else:
            self._finish_pending()
            if lay.streams is not None:
                for b in submitted:
                    torch.cuda.current_stream().wait_event(b.h2d_event)
        self._record_versions(p for p in lay.params_by_index.values() if id(p) not in self._pending)
        return loss

    # ---------------------------------------------------------------------------------- state dicts
    def state_dict(self):
        """torch.optim.AdamW's format with CPU tensors only (plus ``master`` for low-precision params)."""
        self._finish_pending(early=True)
        index, groups = 0, []
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            packed.update(amsgrad=False, maximize=False, params=list(range(index, index + len(g["params"]))))
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
        remap = {}
        for s, g in zip(saved_groups, self.param_groups):
            for saved_idx, new_idx in zip(s["params"], range(len(remap), len(remap) + len(g["params"]))):
                remap[saved_idx] = new_idx
            for k, v in s.items():
                if k != "params" and k not in ("amsgrad", "maximize", "foreach", "capturable", "differentiable",
                                               "fused", "decoupled_weight_decay"):
                    g[k] = tuple(v) if k == "betas" else v
        state = {remap[k]: v for k, v in state_dict["state"].items() if k in remap}
        if self._layout is not None and self._layout.key == self._params_key():
            scatter_state(self._layout.pieces_by_index, state)
            # Wrappers (ZeRO) restore their fp32 partitions through .data after this call, unseen by the
            # version counter; fp32 params are the authority for their masters, so re-read them at the next step.
            self._refresh_fp32_masters = True
        else:
            self._pending_state = state

    def wait(self):
        """Land every update in flight and order the current stream after it; for code that reads
        offloaded weights after step() outside a module's forward (EMA, functional calls, timing)."""
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


def prepare_hybrid_optimizer(ds_config, block, model_parameters):
    """Build the hybrid optimizer from DeepSpeed's ``optimizer`` section and the validated
    ``cpu_offloading.optimizer`` block; return it with the DeepSpeed config to hand to
    ``deepspeed.initialize(optimizer=...)``: the ``optimizer`` section removed (the client optimizer
    replaces it) and ``zero_allow_untested_optimizer`` set, since ZeRO and DeepSpeed's BF16/FP16 wrappers
    only accept client optimizers they do not know with it."""
    cfg = copy.deepcopy(ds_config)
    section = cfg.pop("optimizer", None) or {}
    kind = str(section.get("type", "AdamW")).lower()
    if kind not in ("adam", "adamw"):
        raise ConfigError([("optimizer.type", f"optimizer offload supports Adam and AdamW, not {section.get('type')!r}; "
                            "set optimizer.type to \"Adam\" or \"AdamW\"")])
    p = dict(section.get("params", {}))
    adamw_mode = True if kind == "adamw" else bool(p.get("adam_w_mode", True))
    on = bool(block.get("optimizer_cpu_offload", False))
    opt = HybridDeviceOptimizer(
        model_parameters, offload_fraction=float(block.get("optimizer_offload_fraction", 0.0)) if on else 0.0,
        lr=float(p.get("lr", 1e-3)), betas=tuple(p.get("betas", (0.9, 0.999))), eps=float(p.get("eps", 1e-8)),
        weight_decay=float(p.get("weight_decay", 0.0)), adamw_mode=adamw_mode,
        overlap_cpu_optimizer_d2h_h2d=bool(block.get("overlap_cpu_optimizer_d2h_h2d", False)),
        pin_cpu_grads=bool(block.get("pin_cpu_grads", True)), pin_cpu_params=bool(block.get("pin_cpu_params", True)),
        use_torch_optimizer_for_cpu_offload=bool(block.get("use_torch_optimizer_for_cpu_offload", False)))
    cfg["zero_allow_untested_optimizer"] = True
    zero = cfg.get("zero_optimization")
    if isinstance(zero, dict) and zero.get("elastic_checkpoint"):
        # Elastic ZeRO checkpoints read optimizer.state directly; this optimizer's state lives in its pieces.
        zero["elastic_checkpoint"] = False
    return opt, cfg
