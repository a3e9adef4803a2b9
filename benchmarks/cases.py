"""The case registry, and the cases of our own code, the baselines and the limits.

Every case runs in its own process (see run.py). A case function takes (shape, warm, steps, **params) and
returns a dict of measurements (harness.measure's keys plus its own). Peers live in peers.py.
"""
import time
from dataclasses import dataclass, field

import torch

import harness as H

# ---------------------------------------------------------------------------------------------- registry


@dataclass
class Case:
    name: str            # unique within a shape
    shape: str
    group: str           # limits | baseline | ours | peer | diag
    fn: str              # "module:function"
    params: dict = field(default_factory=dict)
    quick: bool = False  # part of --quick
    cuda_only: bool = False
    needs_ds_build: bool = False   # uses DeepSpeed's JIT-built CPU Adam op
    budget_s: int = 60             # per-case timeout (process start to result)
    est_s: int = 15                # expected wall time on an H100/H200, used to fit the full run's budget
    loss_ref: str = "base"         # the no-offload case whose final loss it is compared with
    mode: str = ""                 # act | opt | combined | act_peer | opt_peer (for bounds and targets)
    label: str = ""
    tier: int = 1                  # 1: run first (all shapes), 2: variants and diagnostics, run after tier 1
    members: list = None           # a case group: these cases run one after another in one process

    @property
    def key(self):
        return f"{self.shape}/{self.name}"


def registry(shapes=("reference", "wide")):
    """All cases in run order (most important first within a shape, limits first)."""
    out = []
    for shape in shapes:
        out += _shape_cases(shape)
    first = ("ds_z3_r50", "mc_hdo_0_fixed")   # peers and diagnostics lead tier 2; our own variants follow
    return sorted(out, key=lambda c: (c.tier, c.name not in first))   # stable otherwise


