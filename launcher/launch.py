"""`ds-offload launch`: DeepSpeed's own launcher with a config check and KEY=VALUE overrides in front.

The run is `python -m deepspeed.launcher.runner <launcher options> SCRIPT <script args>`: the launcher options
the user typed go through token for token, so every backend DeepSpeed supports (pdsh, openmpi, mvapich,
slurm, mpich, impi, ...) works unchanged. What we add happens before any process starts:

1. the config named among the script's arguments (`--deepspeed_config`, `--deepspeed_config=`,
   `--deepspeed-config`, `--config`) is read;
2. KEY=VALUE overrides among the script's arguments are applied to it (and removed from the arguments);
3. the result is validated; on any problem we print them all and exit 1 without launching;
4. the resolved config is written next to the run (created exclusively, never through a symbolic link, in a
   run directory kept to the user) and passed on in place of the original; `--dry-run` writes nothing.

The overrides live in overrides.py, the resolved file in resolved.py; this module is the command.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click

from . import CONTEXT
from .overrides import OverrideError, apply_overrides, parse_value  # noqa: F401  (parse_value: tests reach it here)
from .resolved import ResolvedConfigError, resolved_config_path, write_resolved_config

CONFIG_FLAGS = ("--deepspeed_config", "--deepspeed-config", "--deepscale_config", "--config")
OVERRIDE_RE = re.compile(r"^[A-Za-z_$][\w$-]*(\.[\w$-]+)*=")
BLOCK = "cpu_offloading"
OUR_FLAGS = {"--dry-run": False, "--resolved-config": True}  # flag -> takes a value



def deepspeed_runner_parser():
    """The argparse parser of `deepspeed.launcher.runner` (built by its parse_args, captured before use)."""
    from deepspeed.launcher import runner

    class _Captured(Exception):
        pass

    captured = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        raise _Captured

    argparse.ArgumentParser.parse_args = capture
    try:
        runner.parse_args([])
    except _Captured:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured["parser"]


def deepspeed_launcher_options():
    """click Options mirroring every optional argument of DeepSpeed's launcher (help text included)."""
    opts = []
    for action in deepspeed_runner_parser()._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        name = "ds_" + action.dest
        default = action.default
        help_text = (action.help or "").replace("%%", "%")
        help_text = " ".join(help_text.split())
        if isinstance(action, argparse._StoreTrueAction):
            opts.append(click.Option([*action.option_strings, name], is_flag=True, default=False,
                                     help=f"[deepspeed] {help_text}"))
            continue
        ptype = click.Choice(list(action.choices)) if action.choices else {int: int, float: float}.get(
            action.type, str)
        shown = f" (deepspeed default: {default!r})" if default not in (None, "") else ""
        opts.append(click.Option([*action.option_strings, name], type=ptype, default=None, metavar=action.metavar,
                                 help=f"[deepspeed] {help_text}{shown}"))
    return opts


class LaunchCommand(click.Command):
    """Adds DeepSpeed's launcher options lazily (importing deepspeed is slow) and keeps the raw tokens."""

    _ds_added = False

    def get_params(self, ctx):
        if not self._ds_added:
            self.params[:0] = deepspeed_launcher_options()
            self._ds_added = True
        return super().get_params(ctx)

    def parse_args(self, ctx, args):
        ctx.meta["ds_offload.raw_args"] = list(args)
        return super().parse_args(ctx, args)


# ----------------------------------------------------------------------------------------------------------
# Config location and overrides (pure functions, tested directly).
# ----------------------------------------------------------------------------------------------------------
def find_config_arg(script_args):
    """(index, form, path) of the config among the script's arguments, or None.

    form is "split" (`--flag PATH`, the path at index+1) or "joined" (`--flag=PATH` at index).
    """
    for flag in CONFIG_FLAGS:  # in order of preference: a DeepSpeed flag wins over a generic --config
        for i, tok in enumerate(script_args):
            if tok == flag and i + 1 < len(script_args):
                return i, "split", script_args[i + 1]
            if tok.startswith(flag + "="):
                return i, "joined", tok[len(flag) + 1:]
    return None


def split_overrides(script_args):
    """(script args without KEY=VALUE tokens, [(key, raw value)])."""
    kept, overrides = [], []
    for i, tok in enumerate(script_args):
        if not tok.startswith("-") and OVERRIDE_RE.match(tok) and not (i > 0 and script_args[i - 1] in CONFIG_FLAGS):
            key, _, value = tok.partition("=")
            overrides.append((key, value))
        else:
            kept.append(tok)
    return kept, overrides


def launcher_tokens(raw, tail_len):
    """The user's launcher-option tokens, unchanged, minus ds-offload's own options."""
    prefix = raw[:len(raw) - tail_len]
    out, skip = [], False
    for tok in prefix:
        if skip:
            skip = False
            continue
        name = tok.split("=", 1)[0]
        if name in OUR_FLAGS:
            skip = OUR_FLAGS[name] and "=" not in tok
            continue
        if tok == "--":
            continue
        out.append(tok)
    return out


