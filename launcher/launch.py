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
"""
import argparse
import copy
import datetime
import difflib
import errno
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click

from . import CONTEXT

CONFIG_FLAGS = ("--deepspeed_config", "--deepspeed-config", "--deepscale_config", "--config")
OVERRIDE_RE = re.compile(r"^[A-Za-z_$][\w$-]*(\.[\w$-]+)*=")
BLOCK = "cpu_offloading"
OUR_FLAGS = {"--dry-run": False, "--resolved-config": True}  # flag -> takes a value

# Sections of the DeepSpeed config that DeepSpeed checks with a strict pydantic model (unknown keys are
# errors there too); an override into one of them is checked against that model before launching.
_PYDANTIC_SECTIONS = {
    "zero_optimization": ("deepspeed.runtime.zero.config", "DeepSpeedZeroConfig"),
    "bf16": ("deepspeed.runtime.precision_config", "DeepSpeedBF16Config"),
    "fp16": ("deepspeed.runtime.precision_config", "DeepSpeedFP16Config"),
    "activation_checkpointing": ("deepspeed.runtime.activation_checkpointing.config",
                                 "DeepSpeedActivationCheckpointingConfig"),
    "flops_profiler": ("deepspeed.runtime.config", "DeepSpeedFlopsProfilerConfig"),
    "comms_logger": ("deepspeed.runtime.config", "DeepSpeedCommsConfig"),
    "hybrid_engine": ("deepspeed.runtime.config", "HybridEngineConfig"),
    "compile": ("deepspeed.runtime.config", "CompileConfig"),
}


# Top-level DeepSpeed keys whose value is a scalar, with the JSON type DeepSpeed expects.
_SCALAR_KEYS = {
    "train_batch_size": int, "train_micro_batch_size_per_gpu": int, "gradient_accumulation_steps": int,
    "gradient_clipping": (int, float), "steps_per_print": int, "prescale_gradients": bool,
    "gradient_predivide_factor": (int, float), "sparse_gradients": bool, "wall_clock_breakdown": bool,
    "dump_state": bool, "memory_breakdown": bool, "zero_allow_untested_optimizer": bool,
    "zero_force_ds_cpu_optimizer": bool, "dataloader_drop_last": bool, "communication_data_type": (str, type(None)),
}
_TYPE_NAMES = {int: "an integer", bool: "true or false", str: "a string"}


class OverrideError(Exception):
    """Problems with KEY=VALUE overrides: a list of (key, message)."""

    def __init__(self, errors, config=None):
        self.errors = errors
        self.config = config  # config => the config with the overrides that were fine applied
        super().__init__("; ".join(f"{k}: {m}" for k, m in errors))


# ----------------------------------------------------------------------------------------------------------
# DeepSpeed's launcher options, read from its own argparse parser so that --help shows all of them.
# ----------------------------------------------------------------------------------------------------------
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


def parse_value(raw):
    """JSON, plus Python's True/False/None; anything else is taken as a string (`optimizer.type=AdamW`)."""
    if raw in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[raw]
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        if raw[:1] in "[{\"":
            raise ValueError(f"'{raw}' looks like JSON but does not parse") from None
        return raw


def _block_keys():
    from ds_offload.config import load_schema
    defs = load_schema()["$defs"]
    return {s: sorted(defs[s]["properties"]) for s in ("model", "optimizer")}