def _shape_cases(shape):
    """Estimates (est_s) are process wall times seen on an H200 (16 cores): about 8-9 s of process start, CUDA
    context and model build per case, plus warm-up and timed steps."""
    tiny, wide, ref = shape == "tiny", shape == "wide", shape == "reference"
    sh = H.shapes()[shape]
    act_n = sh["act_n"]
    act_t = {4, 8, 15} if ref else set(act_n)          # layer counts that carry a target (tier 1)
    fracs = (0.25, 0.5, 1.0)
    cn = 4 if ref else 2 if wide else 1                # the combined setting's layer count
    C = []

    def add(name, group, fn, tier=1, **kw):
        C.append(Case(name, shape, group, fn, tier=tier, **kw))

    if not wide:   # the limits are the machine's, measured once per run
        add("pcie", "limits", "cases:pcie", quick=True, cuda_only=True, est_s=10, budget_s=60)
        add("cpuadam", "limits", "cases:cpuadam", quick=True, needs_ds_build=True, est_s=21, budget_s=120,
            params=dict(n=2_000_000 if tiny else 100_000_000))
    add("base", "baseline", "cases:base", quick=True, est_s=13, label="no offload (fp32 weights, bf16 autocast)")
    add("base_bf16", "baseline", "cases:base_bf16", quick=not wide, est_s=10, loss_ref="base_bf16",
        tier=1 if not wide else 2, label="no offload (bf16 weights, fp32 master, GPU AdamW)")
    add("profile", "limits", "cases:profile", quick=True, est_s=8, label="per-layer times and bytes")
    # ours: activations, and torch's save_on_cpu on the same layers
    for n in act_n:
        add(f"ours_act_{n}", "ours", "cases:ours_act", tier=1 if n in act_t else 2, params=dict(n=n),
            quick=n == 4, mode="act", est_s=10 + int(1.5 * n), budget_s=90,
            label=f"ds_offload activations N={n}")
    for n in act_n:
        add(f"save_on_cpu_{n}", "peer", "peers:save_on_cpu", tier=1 if n in act_t else 2, params=dict(n=n),
            quick=n == 4, mode="act_peer", est_s=11 + int(1.4 * n), budget_s=90,
            label=f"torch save_on_cpu first {n} layers")
    # ours: optimizer (bf16 parameters, fp32 masters inside)
    if not wide:
        add("ours_opt_f0", "ours", "cases:ours_opt", params=dict(f=0.0, overlap=True, torch_opt=False),
            needs_ds_build=True, mode="opt", est_s=11, budget_s=120, loss_ref="base_bf16",
            label="ds_offload optimizer f=0 (DS CPU Adam, bf16+fp32 master)")
    for f in fracs:
        for ov in (True, False):
            if wide and (not ov or f != 0.5):
                continue
            add(f"ours_opt_f{int(f * 100)}{'' if ov else '_noovl'}", "ours", "cases:ours_opt",
                tier=1 if ov and not wide else 2, params=dict(f=f, overlap=ov, torch_opt=False),
                needs_ds_build=True, mode="opt", quick=(f == 0.5 and ov and not wide), est_s=12 + int(12 * f),
                budget_s=120, loss_ref="base_bf16",
                label=f"ds_offload optimizer f={f} DS CPU Adam, overlap {'on' if ov else 'off'}")
    if not wide:  # opt-in mode: the CPU step starts inside backward (nothing may touch grads before step())
        for f in (0.5, 1.0):
            add(f"ours_opt_f{int(f * 100)}_sib", "ours", "cases:ours_opt", tier=1 if f == 0.5 else 2,
                params=dict(f=f, overlap=True, torch_opt=False, step_in_backward=True), needs_ds_build=True,
                mode="opt", est_s=12 + int(12 * f), budget_s=120, loss_ref="base_bf16",
                label=f"ds_offload optimizer f={f} DS CPU Adam, step_in_backward")
    for f in fracs:
        if wide and f != 0.5:
            continue
        add(f"ours_opt_f{int(f * 100)}_torch", "ours", "cases:ours_opt", tier=2,
            params=dict(f=f, overlap=True, torch_opt=True), mode="opt", est_s=12 + int(12 * f), budget_s=120,
            loss_ref="base_bf16", label=f"ds_offload optimizer f={f} torch fused AdamW, overlap on")
    add("ours_combined", "ours", "cases:ours_combined", tier=2, params=dict(n=cn, f=0.5),
        needs_ds_build=True, mode="combined", est_s=20, budget_s=120, loss_ref="base_bf16",
        label=f"ds_offload activations N={cn} + optimizer f=0.5 (direct API)")
    if not wide:
        add("ours_combined_engine", "ours", "cases:ours_combined_engine", tier=2, params=dict(n=cn, f=0.5),
            needs_ds_build=True, mode="combined", est_s=30, budget_s=150, loss_ref="base_bf16",
            label=f"ds_offload.initialize ZeRO-2 bf16, activations N={cn} + optimizer f=0.5")
    if not wide:  # the optimizer offload through ds_offload.initialize (ZeRO-1, bf16, clipping on) and its baseline
        add("engine_plain_z1", "baseline", "cases:engine_plain", tier=2, params=dict(stage=1), est_s=25,
            budget_s=120, mode="opt", loss_ref="engine_plain_z1", label="plain DeepSpeed ZeRO-1 bf16, clipping 1.0")
        for f in fracs:
            add(f"ours_engine_opt_f{int(f * 100)}", "ours", "cases:ours_engine_opt", tier=2,
                params=dict(stage=1, f=f), needs_ds_build=True, mode="opt", est_s=28 + int(10 * f), budget_s=150,
                loss_ref="engine_plain_z1", label=f"ds_offload.initialize ZeRO-1 bf16 clip 1.0, optimizer f={f}")
            add(f"ours_engine_opt_f{int(f * 100)}_ov", "ours", "cases:ours_engine_opt", tier=2,
                params=dict(stage=1, f=f, overlap=True), needs_ds_build=True, mode="opt", est_s=28 + int(10 * f),
                budget_s=150, loss_ref="engine_plain_z1",
                label=f"ds_offload.initialize ZeRO-1 bf16 clip 1.0, optimizer f={f}, CPU step behind the next forward")
        for n, acts, ov in ((4, False, False), (8, False, False), (8, True, False)):
            tag = ("_acts" if acts else "") + ("_ov" if ov else "")
            add(f"ours_engine_weights_n{n}{tag}", "ours", "cases:ours_engine_weights", tier=2,
                params=dict(stage=1, n=n, acts=acts, overlap=ov), needs_ds_build=True, mode="weights", est_s=35,
                budget_s=150, loss_ref="engine_plain_z1",
                label=f"ds_offload.initialize ZeRO-1 bf16 clip 1.0, weights N={n}" + (" + activations" if acts else "")
                + (", CPU step behind the next forward" if ov else ""))
        add("engine_plain_z2", "baseline", "cases:engine_plain", tier=2, params=dict(stage=2), est_s=25,
            budget_s=120, mode="opt", loss_ref="engine_plain_z2", label="plain DeepSpeed ZeRO-2 bf16, clipping 1.0")
        add("ours_engine_opt_z2_f50_ov", "ours", "cases:ours_engine_opt", tier=2,
            params=dict(stage=2, f=0.5, overlap=True), needs_ds_build=True, mode="opt", est_s=33, budget_s=150,
            loss_ref="engine_plain_z2",
            label="ds_offload.initialize ZeRO-2 bf16 clip 1.0, optimizer f=0.5, CPU step behind the next forward")
    # peers: optimizer offload
    for f in (0.0,) + fracs:
        if wide and f != 0.5:
            continue
        add(f"mc_hdo_{int(f * 100)}", "peer", "peers:megatron_hdo", tier=1 if not wide else 2, params=dict(f=f),
            cuda_only=True, est_s=10 + int(13 * f), budget_s=120, mode="opt_peer", loss_ref="base_bf16",
            quick=(f == 0.5), label=f"megatron-core HybridDeviceOptimizer f={f}")
    add("torchao_offload", "peer", "peers:torchao_offload", tier=1 if not wide else 2, cuda_only=True, est_s=20,
        budget_s=90, mode="opt_peer", label="torchao CPUOffloadOptimizer (offload_gradients)")
    add("ds_z2_offload", "peer", "peers:deepspeed_zero", tier=1 if not wide else 2, params=dict(stage=2),
        cuda_only=True, needs_ds_build=True, est_s=32, budget_s=180, mode="opt_peer", loss_ref="base_bf16",
        quick=False, label="DeepSpeed ZeRO-2 offload_optimizer cpu")
    if not wide:
        add("ds_z3_r50", "peer", "peers:deepspeed_zero", tier=2,
            params=dict(stage=3, ratio=0.5, sub_group_size=50_000_000 if not tiny else 20_000), cuda_only=True,
            needs_ds_build=True, est_s=32, budget_s=200, mode="opt_peer", loss_ref="base_bf16",
            label="DeepSpeed ZeRO-3 offload_optimizer ratio 0.5, sub_group_size 5e7")
        # diagnostics of Megatron's loss-parity anomaly at f = 0 / 0.25: peer or harness?
        for f, ov, fix in ((0.0, False, False), (0.0, True, True), (0.25, False, False), (0.25, True, True)):
            add(f"mc_hdo_{int(f * 100)}_{'fixed' if fix else 'noovl'}", "diag", "peers:megatron_hdo",
                tier=1 if (f, fix) == (0.0, False) else 2 if f == 0 else 3,
                params=dict(f=f, overlap=ov, fix_stream=fix), cuda_only=True, est_s=11 + int(13 * f),
                mode="opt_peer", loss_ref="base_bf16",
                label=f"megatron HDO f={f} " + ("overlap on + stream-wait fix" if fix else "overlap off"))
    for c in C:
        if tiny:
            c.est_s = max(5, c.est_s // 2)
        elif wide:
            c.est_s = int(c.est_s * 1.1)
        c.label = c.label or c.name
    return C


def select(cases, quick=False, only=None, skip=None, tiers=None):
    """The cases kept by the filters; of a case group, the members the globs keep (a glob that names the group
    keeps all of them), and the group only if any is left."""
    import dataclasses
    import fnmatch

    def match(c, pats, extra=()):
        tags = {c.name, c.key, c.group, c.mode, c.shape, *extra}
        return any(fnmatch.fnmatch(t, pat) for pat in pats for t in tags if t)
    out = []
    for c in cases:
        if quick and not c.quick:
            continue
        if tiers and c.tier not in tiers:
            continue
        if c.members is not None:
            whole = {c.name, c.key}
            ms = [m for m in c.members
                  if (not only or match(m, only, whole)) and not (skip and match(m, skip, whole))]
            if ms:
                out.append(dataclasses.replace(c, members=ms, est_s=8 + sum(m.est_s for m in ms)))
            continue
        if only and not match(c, only):
            continue
        if skip and match(c, skip):
            continue
        out.append(c)
    return out


# ---------------------------------------------------------------------------------------------- limits


def pcie(shape, warm, steps, nbytes=1 << 30):
    n = nbytes
    out = {"bytes": n}
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    reps = 5
    for pinned in (True, False):
        host = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
        host.fill_(1)
        for name, fn in (("h2d", lambda: dev.copy_(host, non_blocking=True)),
                         ("d2h", lambda: host.copy_(dev, non_blocking=True))):
            fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(reps if pinned else 2):
                fn()
            torch.cuda.synchronize()
            out[f"{name}_{'pinned' if pinned else 'pageable'}_gbs"] = round(
                (reps if pinned else 2) * n / (time.perf_counter() - t) / 1e9, 1)
        host = None
    h1, h2 = (torch.empty(n, dtype=torch.uint8, pin_memory=True) for _ in range(2))
    d2 = torch.empty_like(dev)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        with torch.cuda.stream(s1):
            dev.copy_(h1, non_blocking=True)
        with torch.cuda.stream(s2):
            h2.copy_(d2, non_blocking=True)
    torch.cuda.synchronize()
    out["bidir_total_gbs"] = round(2 * reps * n / (time.perf_counter() - t) / 1e9, 1)
    return out


def cpuadam(shape, warm, steps, n=100_000_000):
    """CPU Adam throughput on the host's cores: DeepSpeed's op and torch's fused AdamW (M params/s)."""
    out = {"threads": torch.get_num_threads(), "n": n}

    def ds(p):
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(p, lr=H.LR, weight_decay=H.WD, adamw_mode=True)

    for name, mk in (("torch_fused", lambda p: torch.optim.AdamW(p, lr=H.LR, weight_decay=H.WD, fused=True)),
                     ("ds_cpu_adam", ds)):
        try:
            p = [torch.nn.Parameter(torch.randn(n))]
            p[0].grad = torch.randn(n)
            t0 = time.perf_counter()
            o = mk(p)
            o.step()
            first = time.perf_counter() - t0
            t = time.perf_counter()
            for _ in range(3):
                o.step()
            dt = (time.perf_counter() - t) / 3
            out[name] = dict(first_s=round(first, 2), mparam_per_s=round(n / dt / 1e6))
            del o, p
        except Exception as e:
            out[name] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    return out


def profile(shape, warm, steps, min_bytes=1 << 20):
    """Per-layer forward / backward times and saved bytes (the inputs of the activation bound), the
    model's forward and backward split, all with fp32 weights under bf16 autocast."""
    cuda = torch.cuda.is_available()
    m = H.build_model(shape)
    idx, tgt = H.batch(shape)
    L = len(m.blocks)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    seen, saved = set(), {"bytes": 0, "count": 0}

    def pack(t):
        if isinstance(t, torch.nn.Parameter):
            return t
        nb = t.untyped_storage().nbytes()
        key = t.untyped_storage().data_ptr()
        if nb >= min_bytes and key not in seen:
            seen.add(key)
            saved["bytes"] += nb
            saved["count"] += 1
        return t

    with H.autocast():
        x = m.emb(idx).detach().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = m.blocks[1 if L > 1 else 0](x)
    del y
    out = {"saved_bytes_per_layer": saved["bytes"], "saved_tensors_per_layer": saved["count"], "layers": L,
           "params": sum(p.numel() for p in m.parameters())}
    blk = m.blocks[1 if L > 1 else 0]
    g = torch.randn_like(x, dtype=torch.bfloat16 if cuda else x.dtype)

    def med(fn, n=5):
        ts = []
        for _ in range(2):
            fn()
        for _ in range(n):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        return sorted(ts)[len(ts) // 2]

    def blk_fwd():
        with H.autocast():
            blk(x)

    def blk_fwd_bwd():
        with H.autocast():
            y = blk(x)
        y.backward(g.to(y.dtype))
    out["layer_fwd_s"] = round(med(blk_fwd), 5)
    out["layer_fwdbwd_s"] = round(med(blk_fwd_bwd), 5)
    out["layer_bwd_s"] = round(out["layer_fwdbwd_s"] - out["layer_fwd_s"], 5)
    m.zero_grad(set_to_none=True)
    fs, bs = [], []
    for i in range(2 + 5):
        sync()
        t0 = time.perf_counter()
        with H.autocast():
            loss = m(idx, tgt)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        m.zero_grad(set_to_none=True)
        if i >= 2:
            fs.append(t1 - t0)
            bs.append(t2 - t1)
    out["fwd_s"], out["bwd_s"] = round(sorted(fs)[2], 5), round(sorted(bs)[2], 5)
    return out


# ---------------------------------------------------------------------------------------------- baselines


def base(shape, warm, steps):
    m = H.build_model(shape)
    opt = torch.optim.AdamW(m.parameters(), lr=H.LR, weight_decay=H.WD, betas=H.BETAS, eps=H.EPS,
                            fused=torch.cuda.is_available())
    idx, tgt = H.batch(shape)
    r = H.measure(H.torch_train_step(m, opt, idx, tgt), shape, warm, steps)
    r["params"] = sum(p.numel() for p in m.parameters())
    return r


class MasterAdamW:
    """No-offload reference for the bf16-parameter cases: bf16 model, fp32 master copies stepped by a
    fused AdamW on the GPU, copied back into the bf16 parameters (what the hybrid optimizers do at f=0)."""

    def __init__(self, params, **kw):
        self.params = [p for p in params if p.requires_grad]
        self.masters = [p.detach().float() for p in self.params]
        for mp in self.masters:
            mp.requires_grad_(True)
        self.opt = torch.optim.AdamW(self.masters, fused=torch.cuda.is_available(), **kw)

    def step(self):
        for p, mp in zip(self.params, self.masters):
            mp.grad = None if p.grad is None else p.grad.float()
        self.opt.step()
        with torch.no_grad():
            for p, mp in zip(self.params, self.masters):
                p.copy_(mp)

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None
        for mp in self.masters:
            mp.grad = None


def base_bf16(shape, warm, steps):
    m = H.build_model(shape, torch.bfloat16)
    opt = MasterAdamW(m.parameters(), lr=H.LR, weight_decay=H.WD, betas=H.BETAS, eps=H.EPS)
    idx, tgt = H.batch(shape)
    return H.measure(H.torch_train_step(m, opt, idx, tgt, use_autocast=False), shape, warm, steps)


# ---------------------------------------------------------------------------------------------- ours


def _install_act(m, n, **kw):
    from ds_offload.activations import install_layer_offload
    args = dict(min_offload_bytes=1 << 20, prefetch_depth=1, double_buffering=False, retain_pinned_buffers=False)
    args.update(kw)
    return install_layer_offload(m.blocks, n, **args)


def _stats(h):
    try:
        s = h.stats()
        return {"offload_stats": s if isinstance(s, dict) else str(s)[:500]}
    except Exception as e:
        return {"offload_stats_error": f"{type(e).__name__}: {e}"[:300]}


def ours_act(shape, warm, steps, n, **kw):
    m = H.build_model(shape)
    h = _install_act(m, n, **kw)
    opt = torch.optim.AdamW(m.parameters(), lr=H.LR, weight_decay=H.WD, betas=H.BETAS, eps=H.EPS,
                            fused=torch.cuda.is_available())
    idx, tgt = H.batch(shape)
    r = H.measure(H.torch_train_step(m, opt, idx, tgt), shape, warm, steps)
    r.update(_stats(h))
    h.remove()
    return r


def _hdo(params, f, overlap, torch_opt, step_in_backward=False):
    from ds_offload.optimizer import HybridDeviceOptimizer
    return HybridDeviceOptimizer(params, offload_fraction=f, lr=H.LR, betas=H.BETAS, eps=H.EPS, weight_decay=H.WD,
                                 overlap_cpu_optimizer_d2h_h2d=overlap, use_torch_optimizer_for_cpu_offload=torch_opt,
                                 step_in_backward=step_in_backward, defer_weight_updates=True)


def ours_opt(shape, warm, steps, f, overlap=True, torch_opt=False, step_in_backward=False):
    m = H.build_model(shape, torch.bfloat16)
    t = time.perf_counter()
    opt = _hdo(list(m.parameters()), f, overlap, torch_opt, step_in_backward)
    init_s = time.perf_counter() - t
    idx, tgt = H.batch(shape)
    return H.measure(H.torch_train_step(m, opt, idx, tgt, use_autocast=False), shape, warm, steps,
                     extra=dict(init_s=round(init_s, 2), fraction=f, overlap=overlap, torch_opt=torch_opt,
                                step_in_backward=step_in_backward))


def ours_combined(shape, warm, steps, n, f):
    m = H.build_model(shape, torch.bfloat16)
    h = _install_act(m, n)
    opt = _hdo(list(m.parameters()), f, True, False)
    idx, tgt = H.batch(shape)
    r = H.measure(H.torch_train_step(m, opt, idx, tgt, use_autocast=False), shape, warm, steps,
                  extra=dict(fraction=f, n=n))
    r.update(_stats(h))
    return r


def combined_engine_config(shape, n, f):
    """The DeepSpeed config `ours_combined_engine` runs (also what benchmarks/estimate_check.py estimates)."""
    block = {"model": {"cpu_offloading": True, "cpu_offloading_num_layers": n, "cpu_offloading_activations": True},
             "optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": f,
                           "overlap_cpu_optimizer_d2h_h2d": True}}
    return H.engine_config(shape, {"stage": 2}, cpu_offloading=block)


def ours_combined_engine(shape, warm, steps, n, f):
    import ds_offload
    H.init_dist_env()
    cfg = combined_engine_config(shape, n, f)
    return H.deepspeed_engine_case(ds_offload.initialize, shape, warm, steps, cfg["zero_optimization"],
                                   cpu_offloading=cfg["cpu_offloading"], extra=dict(fraction=f, n=n))


def engine_plain(shape, warm, steps, stage):
    """Plain DeepSpeed of the engine-path optimizer cases' config."""
    import deepspeed
    H.init_dist_env()
    return H.deepspeed_engine_case(deepspeed.initialize, shape, warm, steps, {"stage": stage}, gradient_clipping=1.0)


def ours_engine_opt(shape, warm, steps, stage, f, overlap=False):
    """The same config with `cpu_offloading.optimizer` at fraction `f`, through ds_offload.initialize."""
    import ds_offload
    H.init_dist_env()
    block = {"optimizer": {"optimizer_cpu_offload": True, "optimizer_offload_fraction": f,
                           "overlap_cpu_optimizer_d2h_h2d": overlap}}
    return H.deepspeed_engine_case(ds_offload.initialize, shape, warm, steps, {"stage": stage},
                                   extra=dict(fraction=f, overlap=overlap), gradient_clipping=1.0,
                                   cpu_offloading=block)


def ours_engine_weights(shape, warm, steps, stage, n, acts=False, overlap=False):
    """The same config with the first `n` layers' weights (and activations with `acts`) offloaded."""
    import ds_offload
    H.init_dist_env()
    block = {"model": {"cpu_offloading": True, "cpu_offloading_num_layers": n, "cpu_offloading_activations": acts,
                       "cpu_offloading_weights": True}}
    if overlap:
        block["optimizer"] = {"overlap_cpu_optimizer_d2h_h2d": True}
    return H.deepspeed_engine_case(ds_offload.initialize, shape, warm, steps, {"stage": stage},
                                   extra=dict(n=n, acts=acts, overlap=overlap), gradient_clipping=1.0,
                                   cpu_offloading=block)
