"""`ds-offload doctor`: measure what offloading depends on, on this machine, and say what it means."""
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import time
from pathlib import Path

import click

from . import CONTEXT


def default_measurements_path():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ds_offload", "doctor.json")


def _host_memory():
    info = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                k, v = line.split(":", 1)
                info[k] = int(v.split()[0]) * 1024
    except OSError:
        return None, None
    return info.get("MemTotal"), info.get("MemAvailable")


def _memlock():
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    fmt = lambda v: "unlimited" if v == resource.RLIM_INFINITY else v  # noqa: E731
    return fmt(soft), fmt(hard)


def _pcie():
    if not shutil.which("nvidia-smi"):
        return None
    q = "pcie.link.gen.current,pcie.link.width.current,pcie.link.gen.max,pcie.link.width.max"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        gen, width, gmax, wmax = [x.strip() for x in out.split(",")]
        return {"gen": gen, "width": width, "gen_max": gmax, "width_max": wmax}
    except Exception:
        return None


def _copy_bandwidth(torch, nbytes, pinned, direction, reps):
    """GB/s of a host<->device copy of nbytes, best of reps (timed with CUDA events)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    best = None
    for _ in range(reps + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if direction == "h2d":
            dev.copy_(host, non_blocking=pinned)
        else:
            host.copy_(dev, non_blocking=pinned)
        end.record()
        end.synchronize()
        secs = start.elapsed_time(end) / 1e3
        best = secs if best is None else min(best, secs)
    return nbytes / best / 1e9


def _adam_rate(step_fn, numel, reps):
    step_fn()  # warm-up (allocates state)
    t0 = time.perf_counter()
    for _ in range(reps):
        step_fn()
    return numel * reps / (time.perf_counter() - t0)


def _torch_adam(torch, numel, reps, fused):
    p = torch.nn.Parameter(torch.zeros(numel))
    p.grad = torch.randn(numel) * 1e-3
    kw = {"fused": True} if fused else {"foreach": True}
    try:
        opt = torch.optim.AdamW([p], lr=1e-3, **kw)
        return _adam_rate(opt.step, numel, reps), ("fused" if fused else "foreach")
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW([p], lr=1e-3)
        return _adam_rate(opt.step, numel, reps), "default"


def _deepspeed_cpu_adam(torch, numel, reps, allow_build, echo):
    from deepspeed.ops.op_builder import CPUAdamBuilder
    builder = CPUAdamBuilder()
    if not allow_build and not _op_cached("cpu_adam"):
        return None, "not built (run `ds-offload build-ops`, or doctor without --no-build)"
    if not _op_cached("cpu_adam"):
        echo("  building DeepSpeed's CPU Adam op (first use; ~60 s on 2 cores, cached afterwards)...")
    builder.load(verbose=False)
    from deepspeed.ops.adam import DeepSpeedCPUAdam
    p = torch.nn.Parameter(torch.zeros(numel))
    p.grad = torch.randn(numel) * 1e-3
    opt = DeepSpeedCPUAdam([p], lr=1e-3, adamw_mode=True)
    return _adam_rate(opt.step, numel, reps), "ok"


def _op_cached(name):
    from .build_ops import op_cache_dir
    d = op_cache_dir(name)
    return d is not None and any(Path(d).glob("*.so"))


@click.command(context_settings=CONTEXT)
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Where to save the measurements (default: ~/.cache/ds_offload/doctor.json); "
                   "`ds-offload estimate --measured` reads them.")
@click.option("--quick", is_flag=True, help="Smaller buffers and fewer repetitions (a few seconds).")
@click.option("--no-build", is_flag=True, help="Skip DeepSpeed's CPU Adam if its op is not built yet.")
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON.")
def doctor(out, quick, no_build, as_json):
    """Measure this machine for offloading: GPU and PCIe link, pinned and pageable copy bandwidth each way,
    CPU Adam throughput (DeepSpeed op and torch fused), free host memory and the pinned-memory limit.

    Prints what each figure means for offloading and saves them for `ds-offload estimate --measured`.
    """
    import torch
    echo = (lambda *a, **k: None) if as_json else click.echo
    res = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host": platform.node(), "torch": torch.__version__}
    try:
        import deepspeed
        res["deepspeed"] = deepspeed.__version__
    except Exception:
        res["deepspeed"] = None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    res["cpu_cores"] = cores
    res["host_memory_total_bytes"], res["host_memory_available_bytes"] = _host_memory()
    res["memlock_soft"], res["memlock_hard"] = _memlock()

    cuda = torch.cuda.is_available()
    res["gpu"] = torch.cuda.get_device_name(0) if cuda else None
    res["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory if cuda else None
    res["pcie"] = _pcie() if cuda else None
    nbytes = (64 if quick else 512) * 1024 ** 2
    reps = 3 if quick else 10
    for pinned in (True, False):
        for direction in ("h2d", "d2h"):
            key = f"{'pinned' if pinned else 'pageable'}_{direction}_gbps"
            res[key] = round(_copy_bandwidth(torch, nbytes, pinned, direction, reps), 2) if cuda else None

    numel = (4 if quick else 32) * 1024 ** 2
    areps = 3 if quick else 5
    echo(f"measuring CPU Adam on {numel / 1e6:.0f} M fp32 elements, {cores} core(s)...")
    rate, kind = _torch_adam(torch, numel, areps, fused=True)
    res["torch_adam_params_per_s"], res["torch_adam_impl"] = round(rate), kind
    try:
        rate, status = _deepspeed_cpu_adam(torch, numel, areps, not no_build, echo)
    except Exception as e:  # compiler missing, incompatible CPU, ...
        rate, status = None, f"failed: {type(e).__name__}: {e}"
    res["deepspeed_cpu_adam_params_per_s"] = round(rate) if rate else None
    res["deepspeed_cpu_adam_status"] = status

    path = out or default_measurements_path()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(res, indent=2) + "\n")
    res["saved_to"] = path
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    _explain(res)


def _gb(n):
    return "n/a" if n is None else f"{n / 1024 ** 3:.1f} GiB"


def _explain(r):
    na = "n/a: no GPU"
    click.echo("")
    click.echo(f"GPU                 {r['gpu'] or na}" + (f", {_gb(r['gpu_memory_bytes'])}" if r["gpu"] else ""))
    p = r["pcie"]
    click.echo("PCIe link           " + (f"gen {p['gen']} x{p['width']} (max gen {p['gen_max']} x{p['width_max']})"
                                         if p else (na if not r["gpu"] else "unknown (no nvidia-smi)")))
    for kind in ("pinned", "pageable"):
        h2d, d2h = r[f"{kind}_h2d_gbps"], r[f"{kind}_d2h_gbps"]
        val = na if h2d is None else f"host->GPU {h2d:.1f} GB/s, GPU->host {d2h:.1f} GB/s"
        click.echo(f"{kind + ' copies':<20}{val}")
    ds = r["deepspeed_cpu_adam_params_per_s"]
    click.echo(f"CPU Adam, DeepSpeed {(f'{ds / 1e6:.0f} M params/s' if ds else r['deepspeed_cpu_adam_status'])}")
    click.echo(f"CPU Adam, torch     {r['torch_adam_params_per_s'] / 1e6:.0f} M params/s ({r['torch_adam_impl']})")
    click.echo(f"CPU cores           {r['cpu_cores']}")
    click.echo(f"host memory         {_gb(r['host_memory_available_bytes'])} free of {_gb(r['host_memory_total_bytes'])}")
    lim = lambda v: v if v == "unlimited" else f"{v / 1024 ** 2:.0f} MiB"  # noqa: E731
    click.echo(f"ulimit -l           {lim(r['memlock_soft'])} (hard {lim(r['memlock_hard'])})")

    click.echo("\nwhat it means:")
    if r["gpu"] is None:
        click.echo("  - no GPU: layer-level offload is a no-op here and the hybrid optimizer runs both shares on the "
                   "CPU; measure on the training machine for real figures.")
    else:
        pin = r["pinned_h2d_gbps"]
        page = r["pageable_h2d_gbps"]
        click.echo(f"  - one GiB of activations or optimizer state moves in about {1.0737 / pin * 1e3:.0f} ms each "
                   f"way pinned; offloaded copies are hidden when a layer's compute takes longer than its copy.")
        if page and pin and pin > 1.5 * page:
            click.echo(f"  - pinned copies are {pin / page:.1f}x faster than pageable: keep pin_cpu_grads/"
                       "pin_cpu_params on.")
        if p and p.get("gen") and p.get("gen_max") and (p["gen"] != p["gen_max"] or p["width"] != p["width_max"]):
            click.echo("  - the link runs below its maximum (it may idle down when the GPU is idle; check under load).")
    rate = ds or r["torch_adam_params_per_s"]
    click.echo(f"  - CPU Adam steps about {rate / 1e9:.2f} B elements/s: a fraction f of a model of N B params adds "
               f"~{1 / (rate / 1e9):.1f} x f x N seconds per step (without overlap of the copies).")
    if ds and ds < r["torch_adam_params_per_s"]:
        click.echo("  - torch's CPU AdamW is faster here: consider use_torch_optimizer_for_cpu_offload=true.")
    avail = r["host_memory_available_bytes"]
    if avail:
        click.echo(f"  - offloaded state needs host memory: each rank's share comes out of the {_gb(avail)} free "
                   "(16 bytes per offloaded optimizer element; activations as `ds-offload estimate` shows).")
    if r["memlock_soft"] != "unlimited":
        click.echo("  - ulimit -l is limited: CUDA's pinned allocations usually bypass it, but RDMA/NCCL and some "
                   "container runtimes honour it; set `ulimit -l unlimited` if pinning fails.")
    click.echo(f"\nsaved to {r['saved_to']} (used by `ds-offload estimate --measured`)")
