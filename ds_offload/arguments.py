"""`add_config_arguments(parser)`: the twin of `deepspeed.add_config_arguments`.

It adds DeepSpeed's own flags (`--deepspeed`, `--deepspeed_config`, and the deprecated `--deepscale`,
`--deepscale_config`) exactly as DeepSpeed does, so `ds_offload.initialize(args=args, ...)` reads
`args.deepspeed_config` like `deepspeed.initialize` does, plus `--local_rank` (which DeepSpeed's launcher
passes to every script) when the parser does not have it yet. The `cpu_offloading` block lives in the
config file; to change it per run, use `ds-offload launch ... KEY=VALUE` overrides.
"""
import argparse


def add_config_arguments(parser):
    """Add DeepSpeed's config arguments (and --local_rank if missing) to `parser`; returns the parser."""
    import deepspeed
    parser = deepspeed.add_config_arguments(parser)
    known = {opt for action in parser._actions for opt in action.option_strings}
    if "--deepspeed-config" not in known:  # the spelling `ds-offload launch` also accepts
        parser.add_argument("--deepspeed-config", dest="deepspeed_config", default=None, help=argparse.SUPPRESS)
    if "--local_rank" not in known and "--local-rank" not in known:
        parser.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                            help="Local rank, passed by the DeepSpeed launcher (default -1: not launched by it).")
    return parser
