"""Crash-safe file writes shared by the CLI, the agent and the server.

Invariant: after ``atomic_write_bytes`` returns, ``path`` holds either the old
content or the new content, never a mix, and the new content and the directory
entry are on stable storage. The temp file lives in the same directory so that
``os.replace`` is a rename on one filesystem; on any failure it is removed.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["atomic_write_bytes", "fsync_dir"]


def fsync_dir(path: Path) -> None:
    """fsync a directory so that renames and new entries inside it are durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_temp(directory: Path, name: str) -> tuple[int, str]:
    """``tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)`` without tempfile.

    (``tempfile`` imports ``shutil``, ``random`` and the compression modules:
    about 1 MB of resident memory on the device for one function.)
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = os.path.join(directory, f".{name}.{os.urandom(6).hex()}.tmp")
        try:
            return os.open(tmp, flags, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {name} in {directory}")


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Atomically replace ``path`` with ``data`` (temp file, fsync, rename, dir fsync).

    Raises:
        OSError: the write failed; ``path`` is unchanged and no temp file remains.
    """
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(directory, path.name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)