def _did_you_mean(word, options):
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def resolve_key(key, config):
    """The list of JSON keys an override KEY names; raises ValueError for an unknown key path."""
    from ds_offload.config import DEEPSPEED_TOP_LEVEL_KEYS
    parts = key.split(".")
    if any(p == "" for p in parts):
        raise ValueError("empty part in the key path")
    block = _block_keys()
    head = parts[0]
    # Megatron Bridge forms: model.X and optimizer.X for the block's keys.
    if head == "model" or (head == "optimizer" and len(parts) == 2 and parts[1] in block["optimizer"]):
        if len(parts) == 2 and parts[1] in block[head]:
            return [BLOCK, head, parts[1]]
        if head == "model":
            name = parts[-1]
            raise ValueError(f"unknown key path (the Megatron Bridge form model.X maps to cpu_offloading.model.X, "
                             f"whose keys are: {', '.join(block['model'])}).{_did_you_mean(name, block['model'])}")
    if head == BLOCK:
        if len(parts) < 3 or parts[1] not in block:
            sub = parts[1] if len(parts) > 1 else ""
            hint = _did_you_mean(sub, block) if sub else ""
            raise ValueError(f"unknown key path: cpu_offloading has the sections 'model' and 'optimizer', "
                             f"each with scalar keys (e.g. cpu_offloading.optimizer.optimizer_offload_fraction).{hint}")
        if len(parts) > 3 or parts[2] not in block[parts[1]]:
            raise ValueError(f"unknown key path: cpu_offloading.{parts[1]} has the keys "
                             f"{', '.join(block[parts[1]])}.{_did_you_mean(parts[2], block[parts[1]])}")
        return parts
    if head not in DEEPSPEED_TOP_LEVEL_KEYS and head not in config:
        hint = _did_you_mean(head, sorted(DEEPSPEED_TOP_LEVEL_KEYS))
        raise ValueError(f"unknown key path: DeepSpeed has no top-level key '{head}'.{hint}")
    if head == "optimizer" and len(parts) == 2 and parts[1] not in ("type", "params"):
        raise ValueError(f"unknown key path: the DeepSpeed optimizer section has 'type' and 'params'; the "
                         f"block's optimizer keys are {', '.join(block['optimizer'])}."
                         f"{_did_you_mean(parts[1], ['type', 'params'] + block['optimizer'])}")
    if head in _SCALAR_KEYS and len(parts) > 1:
        raise ValueError(f"unknown key path: DeepSpeed's '{head}' is a single value, not an object. "
                         f"Fix: write {head}=VALUE.")
    _check_pydantic_path(parts)
    return parts


def _check_scalar(parts, value):
    want = _SCALAR_KEYS.get(parts[0]) if len(parts) == 1 else None
    if want is None:
        return
    ok = isinstance(value, want) and not (isinstance(value, bool) and want in (int, (int, float)))
    if not ok:
        name = _TYPE_NAMES.get(want, "a number" if want == (int, float) else "a string or null")
        raise ValueError(f"bad value {json.dumps(value)}: DeepSpeed expects {name}.")


def _section_model(name):
    spec = _PYDANTIC_SECTIONS.get(name)
    if not spec:
        return None
    try:
        import importlib
        return getattr(importlib.import_module(spec[0]), spec[1])
    except Exception:  # pragma: no cover - a DeepSpeed without the class
        return None


def _model_in(annotation):
    """The pydantic model class inside an annotation such as Optional[Model], or None."""
    import typing
    from pydantic import BaseModel
    candidates = [annotation] + list(typing.get_args(annotation))
    for c in candidates:
        if isinstance(c, type) and issubclass(c, BaseModel):
            return c
    return None


def _check_pydantic_path(parts):
    model = _section_model(parts[0])
    for depth, part in enumerate(parts[1:], start=1):
        if model is None:
            return
        fields = model.model_fields
        names = {n: f for n, f in fields.items()}
        names.update({f.alias: f for f in fields.values() if f.alias})
        if part not in names:
            where = ".".join(parts[:depth])
            raise ValueError(f"unknown key path: DeepSpeed's '{where}' has no key '{part}'."
                             f"{_did_you_mean(part, sorted(names))}")
        model = _model_in(names[part].annotation)


def _set(config, parts, value, key):
    node = config
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            where = ".".join(parts[:i + 1])
            raise ValueError(f"cannot set it: '{where}' is {json.dumps(nxt)}, not a JSON object")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(config, overrides):
    """A copy of config with the overrides applied; raises OverrideError listing every bad one."""
    config = copy.deepcopy(config)
    errors, touched = [], set()
    for key, raw in overrides:
        if raw == "":
            errors.append((key, "empty value. Fix: give a value, e.g. KEY=0.5, KEY=true, KEY='\"text\"'."))
            continue
        try:
            value = parse_value(raw)
        except ValueError as e:
            errors.append((key, f"bad value: {e}. Fix: write valid JSON (or True/False/None)."))
            continue
        try:
            parts = resolve_key(key, config)
            _check_scalar(parts, value)
            _set(config, parts, value, key)
            touched.add(parts[0])
        except ValueError as e:
            errors.append((key, str(e)))
    errors += _check_sections(config, touched - {BLOCK})
    if errors:
        raise OverrideError(errors, config)
    return config


