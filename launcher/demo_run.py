"""`ds-offload demo`'s runner: the embedded GPT trained twice on the same synthetic data, without offload and with a config.

Both runs go through `ds_offload.initialize` (the baseline with the `cpu_offloading` block removed, which is
plain DeepSpeed), start from the same weights and see the same batches, so their losses should agree within
the Megatron Bridge criterion (max delta < 1e-3) while the offloaded run uses less GPU memory.
"""
import contextlib
import dataclasses
import gc
import json
import logging
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

LOSS_CRITERION = 1e-3

# The demo models (shapes in ds_offload.models.GPT_SHAPES): tiny on CPU (seconds), small on a GPU (memory
# differences become visible).
DEMO_MODELS = ("tiny-gpt", "small-gpt", "reference-gpt")


@dataclass
class RunResult:
    label: str
    losses: list = field(default_factory=list)
    step_times: list = field(default_factory=list)
    gpu_peak_per_step: list = field(default_factory=list)   # bytes above what was allocated before the run;
    #                                                         None without CUDA
    cpu_rss_per_step: list = field(default_factory=list)    # bytes
    summary: str = ""

    @property
    def final_loss(self):
        return self.losses[-1] if self.losses else float("nan")

    @property
    def step_time(self):
        """Median seconds per optimizer step, leaving out the first (warm-up, JIT, allocation)."""
        times = self.step_times[1:] or self.step_times
        return statistics.median(times) if times else float("nan")

    @property
    def gpu_peak(self):
        vals = [v for v in self.gpu_peak_per_step if v is not None]
        return max(vals) if vals else None

    @property
    def cpu_peak(self):
        return max(self.cpu_rss_per_step) if self.cpu_rss_per_step else None

    def as_dict(self):
        return {"label": self.label, "losses": self.losses, "step_times": self.step_times,
                "gpu_peak_per_step": self.gpu_peak_per_step, "cpu_rss_per_step": self.cpu_rss_per_step,
                "final_loss": self.final_loss, "step_time": self.step_time, "gpu_peak": self.gpu_peak,
                "cpu_peak": self.cpu_peak, "summary": self.summary}


def rss_bytes():
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def init_distributed():
    import torch
    import deepspeed
    from ds_offload.single_process import ensure_single_process_env
    if not torch.distributed.is_initialized():
        ensure_single_process_env()
        deepspeed.init_distributed(dist_backend=None if torch.cuda.is_available() else "gloo",
                                   verbose=False)


def quiet_deepspeed():
    try:
        from deepspeed.utils import logger
        logger.setLevel(logging.WARNING)
    except ImportError:  # pragma: no cover
        pass


def train(model_cfg, config, steps, label, seed=0, progress=None):
    """Train a fresh GPT(model_cfg) for `steps` optimizer steps under `config`; returns a RunResult."""
    import torch
    import ds_offload
    from ds_offload.models import GPT, synthetic_batch

    init_distributed()
    cuda = torch.cuda.is_available()
    if cuda:  # what an earlier run left allocated is not this run's memory
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    start_alloc = torch.cuda.memory_allocated() if cuda else 0
    torch.manual_seed(seed)
    model = GPT(model_cfg)
    engine, _, _, _ = ds_offload.initialize(model=model, model_parameters=model.parameters(), config=config)
    res = RunResult(label=label, summary=engine.ds_offload.summary())
    gas, mb = engine.gradient_accumulation_steps(), engine.train_micro_batch_size_per_gpu()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    engine.train()
    try:
        for step in range(steps):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            total = 0.0
            for micro in range(gas):
                idx, tgt = synthetic_batch(model_cfg, mb * world, step * gas + micro, device="cpu")
                idx, tgt = idx[rank * mb:(rank + 1) * mb].to(engine.device), tgt[rank * mb:(rank + 1) * mb].to(engine.device)
                loss = engine(idx, tgt)
                engine.backward(loss)
                engine.step()
                total += float(loss.detach().float())
            if cuda:
                torch.cuda.synchronize()
            res.step_times.append(time.perf_counter() - t0)
            res.losses.append(total / gas)
            res.gpu_peak_per_step.append(torch.cuda.max_memory_allocated() - start_alloc if cuda else None)
            res.cpu_rss_per_step.append(rss_bytes())
            if progress:
                progress(res)
    finally:
        engine.ds_offload.remove()
        with contextlib.suppress(Exception):  # teardown must not hide the run's own outcome
            engine.ds_offload.close()          # the hooks are gone already: this stops the CPU optimizer
        del engine, model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return res


def load_demo_config(path):
    """The config as an OffloadConfig (ConfigError if invalid); its warnings come once, from the offloaded run."""
    from ds_offload.config import load_config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_config(path)


