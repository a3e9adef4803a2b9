"""`ds-offload demo`: the README's main job (see demo_run.py beside it for the training itself)."""
import contextlib
import sys
from pathlib import Path

import click

from . import CONTEXT
from .demo_run import DEMO_MODELS

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def find_config(name):
    """A path as given, else configs/NAME[.json] in the current directory, else in the source tree."""
    p = Path(name)
    if p.is_file():
        return p
    for base in (Path.cwd() / "configs", REPO_CONFIGS):
        for cand in (base / name, base / f"{name}.json"):
            if cand.is_file():
                return cand
    raise click.BadParameter(f"no config '{name}' (looked as a path and in ./configs and {REPO_CONFIGS})",
                             param_hint="--config")


def _progress_factory(label, steps):
    @contextlib.contextmanager
    def cm():
        with click.progressbar(length=steps, label=f"{label:<24}", file=sys.stderr, show_eta=True,
                               item_show_func=lambda r: f"loss {r.losses[-1]:.4f}" if r else None) as bar:
            yield lambda res: bar.update(1, res)
    return cm()


def _prebuild_cpu_adam(config):
    """The first use of DeepSpeed's CPU Adam compiles it (~60 s on 2 cores): say so rather than look stuck.

    `config`: an OffloadConfig."""
    from .build_ops import build_op, fix_cuda_arch_list, is_built
    echo = lambda m: click.echo(m, err=True)  # noqa: E731
    fix_cuda_arch_list(echo=echo)  # DeepSpeed's own JIT builds in this process (fused_adam on a GPU) need it too
    opt = config.optimizer
    if not opt.optimizer_cpu_offload or opt.use_torch_optimizer_for_cpu_offload or is_built("cpu_adam"):
        return
    build_op("cpu_adam", echo=echo)


@click.command(context_settings=CONTEXT)
@click.option("--config", "config_name", default="combined.json", show_default=True,
              help="DeepSpeed config with a cpu_offloading block: a path, or a name in configs/.")
@click.option("--steps", type=click.IntRange(min=1), default=30, show_default=True, help="Optimizer steps per run.")
@click.option("--out", type=click.Path(file_okay=False), default="out/demo", show_default=True,
              help="Folder for demo.png (loss curves, memory per step) and demo.json.")
@click.option("--model", type=click.Choice(DEMO_MODELS), default=None,
              help="Embedded GPT to train [default: tiny-gpt without a GPU, small-gpt with one].")
def demo(config_name, steps, out, model):
    """Train an embedded GPT on synthetic data twice, without offload and with a config, and compare.

    Prints a table (final loss, max loss delta against the < 1e-3 criterion, step time, peak GPU memory,
    CPU memory) and writes a PNG. Runs on CPU without a GPU (layer offload is then a no-op; the optimizer
    split still runs), on a GPU with one. Exit status 1 when the loss criterion fails.
    """
    from .demo_run import load_demo_config, run_demo
    path = find_config(config_name)
    _prebuild_cpu_adam(load_demo_config(path))
    report = run_demo(path, steps=steps, out=out, model=model, echo=click.echo, progress_factory=_progress_factory)
    sys.exit(0 if report["pass"] else 1)
