"""`ds-offload demo`'s runner: the embedded GPT trained twice on the same synthetic data, without offload and with a config.

Both runs go through `ds_offload.initialize` (the baseline with the `cpu_offloading` block removed, which is
plain DeepSpeed), start from the same weights and see the same batches, so their losses should agree within
the Megatron Bridge criterion (max delta < 1e-3) while the offloaded run uses less GPU memory. The batches come
from `ds_offload.models.learnable_batch`, so that the loss falls and the curves look like training.
"""
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

LOSS_CRITERION = 1e-3
NO_GPU = "n/a: no GPU"

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
    warnings: list = field(default_factory=list)            # what setting the run up warned about, one line each

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
                "cpu_peak": self.cpu_peak, "summary": self.summary, "warnings": self.warnings}


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


def device_name():
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"


def train(model_cfg, config, steps, label, seed=0, progress=None, on_ready=None):
    """Train a fresh GPT(model_cfg) for `steps` optimizer steps under `config`; returns a RunResult.

    `progress(label, steps)`: a context manager giving a callback called with the RunResult after each step;
    it opens after `on_ready(result)`, so what the setup printed comes before the bar, not through it.
    """
    import torch
    import ds_offload
    from ds_offload.models import GPT, learnable_batch

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
        if on_ready:
            on_ready(res)
        with (progress(label, steps) if progress else contextlib.nullcontext()) as bar:
            for step in range(steps):
                batches = []  # made before the clock starts: the step time is the engine's
                for micro in range(gas):
                    idx, tgt = learnable_batch(model_cfg, mb * world, step * gas + micro, device="cpu")
                    batches.append((idx[rank * mb:(rank + 1) * mb].to(engine.device),
                                    tgt[rank * mb:(rank + 1) * mb].to(engine.device)))
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                total = 0.0
                for idx, tgt in batches:
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
                if bar:
                    bar(res)
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


def describe_model(name, c):
    return (f"{name} ({c.num_layers} layers, hidden {c.hidden}, {c.num_heads} heads, seq {c.seq_len}, "
            f"vocab {c.vocab_size})")


def compare(base, off):
    """Max |loss delta| over the steps both runs made; NaN when either run produced a non-finite loss."""
    n = min(len(base.losses), len(off.losses))
    deltas = [abs(a - b) for a, b in zip(base.losses[:n], off.losses[:n])]
    if not deltas or any(not math.isfinite(d) for d in deltas):
        return float("nan")
    return max(deltas)


def figures(base, off):
    """The comparison's numbers, one place for the table, the plot title and demo.json.

    GPU figures are None without CUDA; the saving is the baseline's peak minus the offloaded run's (negative
    when offloading cost memory), its fraction of the baseline's peak."""
    delta = compare(base, off)
    gpu = base.gpu_peak is not None and off.gpu_peak is not None
    saved = base.gpu_peak - off.gpu_peak if gpu else None
    return {"max_loss_delta": delta, "criterion": LOSS_CRITERION, "pass": bool(delta < LOSS_CRITERION),  # NaN: no
            "step_time_ratio": off.step_time / base.step_time if base.step_time > 0 else float("nan"),
            "gpu_peak_baseline": base.gpu_peak, "gpu_peak_offload": off.gpu_peak, "gpu_saved_bytes": saved,
            "gpu_saved_fraction": saved / base.gpu_peak if gpu and base.gpu_peak > 0 else None,
            "cpu_peak_baseline": base.cpu_peak, "cpu_peak_offload": off.cpu_peak}


def fmt_mib(n):
    return "n/a" if n is None else f"{n / 2 ** 20:,.0f} MiB"


def fmt_gib(n):
    return NO_GPU if n is None else f"{n / 2 ** 30:,.2f} GiB"


def verdict(f):
    d = f["max_loss_delta"]
    return (f"{'PASS' if f['pass'] else 'FAIL'}: max |loss delta| "
            f"{f'{d:.2e}' if math.isfinite(d) else 'non-finite loss'} (< {f['criterion']:g})")


def saved_text(f):
    if f["gpu_saved_bytes"] is None:
        return NO_GPU
    frac = f["gpu_saved_fraction"]
    return fmt_gib(f["gpu_saved_bytes"]) + (f" ({frac:.1%} of the baseline peak)" if frac is not None else "")


