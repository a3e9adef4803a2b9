"""The resolved config `ds-offload launch` writes: created exclusively, never through a link, kept to the user."""
import datetime
import errno
import os
from pathlib import Path

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
