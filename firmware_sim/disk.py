"""Simulated device storage: the agent's ``FileSystem`` with faults and power loss.

Flow: ``SimDisk`` performs every operation on a real directory (so the files
can be inspected and onnxruntime loads real bytes) and counts each mutation
(``mkdir``, ``create``, ``write``, ``fsync``, ``replace``, ``unlink``, ``rmdir``,
``fsync_dir``, ``lock``). A ``FaultPlan`` armed with ``arm`` makes the k-th
mutation from then on either fail with ``OSError`` (EIO, ENOSPC, ...) without
taking effect, or kill the agent: ``ProcessKilled`` / ``PowerCut`` are
``BaseException``s, so the agent's ``except Exception`` never swallows them,
and after the kill every further mutation raises again, so ``finally`` blocks
unwinding through the agent cannot clean up either: the directory is left
exactly as the dead process left it.

Durability model (what ``power_loss`` undoes), the worst case POSIX allows:

* file data written but not fsynced is lost: the file is truncated to the
  length it had at its last ``fsync`` (zero if never synced);
* directory entries (created, renamed over, unlinked, made or removed
  directories) not followed by an ``fsync_dir`` of their parent are undone,
  newest first (a rename is reverted and the overwritten file restored).

A process kill (``ProcessKilled``, SIGKILL) loses nothing: the page cache
survives. ``free_bytes`` simulates a nearly full disk: a write beyond it fails
with ENOSPC.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agent.fs import FileSystem, LockHandle, OsFileSystem, WriteHandle

__all__ = [
    "MUTATIONS",
    "FaultPlan",
    "Mutation",
    "PowerCut",
    "ProcessKilled",
    "SimDisk",
    "SimulatedCrash",
]

MUTATIONS = ("mkdir", "create", "write", "fsync", "replace", "unlink", "rmdir", "fsync_dir", "lock")


class SimulatedCrash(BaseException):
    """The simulated device stopped mid-operation (never caught by the agent)."""


class ProcessKilled(SimulatedCrash):
    """The agent's process died (SIGKILL, segfault); written data survives."""


class PowerCut(SimulatedCrash):
    """Power failed; whatever was not durable is lost at the next ``power_loss``."""


@dataclass(frozen=True)
class Mutation:
    """One counted mutation."""

    index: int  # 1-based, since the disk was created
    op: str
    path: str


@dataclass
class FaultPlan:
    """What the disk does to the k-th mutation from when it is armed.

    ``kind`` is ``"oserror"`` (the mutation fails with ``errno`` and does not
    happen), ``"kill"`` (``ProcessKilled``) or ``"power"`` (``PowerCut``).
    """

    at: int
    kind: str = "oserror"
    errno: int = errno.EIO
    sticky: bool = False  # keep failing every mutation after the first (dead disk)

    def __post_init__(self) -> None:
        if self.at < 1:
            raise ValueError("FaultPlan.at counts from 1")
        if self.kind not in ("oserror", "kill", "power"):
            raise ValueError("FaultPlan.kind must be oserror, kill or power")


@dataclass
class _Journal:
    unsynced: dict[Path, int] = field(default_factory=dict)  # path -> durable length
    entries: list[tuple[str, Path, Path | None, bytes | None]] = field(default_factory=list)


class _SimHandle:
    def __init__(self, disk: SimDisk, path: Path, inner: WriteHandle) -> None:
        self._disk = disk
        self._path = path
        self._inner = inner
        self.length = 0

    def write(self, data: bytes | memoryview) -> None:
        self._disk._mutate("write", self._path)
        size = len(data)
        self._disk._consume(size)
        self._inner.write(data)
        self.length += size

    def fsync(self) -> None:
        self._disk._mutate("fsync", self._path)
        self._inner.fsync()
        self._disk._journal.unsynced.pop(self._path, None)

    def close(self) -> None:
        self._inner.close()


