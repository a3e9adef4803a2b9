"""`ds-offload`: the click group and the `validate` command; the other commands live in <cmd>.py beside it.

Installed as `ds_offload_cli.cli` (from the repository folder launcher/); `python -m ds_offload_cli.cli` runs it.
"""
import json
import sys

import click

from . import CONTEXT


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="ds_offload", prog_name="ds-offload")
def main():
    """Megatron-Bridge-style CPU offloading for DeepSpeed.

    \b
    Start here:
      ds-offload demo                      train a tiny GPT with and without offload, compare
      ds-offload validate CONFIG...        check configs before a job is queued
      ds-offload estimate --model ...      GPU/CPU memory per rank, with and without offload
      ds-offload doctor                    measure this machine (PCIe, pinned memory, CPU Adam)
      ds-offload launch [deepspeed options] SCRIPT [args] [KEY=VALUE...]
    """


def _problems_json(items):
    return [{"path": p, "message": m} for p, m in items]


@main.command(context_settings=CONTEXT)
@click.argument("configs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--model-layers", type=click.IntRange(min=1), default=None,
              help="Transformer layer count of the model, to check cpu_offloading_num_layers against it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
def validate(configs, model_layers, as_json):
    """Check DeepSpeed configs and their cpu_offloading block.

    Every problem is listed with its JSON path and the fix. Exit status 0 when all configs are valid,
    1 otherwise; warnings are printed but do not fail.
    """
    from ds_offload.config import check_config, read_json
    from ds_offload.errors import ConfigError

    report, all_ok = [], True
    for path in configs:
        try:
            cfg = read_json(path)
            errors, warns = check_config(cfg, model_layers=model_layers)
        except ConfigError as e:
            errors, warns = list(e.errors), []
        all_ok &= not errors
        report.append({"config": path, "valid": not errors, "errors": _problems_json(errors),
                       "warnings": _problems_json(warns)})
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for r in report:
            if r["valid"]:
                click.echo(f"{r['config']}: OK" + (f" ({len(r['warnings'])} warning(s))" if r["warnings"] else ""))
            else:
                click.echo(f"{r['config']}: {len(r['errors'])} problem(s)")
            for e in r["errors"]:
                click.echo(f"  error   {e['path']}: {e['message']}")
            for w in r["warnings"]:
                click.echo(f"  warning {w['path']}: {w['message']}")
        n_bad = sum(not r["valid"] for r in report)
        if len(report) > 1:
            click.echo(f"{len(report) - n_bad} of {len(report)} config(s) valid.")
    sys.exit(0 if all_ok else 1)


from .launch import launch  # noqa: E402
from .estimate import estimate  # noqa: E402
from .doctor import doctor  # noqa: E402
from .build_ops import build_ops  # noqa: E402
from .demo import demo  # noqa: E402

for _cmd in (launch, estimate, doctor, build_ops, demo):
    main.add_command(_cmd)

if __name__ == "__main__":
    main(prog_name="ds-offload")
