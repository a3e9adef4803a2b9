"""The environment of a one-process run started without a launcher (`python script.py`).

`torch.distributed` (and so DeepSpeed) reads its rank, world size and rendezvous address from environment
variables that a launcher (deepspeed, torchrun) sets. Without one, `ensure_single_process_env` sets them for
one process; what a launcher or the user set is kept.
"""
import contextlib
import os
import socket


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_single_process_env(port=None):
    """Default RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT for one process.

    Variables already set are left alone. MASTER_PORT defaults to `port`, else a free port.
    """
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1"),
                 ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(port or free_port())