class SimDisk:
    """A fault-injecting, durability-modelling ``FileSystem`` over a real directory."""

    def __init__(self, *, free_bytes: int | None = None) -> None:
        self._os: FileSystem = OsFileSystem()
        self._journal = _Journal()
        self._plan: FaultPlan | None = None
        self._armed_at = 0
        self._tripped = False
        self.dead: SimulatedCrash | None = None
        self.count = 0
        self.log: list[Mutation] = []
        self.free_bytes = free_bytes
        self.faults = 0
        self.tripped_at: Mutation | None = None  # the last mutation a fault hit
        # Called after each mutation took effect (campaigns use it to find the
        # mutation that made an outcome durable).
        self.watch: Callable[[Mutation], None] | None = None

    # ------------------------------------------------------------ control

    def arm(self, plan: FaultPlan | None) -> None:
        """Apply ``plan`` to the mutations from now on (None disarms)."""
        self._plan = plan
        self._armed_at = self.count
        self._tripped = False

    @property
    def tripped(self) -> bool:
        """Whether the armed fault has fired."""
        return self._tripped

    def kill(self, crash: SimulatedCrash) -> SimulatedCrash:
        """Declare the process dead now (e.g. onnxruntime segfaulted); return ``crash``."""
        self.dead = crash
        return crash

    def revive(self) -> None:
        """After a process death: the next process may write again; nothing is lost."""
        self.dead = None
        self._plan = None

    def power_loss(self) -> None:
        """Undo everything not durable (see the module docstring); the disk works again."""
        for path, length in self._journal.unsynced.items():
            if path.is_file():
                os.truncate(path, min(length, path.stat().st_size))
        for op, path, other, snapshot in reversed(self._journal.entries):
            if not path.parent.is_dir():
                continue  # its directory is gone for good: so is the entry
            if op in ("create", "lock"):
                if path.is_file():
                    path.unlink()
            elif op == "replace":
                assert other is not None  # other = the source path
                if path.exists():
                    os.rename(path, other)
                if snapshot is not None:
                    path.write_bytes(snapshot)
            elif op == "unlink":
                if snapshot is not None:
                    path.write_bytes(snapshot)
            elif op == "mkdir":
                shutil.rmtree(path, ignore_errors=True)
            elif op == "rmdir" and not path.exists():
                path.mkdir()
        self._journal = _Journal()
        self.dead = None
        self._plan = None

    def pending_entries(self) -> int:
        """Directory changes not yet made durable (for tests of the model itself)."""
        return len(self._journal.entries)

    # ------------------------------------------------------------ internals

    def _mutate(self, op: str, path: Path) -> None:
        if self.dead is not None:
            raise self.dead
        self.count += 1
        self.log.append(Mutation(self.count, op, str(path)))
        plan = self._plan
        if plan is None:
            return
        nth = self.count - self._armed_at
        if nth < plan.at or (self._tripped and not plan.sticky):
            return
        self._tripped = True
        self.faults += 1
        self.tripped_at = self.log[-1]
        if plan.kind == "oserror":
            name = errno.errorcode.get(plan.errno, str(plan.errno))
            raise OSError(plan.errno, f"simulated {name}", str(path))
        crash: SimulatedCrash = (
            PowerCut(f"power cut at mutation {self.count} ({op} {path})")
            if plan.kind == "power"
            else ProcessKilled(f"process killed at mutation {self.count} ({op} {path})")
        )
        self.dead = crash
        raise crash

    def _consume(self, size: int) -> None:
        if self.free_bytes is None:
            return
        if size > self.free_bytes:
            raise OSError(errno.ENOSPC, "simulated: no space left on device")
        self.free_bytes -= size

    def _credit(self, path: Path) -> None:
        if self.free_bytes is not None and path.is_file():
            self.free_bytes += path.stat().st_size

    def _durable_bytes(self, path: Path) -> bytes | None:
        if not path.is_file():
            return None
        data = path.read_bytes()
        if path in self._journal.unsynced:
            data = data[: self._journal.unsynced[path]]
        return data

    def _entry(
        self, op: str, path: Path, other: Path | None = None, snap: bytes | None = None
    ) -> None:
        self._journal.entries.append((op, path, other, snap))

    # ------------------------------------------------------------ FileSystem

    def read_bytes(self, path: Path) -> bytes:
        return self._os.read_bytes(path)

    def exists(self, path: Path) -> bool:
        return self._os.exists(path)

    def listdir(self, path: Path) -> list[str]:
        return self._os.listdir(path)

    def is_dir(self, path: Path) -> bool:
        return self._os.is_dir(path)

    def mkdir(self, path: Path) -> None:
        path = Path(path)
        self._mutate("mkdir", path)
        self._os.mkdir(path)
        self._entry("mkdir", path)

    def create(self, path: Path) -> WriteHandle:
        path = Path(path)
        self._mutate("create", path)
        existed = path.exists()
        if existed:
            self._credit(path)
        inner = self._os.create(path)
        if not existed:
            self._entry("create", path)
        self._journal.unsynced[path] = 0
        return _SimHandle(self, path, inner)

    def replace(self, src: Path, dst: Path) -> None:
        src, dst = Path(src), Path(dst)
        self._mutate("replace", dst)
        snapshot = self._durable_bytes(dst)
        self._credit(dst)
        self._os.replace(src, dst)
        self._entry("replace", dst, src, snapshot)
        if src in self._journal.unsynced:
            self._journal.unsynced[dst] = self._journal.unsynced.pop(src)
        else:
            self._journal.unsynced.pop(dst, None)

    def unlink(self, path: Path) -> None:
        path = Path(path)
        self._mutate("unlink", path)
        snapshot = self._durable_bytes(path)
        self._credit(path)
        self._os.unlink(path)
        self._entry("unlink", path, None, snapshot)
        self._journal.unsynced.pop(path, None)

    def rmdir(self, path: Path) -> None:
        path = Path(path)
        self._mutate("rmdir", path)
        self._os.rmdir(path)
        self._entry("rmdir", path)

    def fsync_dir(self, path: Path) -> None:
        path = Path(path)
        self._mutate("fsync_dir", path)
        self._os.fsync_dir(path)
        if self.watch is not None:
            self.watch(self.log[-1])
        entries = self._journal.entries
        # A removal made durable takes the removed directory's pending entries with it.
        gone = [(i, e[1]) for i, e in enumerate(entries) if e[0] == "rmdir" and e[1].parent == path]
        self._journal.entries = [
            e
            for i, e in enumerate(entries)
            if e[1].parent != path and not any(i < j and d in e[1].parents for j, d in gone)
        ]

    def lock(self, path: Path) -> LockHandle:
        path = Path(path)
        self._mutate("lock", path)
        existed = path.exists()
        handle = self._os.lock(path)
        if not existed:
            self._entry("lock", path)
        return handle
