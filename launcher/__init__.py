"""The `ds-offload` command line: validate, launch, estimate, doctor, build-ops, demo.

The repository folder `launcher/` installs as the package `ds_offload_cli` (setup.cfg's package_dir), so
its modules import each other relatively; `ds_offload_cli.cli:main` is the console script. Heavy imports
(torch, deepspeed) happen inside the commands, so `ds-offload --help` and `ds-offload validate` start in
well under a second.
"""

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
