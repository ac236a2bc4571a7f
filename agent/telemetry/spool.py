"""The telemetry spool: a bounded, crash-safe on-disk queue of encoded records.

A record is written here *first* (one file per record, atomic write + fsync),
never straight to the network; ``seq`` strictly increases per device across
restarts. See ``Spool`` for the layout and recovery rules.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from edgefleet import canonical
from edgefleet.fsutil import atomic_write_bytes
from edgefleet.wire import (
    MalformedMessageError,
    SpoolCounters,
)

__all__ = ["Spool", "WriteFile"]

log = logging.getLogger(__name__)

_RECORD_RE = re.compile(r"^(\d{20})\.rec$")
_META = "meta.json"

WriteFile = Callable[[Path, bytes], None]


def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, mode=0o600)


def _failure_kind(exc: OSError) -> str:
    return "enospc" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "write_errors"


class Spool:
    """Bounded, crash-safe on-disk queue of encoded records, keyed by ``seq``.

    Layout: ``<dir>/<seq as 20 digits>.rec`` (one record each, written
    atomically) and ``<dir>/meta.json`` (``next_seq`` and the loss counters
    not yet reported). ``write_file`` is the filesystem seam (tests inject a
    full disk through it).
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_records: int = 10_000,
        max_bytes: int = 64 << 20,
        write_file: WriteFile = _atomic_write,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Open the spool, recovering the next sequence number.

        Raises:
            OSError: the directory cannot be created or listed.
        """
        self.dir = Path(directory)
        self.max_records = max_records
        self.max_bytes = max_bytes
        self._write = write_file
        self._lock = threading.Lock()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._sizes: dict[int, int] = {}
        for path in self.dir.iterdir():
            m = _RECORD_RE.fullmatch(path.name)
            if m:
                self._sizes[int(m.group(1))] = path.stat().st_size
            elif path.name.startswith(".") and path.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    path.unlink()  # a write interrupted by a crash
        self._bytes = sum(self._sizes.values())
        self._pending = SpoolCounters()
        self._next = self._recover_next(clock)

    def _recover_next(self, clock: Callable[[], float]) -> int:
        floor = max(self._sizes, default=0) + 1
        try:
            doc = canonical.decode_strict((self.dir / _META).read_bytes())
            nxt = int(doc["next_seq"])
            self._pending = SpoolCounters.from_dict(doc["counters"])
            return max(nxt, floor)
        except FileNotFoundError:
            if self._sizes:
                log.warning("telemetry spool: meta.json missing; continuing above the clock")
        except (ValueError, KeyError, TypeError, MalformedMessageError):
            log.warning("telemetry spool: meta.json unreadable; continuing above the clock")
        # A fresh (or damaged) spool starts above the wall clock in milliseconds,
        # so seq keeps increasing even if the counter file was lost.
        return max(floor, int(clock() * 1000))

    def _meta_bytes(self, next_seq: int, counters: SpoolCounters) -> bytes:
        return canonical.encode({"next_seq": next_seq, "counters": counters.to_dict()})

    def _path(self, seq: int) -> Path:
        return self.dir / f"{seq:020d}.rec"

    @property
    def next_seq(self) -> int:
        return self._next

    def counters(self) -> SpoolCounters:
        """Losses not yet reported in a record."""
        with self._lock:
            return self._pending

    def append(self, build: Callable[[int, SpoolCounters], bytes]) -> int | None:
        """Build the next record with the unreported loss counters and spool it.

        ``build(seq, counters)`` returns the encoded record. Room is made by
        evicting the oldest records (counted as ``dropped``). The next ``seq``
        and the reset counters are persisted *before* the record file, so a
        crash can skip a ``seq`` but never reuse one.

        Returns:
            The record's ``seq``, or ``None`` if it could not be stored (the
            loss is counted and reported in the next record; nothing raises).
        """
        with self._lock:
            seq, counters = self._next, self._pending
            data = build(seq, counters)
            if len(data) > self.max_bytes:
                self._pending = counters + SpoolCounters(dropped=1)
                return None
            evicted = 0
            while self._sizes and (
                len(self._sizes) >= self.max_records or self._bytes + len(data) > self.max_bytes
            ):
                oldest = min(self._sizes)
                self._bytes -= self._sizes.pop(oldest)
                with contextlib.suppress(OSError):
                    self._path(oldest).unlink()
                evicted += 1
            carried = SpoolCounters(dropped=evicted)
            try:
                self._write(self.dir / _META, self._meta_bytes(seq + 1, carried))
            except OSError as exc:
                kind = _failure_kind(exc)
                self._pending = counters + carried + SpoolCounters(**{kind: 1})
                log.warning("telemetry spool: cannot reserve seq %d: %s", seq, exc)
                return None
            self._next = seq + 1
            self._pending = carried
            try:
                self._write(self._path(seq), data)
            except OSError as exc:
                kind = _failure_kind(exc)
                # The record carried the counters; it is lost, so they return.
                self._pending = counters + carried + SpoolCounters(**{kind: 1})
                with contextlib.suppress(OSError):
                    self._write(self.dir / _META, self._meta_bytes(self._next, self._pending))
                log.warning("telemetry spool: record %d lost: %s", seq, exc)
                return None
            self._sizes[seq] = len(data)
            self._bytes += len(data)
            return seq

    def count_rejected(self) -> None:
        """Count a record the broker refused for good (reported in the next record)."""
        with self._lock:
            self._pending = self._pending + SpoolCounters(rejected=1)

    def pending(self) -> list[int]:
        """Spooled sequence numbers, oldest first."""
        with self._lock:
            return sorted(self._sizes)

    def read(self, seq: int) -> bytes | None:
        """A spooled record's bytes (``None`` if it was removed or is unreadable)."""
        try:
            return self._path(seq).read_bytes()
        except OSError:
            return None

    def remove(self, seq: int) -> None:
        """Delete an acknowledged record (no-op if already gone)."""
        with self._lock:
            size = self._sizes.pop(seq, None)
            if size is not None:
                self._bytes -= size
        with contextlib.suppress(OSError):
            self._path(seq).unlink()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sizes)

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes
