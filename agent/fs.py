"""The agent's filesystem seam: every mutation of the state directory goes here.

Flow: the agent core never calls ``open(..., "w")``, ``os.replace`` or
``os.unlink`` itself; it asks a ``FileSystem`` (``OsFileSystem`` on a device,
``firmware_sim.disk.SimDisk`` in tests, which fails or "cuts power" at the
k-th mutation and can forget what was never fsynced). The mutations are
exactly: ``mkdir``, ``create``, ``WriteHandle.write``, ``WriteHandle.fsync``,
``replace``, ``unlink``, ``rmdir``, ``fsync_dir`` and ``lock``.

Guarantees of the helpers built on top:

* ``atomic_write``: ``path`` holds the old or the new bytes, never a mix; the
  new bytes and the directory entry are durable when it returns (temp file in
  the same directory, fsync, ``replace``, directory fsync). A failed write
  leaves no temp file behind when cleanup itself is possible.
* ``remove_tree``: removes a directory tree bottom-up and makes the removal
  durable; missing entries are fine (it is used to clean after crashes).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Protocol

__all__ = [
    "FileSystem",
    "LockHandle",
    "OsFileSystem",
    "WriteHandle",
    "atomic_write",
    "ensure_dir",
    "remove_tree",
]


class WriteHandle(Protocol):
    """An open file being written from its start."""

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data`` (a mutation)."""

    def fsync(self) -> None:
        """Make the data written so far durable (a mutation)."""

    def close(self) -> None:
        """Release the handle (not a mutation: it neither adds nor makes data durable)."""


class LockHandle(Protocol):
    """An exclusive advisory lock held until ``release``."""

    def release(self) -> None:
        """Release the lock."""


class FileSystem(Protocol):
    """What the agent needs from a filesystem. Reads never change anything."""

    def read_bytes(self, path: Path) -> bytes:
        """The whole file. Raises OSError (FileNotFoundError when missing)."""

    def exists(self, path: Path) -> bool:
        """Whether ``path`` exists."""

    def listdir(self, path: Path) -> list[str]:
        """Entry names of a directory, sorted. Raises OSError."""

    def is_dir(self, path: Path) -> bool:
        """Whether ``path`` is a directory."""

    def mkdir(self, path: Path) -> None:
        """Create one directory (parent must exist). Raises FileExistsError."""

    def create(self, path: Path) -> WriteHandle:
        """Create or truncate ``path`` for writing."""

    def replace(self, src: Path, dst: Path) -> None:
        """Atomically rename ``src`` over ``dst`` (same directory)."""

    def unlink(self, path: Path) -> None:
        """Remove a file."""

    def rmdir(self, path: Path) -> None:
        """Remove an empty directory."""

    def fsync_dir(self, path: Path) -> None:
        """Make the entries of directory ``path`` durable."""

    def lock(self, path: Path) -> LockHandle:
        """Take an exclusive, non-blocking lock on ``path`` (created if missing).

        Raises BlockingIOError when another process holds it.
        """


class _OsWriteHandle:
    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def fsync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class _OsLock:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)  # closing the descriptor drops the flock


class OsFileSystem:
    """The real filesystem (POSIX)."""

    def read_bytes(self, path: Path) -> bytes:
        return Path(path).read_bytes()

    def exists(self, path: Path) -> bool:
        return os.path.lexists(path)

    def listdir(self, path: Path) -> list[str]:
        return sorted(os.listdir(path))

    def is_dir(self, path: Path) -> bool:
        return os.path.isdir(path)

    def mkdir(self, path: Path) -> None:
        os.mkdir(path, 0o755)

    def create(self, path: Path) -> WriteHandle:
        return _OsWriteHandle(path)

    def replace(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def fsync_dir(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def lock(self, path: Path) -> LockHandle:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise BlockingIOError(exc.errno, f"{path} is locked by another process") from exc
            raise
        return _OsLock(fd)


def atomic_write(fs: FileSystem, path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably.

    Raises:
        OSError: any step failed; ``path`` still holds its old content.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    handle = fs.create(tmp)
    try:
        try:
            handle.write(data)
            handle.fsync()
        finally:
            handle.close()
        fs.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            fs.unlink(tmp)
        raise
    fs.fsync_dir(path.parent)


def ensure_dir(fs: FileSystem, path: Path) -> None:
    """Create ``path`` (and missing parents) durably; existing directories are fine.

    Raises:
        OSError: a directory could not be created or synced.
    """
    if fs.is_dir(path):
        return
    ensure_dir(fs, path.parent)
    try:
        fs.mkdir(path)
    except FileExistsError:
        if not fs.is_dir(path):
            raise
    fs.fsync_dir(path.parent)


def remove_tree(fs: FileSystem, path: Path) -> None:
    """Remove ``path`` and everything below it, then sync its parent.

    Raises:
        OSError: an entry could not be removed (other than being already gone).
    """
    if not fs.exists(path):
        return
    _remove_below(fs, path)
    with contextlib.suppress(FileNotFoundError):
        fs.rmdir(path)
    fs.fsync_dir(path.parent)


def _remove_below(fs: FileSystem, path: Path) -> None:
    for name in fs.listdir(path):
        child = path / name
        if fs.is_dir(child):
            _remove_below(fs, child)
            with contextlib.suppress(FileNotFoundError):
                fs.rmdir(child)
        else:
            with contextlib.suppress(FileNotFoundError):
                fs.unlink(child)
