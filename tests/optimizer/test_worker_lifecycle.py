"""The CPU Adam worker process: scripts without a main guard, a worker that dies, a parent that dies.

Each must end in a result or a clear error, never a hang or a traceback from the other side.
"""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from ds_offload.optimizer import HybridDeviceOptimizer

pytestmark = pytest.mark.slow  # DeepSpeed's CPU Adam op

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_script(tmp_path, body, timeout=240):
    path = tmp_path / "train.py"
    path.write_text(textwrap.dedent(body))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=tmp_path)


def test_script_without_main_guard_trains(tmp_path):
    """spawn would re-run an unguarded script in the worker; the worker is started without it."""
    res = run_script(tmp_path, """
        import torch
        from ds_offload.optimizer import HybridDeviceOptimizer
        print("SCRIPT BODY RAN", flush=True)
        dev = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU host: pinned, registered buffers
        ps = [torch.nn.Parameter(torch.randn(64, 64, device=dev))]
        opt = HybridDeviceOptimizer(ps, offload_fraction=0.5, cpu_worker="process")
        for i in range(3):
            ps[0].grad = torch.randn(64, 64, device=dev)
            opt.step()
        assert opt._backend._proc is not None
        print("OK", opt.split_info()["cpu_numel"], flush=True)
        opt.close()
    """)
    assert res.returncode == 0, res.stderr
    assert "OK 2048" in res.stdout
    assert res.stdout.count("SCRIPT BODY RAN") == 1, res.stdout  # the worker did not re-run the script
    assert "bootstrapping phase" not in res.stderr


def test_worker_killed_is_an_error_naming_the_cause():
    ps = [torch.nn.Parameter(torch.randn(32, 32))]
    opt = HybridDeviceOptimizer(ps, offload_fraction=1.0, cpu_worker="process")
    try:
        ps[0].grad = torch.randn(32, 32)
        opt.step()
        os.kill(opt._backend._proc.pid, signal.SIGKILL)
        opt._backend._proc.join(timeout=10)
        ps[0].grad = torch.randn(32, 32)
        with pytest.raises(RuntimeError, match="killed by signal 9"):
            opt.step()
    finally:
        opt.close()  # closing after the death is quiet too


def test_parent_killed_leaves_no_worker_traceback(tmp_path):
    res = run_script(tmp_path, """
        import os, sys, torch
        from ds_offload.optimizer import HybridDeviceOptimizer
        ps = [torch.nn.Parameter(torch.randn(16, 16))]
        opt = HybridDeviceOptimizer(ps, offload_fraction=1.0, cpu_worker="process")
        ps[0].grad = torch.randn(16, 16)
        opt.step()
        print("WORKER", opt._backend._proc.pid, flush=True)
        os._exit(0)  # abrupt: no close(), no atexit; the worker sees the pipe close
    """)
    assert res.returncode == 0
    pid = int(res.stdout.split("WORKER")[1].split()[0])
    # stderr is read to its end, so the worker (which shares it) has exited by now.
    assert "Traceback" not in res.stderr and "EOFError" not in res.stderr, res.stderr
    status = f"/proc/{pid}/status"
    if os.path.exists(status):  # an exited orphan may linger unreaped (a zombie) where init does not reap
        with open(status) as fh:
            assert "zombie" in fh.read(), "the worker outlived its parent"
