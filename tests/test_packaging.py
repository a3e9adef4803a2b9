"""setup.cfg lists every package (an explicit list, since launcher/ installs under another name)."""
import configparser
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_setup_cfg_lists_every_package_and_installs_the_cli_as_ds_offload_cli():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = {p.strip() for p in cfg["options"]["packages"].replace(",", "\n").split()}
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "ds_offload").rglob("__init__.py")}
    assert on_disk <= listed, f"add to setup.cfg [options] packages: {sorted(on_disk - listed)}"
    assert "launcher" not in listed and "ds_offload_cli" in listed
    assert "ds_offload_cli = launcher" in cfg["options"]["package_dir"]
    assert "ds_offload_cli.cli:main" in cfg["options.entry_points"]["console_scripts"]


def test_the_gil_free_binding_ships_with_the_package():
    """ds_op.py compiles csrc/cpu_adam_gil_free.cpp at first use: a wheel without it would fall back silently
    slower (to DeepSpeed's GIL-holding op), so setup.cfg must ship it."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    data = cfg["options.package_data"]["ds_offload.optimizer"].split()
    assert "csrc/*.cpp" in data
    assert (REPO / "ds_offload" / "optimizer" / "csrc" / "cpu_adam_gil_free.cpp").exists()