def table(base, off, config_name):
    """The printed comparison; returns (text, pass, max loss delta)."""
    f = figures(base, off)
    ratio = f["step_time_ratio"]
    rows = [("", "no offload", f"with {config_name}"),
            ("final loss", f"{base.final_loss:.5f}", f"{off.final_loss:.5f}"),
            ("loss parity", "-", verdict(f)),
            ("step time (median)", f"{base.step_time * 1e3:.1f} ms", f"{off.step_time * 1e3:.1f} ms"),
            ("step time ratio", "-", f"{ratio:.2f}x (offload / baseline)" if math.isfinite(ratio) else "n/a"),
            ("peak GPU memory", fmt_gib(base.gpu_peak), fmt_gib(off.gpu_peak)),
            ("GPU memory saved", "-", saved_text(f)),
            ("CPU memory (peak RSS)", fmt_mib(base.cpu_peak), fmt_mib(off.cpu_peak))]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [line]
    for i, r in enumerate(rows):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            out.append(line)
    out.append(line)
    return "\n".join(out), f["pass"], f["max_loss_delta"]


def plot_title(model, config_name, device, f):
    """What the picture is of and whether the runs agreed, so it stands alone when shared."""
    ratio = f["step_time_ratio"]
    trade = f"step time {ratio:.2f}x" if math.isfinite(ratio) else "step time n/a"
    trade += f", GPU memory saved {saved_text(f)}" if f["gpu_saved_bytes"] is not None else ", GPU memory n/a on CPU"
    return f"{model}, {config_name}, on {device}\nloss parity {verdict(f)}; {trade}"


def plot(base, off, config_name, path, title=None):
    """Loss curves (left) and memory per step from zero (right); returns the path, or None without matplotlib.

    The memory axis starts at zero so that a difference of a few percent looks like one; `title` is drawn
    above both and stored in the PNG's Title field."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.6))
    a.plot(range(1, len(base.losses) + 1), base.losses, label="no offload", lw=2)
    a.plot(range(1, len(off.losses) + 1), off.losses, "--", label=f"with {config_name}", lw=2)
    a.set(xlabel="step", ylabel="loss", title="training loss")
    a.legend()
    gpu = base.gpu_peak is not None
    key, unit, scale = ("gpu_peak_per_step", "GiB", 2 ** 30) if gpu else ("cpu_rss_per_step", "MiB", 2 ** 20)
    top = 0
    for r, style in ((base, "-"), (off, "--")):
        vals = [v / scale for v in getattr(r, key)]
        top = max([top] + vals)
        b.plot(range(1, len(vals) + 1), vals, style, label=r.label, lw=2)
    b.set_ylim(0, top * 1.15 or 1)
    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    b.set(xlabel="step", ylabel=unit,
          title="peak GPU memory per step" if gpu else "CPU RSS per step (GPU memory: n/a on CPU)")
    b.legend(loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Title": title} if title else None)
    plt.close(fig)
    return str(path)


def run_demo(config_path, steps=30, out="out/demo", model=None, echo=print, progress_factory=None, on_ready=None):
    """Both runs, the table and the plot; returns a dict (also saved as demo.json in `out`).

    `on_ready(run)`: called with each RunResult once its engine is built, before its steps (see `train`)."""
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    config = load_demo_config(config_path)
    name, model_cfg = model_for(config, model)
    base_cfg = config.deepspeed_config()
    cfg_name = Path(config_path).name
    device, described = device_name(), describe_model(name, model_cfg)
    echo(f"demo: {described}, {steps} steps of learnable synthetic data on {device}; config {config_path}")
    results = [train(model_cfg, cfg, steps, label, progress=progress_factory, on_ready=on_ready)
               for label, cfg in (("no offload", base_cfg), (f"with {cfg_name}", str(config_path)))]
    base, off = results
    echo(table(base, off, cfg_name)[0])
    if off.summary:  # the baseline's is "nothing offloaded"
        echo(f"ds_offload summary ({off.label}): {off.summary.removeprefix('ds_offload: ')}")
    f = figures(base, off)
    title = plot_title(described, cfg_name, device, f)
    png = plot(base, off, cfg_name, Path(out) / "demo.png", title=title)
    echo(f"plot: {png}" if png else "plot: skipped (pip install matplotlib)")
    report = {"config": str(config_path), "model": name, "model_shape": dataclasses.asdict(model_cfg),
              "device": device, "steps": steps, "data": "ds_offload.models.learnable_batch", **f,
              "title": title, "runs": [r.as_dict() for r in results], "plot": png}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "demo.json").write_text(json.dumps(report, indent=2))
    echo(f"results: {Path(out) / 'demo.json'}")
    return report