def build_command(launcher_args, script, script_args):
    return [sys.executable, "-u", "-m", "deepspeed.launcher.runner", *launcher_args, script, *script_args]


# ----------------------------------------------------------------------------------------------------------
@click.command(cls=LaunchCommand, context_settings={**CONTEXT, "allow_interspersed_args": False},
               short_help="Validate, apply KEY=VALUE overrides, then run DeepSpeed's launcher.")
@click.option("--dry-run", is_flag=True, help="Print the resolved config's contents and the exact command; "
                                               "write nothing, launch nothing.")
@click.option("--resolved-config", type=click.Path(dir_okay=False), default=None,
              help="Where to write the resolved config (default: ./ds_offload_runs/<name>.<time>-<pid>.resolved.json); "
                   "for multi-node runs, a path every node sees. It must not exist yet (nothing is overwritten).")
@click.argument("script")
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def launch(ctx, dry_run, resolved_config, script, script_args, **deepspeed_options):
    """Run SCRIPT under DeepSpeed's launcher (deepspeed.launcher.runner), after checking its config.

    \b
    ds-offload launch [launcher options] SCRIPT [script args] [KEY=VALUE ...]

    \b
    The config is the one named among the script's arguments by --deepspeed_config PATH,
    --deepspeed_config=PATH, --deepspeed-config or --config. KEY=VALUE arguments override it:
      cpu_offloading.optimizer.optimizer_offload_fraction=0.5   zero_optimization.stage=2
      optimizer.optimizer_cpu_offload=True   model.cpu_offloading_num_layers=8   (Megatron Bridge forms)
    Values are JSON, or True/False/None (other text is a string). A script argument shaped KEY=VALUE is
    taken as an override: pass such a value to your script as --option=KEY=VALUE instead.
    Any problem: listed, exit 1, nothing launched. The resolved
    config is written next to the run and passed to the script in place of the original.
    Options marked [deepspeed] go to DeepSpeed's launcher unchanged.
    """
    raw = ctx.meta.get("ds_offload.raw_args", [])
    tail = [script, *script_args]
    ds_args = launcher_tokens(raw, len(tail))
    args, overrides = split_overrides(list(script_args))
    found = find_config_arg(args)

    if found is None:
        if overrides:
            _fail([(k, "KEY=VALUE overrides need a config, but none of " + ", ".join(CONFIG_FLAGS) +
                    " is among the script's arguments. Fix: add --deepspeed_config PATH.") for k, _ in overrides])
        click.echo("ds-offload: no DeepSpeed config among the script's arguments; nothing to check.", err=True)
    else:
        idx, form, path = found
        from ds_offload.config import check_config, read_json
        from ds_offload.errors import ConfigError
        try:
            config = read_json(path)
        except ConfigError as e:
            _fail(e.errors, source=path)
        override_errors = []
        try:
            config = apply_overrides(config, overrides)
        except OverrideError as e:  # the config is still checked, so every problem is reported in one pass
            override_errors, config = e.errors, e.config
        errors, warns = check_config(config)
        for p, m in warns:
            click.echo(f"ds-offload: warning {p}: {m}", err=True)
        if override_errors or errors:
            _fail(override_errors + errors, source=path)
        schema = config.get("$schema")
        if isinstance(schema, str) and not re.match(r"^[a-z]+://", schema) and not os.path.isabs(schema):
            config["$schema"] = str((Path(path).resolve().parent / schema).resolve())
        text = json.dumps(config, indent=2) + "\n"
        if resolved_config:
            # the parent's links are resolved, the file's own name is kept: a link there is refused, not followed
            given = Path(resolved_config).expanduser().absolute()
            out = given.parent.resolve() / given.name
        else:
            out = resolved_config_path(path)
        if not dry_run:  # --dry-run writes nothing
            try:
                out = write_resolved_config(text, out, explicit=bool(resolved_config))
            except ResolvedConfigError as e:
                click.echo(f"ds-offload: cannot write the resolved config: {e}; nothing launched.", err=True)
                sys.exit(1)
        if form == "split":
            args[idx + 1] = str(out)
        else:
            args[idx] = args[idx].split("=", 1)[0] + "=" + str(out)
        if dry_run:
            click.echo(f"resolved config: {out} (not written: --dry-run)")
            click.echo(text, nl=False)
        else:
            click.echo(f"ds-offload: config {path} OK" + (f" with {len(overrides)} override(s)" if overrides else "")
                       + f"; resolved config {out}", err=True)

    cmd = build_command(ds_args, script, args)
    if dry_run:
        click.echo("command: " + shlex.join(cmd))
        return
    click.echo("ds-offload: " + shlex.join(cmd), err=True)
    try:
        rc = subprocess.call(cmd)
    except KeyboardInterrupt:
        rc = 130
    ctx.exit(rc)


def _fail(errors, source=None, what="problem"):
    where = f" in {source}" if source else ""
    click.echo(f"ds-offload: {len(errors)} {what}(s){where}; nothing launched:", err=True)
    for p, m in errors:
        click.echo(f"  - {p}: {m}", err=True)
    sys.exit(1)