def _check_sections(config, sections):
    """Errors from DeepSpeed's own pydantic models for the sections an override touched."""
    errors = []
    for name in sorted(sections):
        model, section = _section_model(name), config.get(name)
        if model is None or not isinstance(section, dict):
            continue
        try:
            model(**section)
        except Exception as e:  # pydantic.ValidationError
            for err in getattr(e, "errors", lambda: [])():
                loc = ".".join([name, *map(str, err.get("loc", ()))])
                errors.append((loc, f"bad value {json.dumps(err.get('input'), default=str)}: {err.get('msg')}."))
    return errors


def resolved_config_path(original, run_dir=None):
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    # not resolved: a link at the directory or at the name is refused or avoided when writing, never followed
    base = Path(run_dir).absolute() if run_dir else Path.cwd() / "ds_offload_runs"
    return base / f"{Path(original).stem}.{stamp}-{os.getpid()}.resolved.json"


class ResolvedConfigError(Exception):
    """The resolved config could not be written where it should go (the message is one line)."""


_CREATE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _open_run_dir(run_dir):
    """A descriptor of the default run directory, created 0o700; refused if it is a link or not the user's."""
    try:
        os.mkdir(run_dir, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise ResolvedConfigError(f"cannot create the run directory {run_dir}: {e.strerror}") from None
    try:
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        if os.path.islink(run_dir):
            raise ResolvedConfigError(f"the run directory {run_dir} is a symbolic link; refusing to write "
                                      "through it. Fix: remove the link (or pass --resolved-config PATH)") from None
        raise ResolvedConfigError(f"cannot open the run directory {run_dir}: {e.strerror}") from None
    st = os.fstat(fd)
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        os.close(fd)
        raise ResolvedConfigError(f"the run directory {run_dir} is not owned by you (uid {st.st_uid}); refusing "
                                  "to write into it. Fix: remove it (or pass --resolved-config PATH)")
    return fd


def _create(name, text, dir_fd=None, shown=None):
    """Create `name` exclusively (never through a link; mode 0o666 less the umask) and write text; False if taken."""
    try:
        fd = os.open(name, _CREATE_FLAGS, 0o666, dir_fd=dir_fd)
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW met a link
            return False
        raise ResolvedConfigError(f"cannot create {shown or name}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except OSError as e:
        raise ResolvedConfigError(f"cannot write {shown or name}: {e.strerror}") from None
    return True


def write_resolved_config(text, out, explicit=False):
    """Write the resolved config to `out` (a Path) and return where it went.

    The file is created exclusively and never through a symbolic link. An explicit path that already exists is
    refused (nothing is overwritten). The default path is in ./ds_offload_runs, a directory kept to the user
    (created 0o700, refused if it is a link or someone else's); if its predictable name is taken, another
    name is picked.
    """
    out = Path(out)
    if explicit:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ResolvedConfigError(f"cannot create the directory {out.parent}: {e.strerror}") from None
        if not _create(str(out), text, shown=out):
            raise ResolvedConfigError(f"--resolved-config {out} already exists (or is a link); it is not "
                                      "overwritten. Fix: remove it or name a new file")
        return out
    dir_fd = _open_run_dir(out.parent)
    try:
        name = out.name
        stem = name[:-len(".resolved.json")] if name.endswith(".resolved.json") else name
        for attempt in range(100):
            if attempt:
                import secrets
                name = f"{stem}-{secrets.token_hex(4)}.resolved.json"
            if _create(name, text, dir_fd=dir_fd, shown=out.parent / name):
                return out.parent / name
        raise ResolvedConfigError(f"no free file name in {out.parent} (every name tried exists)")
    finally:
        os.close(dir_fd)


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
