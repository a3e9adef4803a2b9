"""`ds-offload launch` writes the resolved config only where it means to: exclusively, never through a link."""
import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from ds_offload_cli import launch as launch_mod
from ds_offload_cli.cli import main
from test_cli import GOOD  # one config for the launcher's tests

pytestmark = pytest.mark.skipif(not hasattr(os, "O_NOFOLLOW"), reason="POSIX only")

VICTIM_TEXT = "the user's other file\n"


def run_cli(*args):
    return CliRunner().invoke(main, list(map(str, args)))


@pytest.fixture
def launched(monkeypatch):
    calls = []
    monkeypatch.setattr(launch_mod.subprocess, "call", lambda cmd, *a, **k: calls.append(list(cmd)) or 0)
    return calls


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.json").write_text(json.dumps(GOOD))
    return tmp_path


@pytest.fixture
def frozen_name(monkeypatch):
    """Make the default name predictable to the test, as it is to anyone who knows the time and the pid."""
    fixed = "c.20250101-000000-4242.resolved.json"
    monkeypatch.setattr(launch_mod, "resolved_config_path",
                        lambda original, run_dir=None: Path.cwd() / "ds_offload_runs" / fixed)
    return fixed


def _resolved_from(cmd):
    return Path(cmd[cmd.index("--deepspeed_config") + 1])


def test_planted_symlink_at_predictable_name_is_not_followed(work, launched, frozen_name):
    victim = work / "victim.json"
    victim.write_text(VICTIM_TEXT)
    runs = work / "ds_offload_runs"
    runs.mkdir(mode=0o700)
    (runs / frozen_name).symlink_to(victim)
    res = run_cli("launch", "s.py", "--deepspeed_config", "c.json", "zero_optimization.stage=2")
    assert victim.read_text() == VICTIM_TEXT
    assert "Traceback" not in res.output
    assert res.exit_code == 0, res.output  # another name was picked
    if res.exit_code == 0:
        (cmd,) = launched
        out = _resolved_from(cmd)
        assert out.parent == runs and out.name != frozen_name and not out.is_symlink()
        assert json.loads(out.read_text())["zero_optimization"]["stage"] == 2
    else:
        assert res.exit_code == 1 and launched == []
    assert (runs / frozen_name).is_symlink() and os.readlink(runs / frozen_name) == str(victim)


def test_dangling_symlink_at_predictable_name_creates_nothing_through_it(work, launched, frozen_name):
    target = work / "elsewhere.json"
    runs = work / "ds_offload_runs"
    runs.mkdir(mode=0o700)
    (runs / frozen_name).symlink_to(target)
    res = run_cli("launch", "s.py", "--deepspeed_config", "c.json")
    assert not target.exists()
    assert res.exit_code in (0, 1) and "Traceback" not in res.output


def test_run_directory_that_is_a_symlink_is_refused(work, launched):
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    (work / "ds_offload_runs").symlink_to(elsewhere)
    res = run_cli("launch", "s.py", "--deepspeed_config", "c.json")
    assert res.exit_code == 1 and launched == []
    assert list(elsewhere.iterdir()) == []
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "symbolic link" in lines[0] and "nothing launched" in lines[0], res.output


def test_run_directory_of_another_user_is_refused(work, launched, monkeypatch):
    (work / "ds_offload_runs").mkdir(mode=0o700)
    monkeypatch.setattr(launch_mod.os, "geteuid", lambda: os.getuid() + 1)
    res = run_cli("launch", "s.py", "--deepspeed_config", "c.json")
    assert res.exit_code == 1 and launched == []
    assert "not owned by you" in res.output and "Traceback" not in res.output
    assert list((work / "ds_offload_runs").iterdir()) == []


def test_dry_run_writes_nothing(work, launched):
    before = sorted(p.name for p in work.iterdir())
    res = run_cli("launch", "--dry-run", "s.py", "--deepspeed_config", "c.json", "zero_optimization.stage=2")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in work.iterdir()) == before  # no ds_offload_runs, no file
    assert '"stage": 2' in res.output and "command: " in res.output and launched == []


def test_dry_run_with_resolved_config_writes_nothing(work, launched):
    out = work / "r.json"
    res = run_cli("launch", "--dry-run", "--resolved-config", out, "s.py", "--deepspeed_config", "c.json")
    assert res.exit_code == 0, res.output
    assert not out.exists()
    assert f"--deepspeed_config {out}" in res.output


def test_run_directory_is_private_and_file_honours_umask(work, launched):
    old = os.umask(0o027)
    try:
        res = run_cli("launch", "s.py", "--deepspeed_config", "c.json")
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    runs = work / "ds_offload_runs"
    assert stat.S_IMODE(runs.stat().st_mode) == 0o700
    (cmd,) = launched
    out = _resolved_from(cmd)
    assert out.parent == runs
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~0o027
    assert json.loads(out.read_text()) == GOOD


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_explicit_path_honours_umask(work, launched, mask):
    out = work / f"r{mask:o}.json"
    old = os.umask(mask)
    try:
        res = run_cli("launch", "--resolved-config", out, "s.py", "--deepspeed_config", "c.json")
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask


def test_existing_explicit_path_is_not_overwritten(work, launched):
    out = work / "r.json"
    out.write_text(VICTIM_TEXT)
    res = run_cli("launch", "--resolved-config", out, "s.py", "--deepspeed_config", "c.json")
    assert res.exit_code == 1 and launched == []
    assert out.read_text() == VICTIM_TEXT
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "already exists" in lines[0], res.output


def test_explicit_path_that_is_a_symlink_is_not_followed(work, launched):
    victim = work / "victim.json"
    victim.write_text(VICTIM_TEXT)
    link = work / "r.json"
    link.symlink_to(victim)
    res = run_cli("launch", "--resolved-config", link, "s.py", "--deepspeed_config", "c.json")
    assert res.exit_code == 1 and launched == []
    assert victim.read_text() == VICTIM_TEXT and "Traceback" not in res.output


def test_unwritable_location_is_a_one_line_error(work, launched):
    (work / "afile").write_text("")
    res = run_cli("launch", "--resolved-config", work / "afile" / "r.json", "s.py", "--deepspeed_config", "c.json")
    assert res.exit_code == 1 and launched == []
    lines = [l for l in res.output.splitlines() if l.strip()]
    assert len(lines) == 1 and "cannot" in lines[0] and "nothing launched" in lines[0], res.output
    assert isinstance(res.exception, SystemExit)


def test_two_launches_in_one_second_get_two_files(work, launched, frozen_name):
    for _ in range(2):
        assert run_cli("launch", "s.py", "--deepspeed_config", "c.json").exit_code == 0
    a, b = (_resolved_from(c) for c in launched)
    assert a != b and a.exists() and b.exists()
