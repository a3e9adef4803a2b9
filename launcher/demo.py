"""`ds-offload demo`: the README's main job (see demo_run.py beside it for the training itself).

Here: the command, and what it passes on of the libraries' own output (DemoOutput).
"""
import contextlib
import logging
import re
import sys
import warnings
from pathlib import Path

import click

from . import CONTEXT
from .demo_run import DEMO_MODELS

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


# What DeepSpeed print()s whatever its log level: loading its CPU comm op, and BF16_Optimizer's forced memory
# report (accelerator figures that mean nothing on CPU). `--verbose` lets them through.
DEEPSPEED_PRINTS = re.compile(r"(DeepSpeed \S+ built successfully|(begin|end) bf16_ ?optimizer|"
                              r"(before|after) initializing group \d+|MA [\d.]+ GB\s+Max_MA .*|"
                              r"CPU Virtual Memory: +used = .*)\s*")
# DeepSpeed's warning when the optimizer it is given is not on its ZeRO list, and the demo's one line about it.
UNTESTED = "untested optimizer"
UNTESTED_NOTE = ("note: DeepSpeed's \"untested optimizer\" warning is about ds_offload's hybrid CPU/GPU optimizer, "
                 "which ds_offload hands DeepSpeed as a client optimizer on the ZeRO-0 / BF16_Optimizer path and "
                 "which DeepSpeed's ZeRO list does not name; the loss comparison below is the check.")
# Also DeepSpeed's: the header names the device instead.
ACCELERATOR = "Setting accelerator to CPU"


class _DropPrints:
    """sys.stdout minus DEEPSPEED_PRINTS lines; whole lines are matched, so a partial one waits for its end."""

    def __init__(self, stream):
        self.stream, self.pending, self.open = stream, "", True

    def write(self, s):
        if not self.open:  # a handler that kept this stream after the demo: pass everything on
            return self.stream.write(s)
        self.pending += s
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not DEEPSPEED_PRINTS.fullmatch(line):
                self.stream.write(line + "\n")
        return len(s)

    def close(self):
        self.open = False
        if self.pending and not DEEPSPEED_PRINTS.fullmatch(self.pending):
            self.stream.write(self.pending)
        self.pending = ""

    def __getattr__(self, name):  # flush, isatty, fileno, encoding: the real stream's
        return getattr(self.stream, name)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


class DemoOutput:
    """What the demo passes on of the libraries' own output.

    A user of the demo wants the table, not the machinery: Python warnings become one line `warning: ...`
    (no source line), ds_offload's summary (logged by every `initialize`, the baseline's too) is kept on the
    run and printed once per offloaded run, DeepSpeed's "untested optimizer" warning is replaced by one line
    saying why it appears, and DeepSpeed's unconditional prints are dropped. `verbose` keeps DeepSpeed's
    output as it is. Used as a context manager; `flush(run)` after a run's `initialize` (`train`'s on_ready)
    hands the run what came since the last flush and prints what ds_offload logged besides its summary.
    """

    def __init__(self, warn=None, verbose=False):
        self.warn = warn or (lambda m: print(m, file=sys.stderr))
        self.verbose = verbose
        self.pending, self.records, self.untested, self.noted = [], _Records(), False, False
        self._stack = None

    def _deepspeed_record(self, record):  # a filter on DeepSpeed's logger: False drops the record
        msg = record.getMessage()
        if UNTESTED in msg:
            self.untested = True
            return self.verbose
        return self.verbose or ACCELERATOR not in msg

    def _showwarning(self, message, category, filename, lineno, file=None, line=None):
        self.pending.append(f"warning: {message}")  # now: a warning must not wait for a run that may not end
        self.warn(self.pending[-1])

    def __enter__(self):
        self._stack = stack = contextlib.ExitStack()
        stack.enter_context(warnings.catch_warnings())
        warnings.showwarning = self._showwarning
        ours = logging.getLogger("ds_offload")
        saved = ours.propagate
        ours.addHandler(self.records)
        ours.propagate = False
        stack.callback(lambda: (ours.removeHandler(self.records), setattr(ours, "propagate", saved)))
        theirs = logging.getLogger("DeepSpeed")  # the same object deepspeed.utils.logger is, imported or not
        theirs.addFilter(self._deepspeed_record)
        stack.callback(theirs.removeFilter, self._deepspeed_record)
        if not self.verbose:
            drop = _DropPrints(sys.stdout)
            stack.enter_context(contextlib.redirect_stdout(drop))
            stack.callback(drop.close)
        stack.callback(self.flush)
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)

    def flush(self, run=None):
        """ds_offload's records since the last call but `run`'s summary, printed; with `run` (a RunResult) the
        warnings since the last call go onto it. The "untested optimizer" note comes once, after the first."""
        logged = [f"warning: {m}" for m in self.records.messages if run is None or m != run.summary]
        for line in logged:
            self.warn(line)
        if run is not None:
            run.warnings.extend(self.pending + logged)
        self.pending, self.records.messages = [], []
        if self.untested and not self.noted:
            self.noted = True
            self.warn(UNTESTED_NOTE)


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
@click.option("--verbose", is_flag=True, help="Show DeepSpeed's own output as it is (its prints and warnings).")
def demo(config_name, steps, out, model, verbose):
    """Train an embedded GPT on learnable synthetic data twice, without offload and with a config, and compare.

    Prints a table (final loss, loss parity against the max delta < 1e-3 criterion, step time and its ratio,
    peak GPU memory and the GiB saved, CPU memory) and writes a PNG titled with the model, config, device and
    verdict. Runs on CPU without a GPU (layer offload is then a no-op and the GPU figures read n/a; the
    optimizer split still runs), on a GPU with one. Exit status 1 when the loss criterion fails.
    """
    from .demo_run import load_demo_config, run_demo
    path = find_config(config_name)
    with DemoOutput(warn=lambda m: click.echo(m, err=True), verbose=verbose) as output:  # the op build's too
        _prebuild_cpu_adam(load_demo_config(path))
        report = run_demo(path, steps=steps, out=out, model=model, echo=click.echo,
                          progress_factory=_progress_factory, on_ready=output.flush)
    sys.exit(0 if report["pass"] else 1)