def model_for(config, name=None):
    """The demo GPT: `name` from DEMO_MODELS (default tiny on CPU, small on a GPU), deep enough for the
    config's (an OffloadConfig) cpu_offloading_num_layers (offloading needs at least one layer left on the GPU)."""
    import torch
    from ds_offload.models import GPT_SHAPES
    name = name or ("small-gpt" if torch.cuda.is_available() else "tiny-gpt")
    shape = GPT_SHAPES[name]
    n = int(config.model.cpu_offloading_num_layers)
    return name, dataclasses.replace(shape, num_layers=max(shape.num_layers, n + 1))


def compare(base, off):
    """Max |loss delta| over the steps both runs made; NaN when either run produced a non-finite loss."""
    import math
    n = min(len(base.losses), len(off.losses))
    deltas = [abs(a - b) for a, b in zip(base.losses[:n], off.losses[:n])]
    if not deltas or any(not math.isfinite(d) for d in deltas):
        return float("nan")
    return max(deltas)


def fmt_mib(n):
    return "n/a: no GPU" if n is None else f"{n / 2 ** 20:,.0f} MiB"


def table(base, off, config_name):
    delta = compare(base, off)
    ok = bool(delta < LOSS_CRITERION)  # False for NaN
    rows = [("", "no offload", f"with {config_name}"),
            ("final loss", f"{base.final_loss:.5f}", f"{off.final_loss:.5f}"),
            ("max |loss delta|", "-", (f"{delta:.2e}" if delta == delta else "non-finite loss") +
             f" ({'PASS' if ok else 'FAIL'}: < {LOSS_CRITERION:g})"),
            ("step time (median)", f"{base.step_time * 1e3:.1f} ms", f"{off.step_time * 1e3:.1f} ms"),
            ("peak GPU memory", fmt_mib(base.gpu_peak), fmt_mib(off.gpu_peak)),
            ("CPU memory (peak RSS)", fmt_mib(base.cpu_peak).replace("n/a: no GPU", "n/a"),
             fmt_mib(off.cpu_peak).replace("n/a: no GPU", "n/a"))]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [line]
    for i, r in enumerate(rows):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            out.append(line)
    out.append(line)
    return "\n".join(out), ok, delta


def plot(base, off, config_name, path):
    """loss curves (left) and memory per step (right); returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    steps = range(1, len(base.losses) + 1)
    a.plot(steps, base.losses, label="no offload", lw=2)
    a.plot(range(1, len(off.losses) + 1), off.losses, "--", label=f"with {config_name}", lw=2)
    a.set(xlabel="step", ylabel="loss", title="training loss")
    a.legend()
    gpu = base.gpu_peak is not None
    key = "gpu_peak_per_step" if gpu else "cpu_rss_per_step"
    for r, style in ((base, "-"), (off, "--")):
        vals = [v / 2 ** 20 for v in getattr(r, key)]
        b.plot(range(1, len(vals) + 1), vals, style, label=r.label, lw=2)
    from matplotlib.ticker import MaxNLocator
    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    b.set(xlabel="step", ylabel="MiB", title="peak GPU memory per step" if gpu else "CPU RSS per step (no GPU)")
    b.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def run_demo(config_path, steps=30, out="out/demo", model=None, echo=print, progress_factory=None):
    """Both runs, the table and the plot; returns a dict (also saved as demo.json in `out`)."""
    quiet_deepspeed()
    config = load_demo_config(config_path)
    name, model_cfg = model_for(config, model)
    base_cfg = config.deepspeed_config()
    cfg_name = Path(config_path).name
    echo(f"demo: {name} ({model_cfg.num_layers} layers, hidden {model_cfg.hidden}, seq {model_cfg.seq_len}), "
         f"{steps} steps, synthetic data; config {config_path}")
    results = []
    for label, cfg in (("no offload", base_cfg), (f"with {cfg_name}", str(config_path))):
        if progress_factory:
            with progress_factory(label, steps) as bar:
                r = train(model_cfg, cfg, steps, label, progress=bar)
        else:
            r = train(model_cfg, cfg, steps, label)
        results.append(r)
    base, off = results
    text, ok, delta = table(base, off, cfg_name)
    echo(text)
    if off.summary:
        echo(off.summary)
    png = plot(base, off, cfg_name, Path(out) / "demo.png")
    echo(f"plot: {png}" if png else "plot: skipped (pip install matplotlib)")
    report = {"config": str(config_path), "model": name, "steps": steps, "max_loss_delta": delta,
              "criterion": LOSS_CRITERION, "pass": ok, "runs": [r.as_dict() for r in results], "plot": png}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "demo.json").write_text(json.dumps(report, indent=2))
    echo(f"results: {Path(out) / 'demo.json'}")
    return report
