"""Resumable chunked bundle download over MQTT (block bitmap protocol).

Flow: the daemon accepts a signed desired state naming a bundle (id, sha256,
size) and creates a ``Downloader``. ``run()`` asks for missing blocks with
``ChunkRequest`` messages (a window of at most ``window_blocks`` blocks, topped
up while half of it is outstanding), re-asks for whatever has not arrived after
``request_timeout_s``, and returns the path of the complete, hash-verified
bundle. Incoming frames from the chunk-data topic go to ``deliver()`` (any
thread), which checks each frame and writes its block at its offset.

On-disk state in ``<state_dir>/downloads/`` survives an agent restart:

* ``<id>.part``: the bundle's bytes, preallocated to the declared size and
  written at block offsets (never past the declared size);
* ``<id>.state``: canonical JSON ``{bundle_id, sha256, size, block_size,
  bitmap}``, replaced atomically (temp, fsync, rename, dir fsync) and only
  after the ``.part`` blocks it claims were fsynced, so it never claims a block
  that is not on disk. A new ``Downloader`` for the same bundle resumes from
  it and requests only the missing blocks;
* ``<id>.bundle``: the completed file, renamed from ``.part`` after its sha256
  matched the signed desired state.

Guarantees: total size is bounded by the desired state's declared size (and
``max_bundle_bytes``); a frame larger than one block, for another size or
block size, or with a block out of range is refused before anything is
written; the whole-file sha256 is checked before the path is returned (a
mismatch discards the partial state and raises ``HashMismatchError``).
Transport problems raise ``TransportError`` subclasses and keep the partial
state for the next attempt. ``NetworkFaults`` injects drops, delays and
disconnects for tests and firmware_sim.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from edgefleet import canonical
from edgefleet.chunks import Bitmap, block_count, block_span, plan_request
from edgefleet.errors import (
    HashMismatchError,
    LengthMismatchError,
    OversizedPayloadError,
    TransportError,
)
from edgefleet.fsutil import atomic_write_bytes, fsync_dir
from edgefleet.topics import DeviceTopic
from edgefleet.wire import (
    MAX_BLOCK_SIZE,
    MAX_REQUEST_BLOCKS,
    MIN_BLOCK_SIZE,
    BundleRef,
    ChunkData,
    ChunkRefusal,
    ChunkRequest,
    MalformedMessageError,
    parse_chunk_frame,
)

__all__ = [
    "BundleUnavailableError",
    "ChunkTransport",
    "DownloadCancelledError",
    "DownloadOptions",
    "DownloadStalledError",
    "DownloadStorageError",
    "Downloader",
    "MqttChunkTransport",
    "NetworkFaults",
    "cleanup_downloads",
]

log = logging.getLogger(__name__)


class DownloadStalledError(TransportError):
    """Requested blocks stopped arriving while connected, ``max_stalls`` times in a row."""


class BundleUnavailableError(TransportError):
    """The chunk service answered that it cannot serve this bundle (yet)."""


class DownloadStorageError(TransportError):
    """The partial download could not be written (disk full, I/O error)."""


class DownloadCancelledError(TransportError):
    """``run`` was asked to stop; the partial state is kept for a resume."""


class ChunkTransport(Protocol):
    """How the downloader sends requests (the daemon publishes them over MQTT)."""

    @property
    def connected(self) -> bool:
        """True while requests can reach the chunk service."""
        ...

    def send_request(self, request: ChunkRequest) -> None:
        """Send one request (``TransportError`` on failure)."""
        ...


class Publisher(Protocol):
    """The slice of ``agent.mqtt.MqttConnection`` the MQTT transport needs."""

    @property
    def connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int: ...


class MqttChunkTransport:
    """Sends chunk requests to ``edgefleet/v1/devices/{device}/chunks/req`` with QoS 1."""

    def __init__(self, publisher: Publisher, device_id: str) -> None:
        self._publisher = publisher
        self._topic = str(DeviceTopic.chunk_request(device_id))

    @property
    def connected(self) -> bool:
        return self._publisher.connected

    def send_request(self, request: ChunkRequest) -> None:
        """Publish one request.

        Raises:
            TransportError: the publish could not be queued.
        """
        self._publisher.publish(self._topic, request.to_bytes(), qos=1)


@dataclass(frozen=True)
class DownloadOptions:
    """Download tuning, bounded."""

    block_size: int = 64 << 10  # bytes per block, [256 B, 256 KiB]
    window_blocks: int = 64  # blocks per request, [1, 2048]
    request_timeout_s: float = 10.0  # seconds without progress before re-requesting
    max_stalls: int = 30  # consecutive connected timeouts before DownloadStalledError
    persist_every_blocks: int = 16  # new blocks between bitmap checkpoints
    max_bundle_bytes: int = 2 << 30  # bytes; refuse larger declared sizes

    def __post_init__(self) -> None:
        if not MIN_BLOCK_SIZE <= self.block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}] bytes")
        if not 1 <= self.window_blocks <= MAX_REQUEST_BLOCKS:
            raise ValueError(f"window_blocks must be in [1, {MAX_REQUEST_BLOCKS}]")
        if not 0.05 <= self.request_timeout_s <= 3600:
            raise ValueError("request_timeout_s must be in [0.05, 3600] seconds")
        if not 1 <= self.max_stalls <= 100_000:
            raise ValueError("max_stalls must be in [1, 100000]")
        if not 1 <= self.persist_every_blocks <= 65536:
            raise ValueError("persist_every_blocks must be in [1, 65536]")
        if self.max_bundle_bytes < 1:
            raise ValueError("max_bundle_bytes must be positive")


@dataclass
class NetworkFaults:
    """Deterministic network faults applied to incoming chunk frames.

    ``drop_frames``: 1-based arrival numbers of frames to discard.
    ``drop_blocks_once``: block indexes whose first arrival is discarded.
    ``delay_s``: sleep before handling every frame (a slow link).
    ``disconnect_after``: after this many frames, call ``disconnect`` once
    (e.g. ``MqttConnection.drop_connection``).
    """

    drop_frames: frozenset[int] = frozenset()
    drop_blocks_once: frozenset[int] = frozenset()
    delay_s: float = 0.0
    disconnect_after: int | None = None
    disconnect: Callable[[], None] | None = None
    frames_seen: int = 0
    dropped: int = 0
    _dropped_blocks: set[int] = field(default_factory=set)

    def admit(self, block: int | None) -> bool:
        """Account for one frame; return False to drop it."""
        self.frames_seen += 1
        n = self.frames_seen
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.disconnect_after is not None and n == self.disconnect_after and self.disconnect:
            self.disconnect()
        drop = n in self.drop_frames
        if (
            block is not None
            and block in self.drop_blocks_once
            and block not in self._dropped_blocks
        ):
            self._dropped_blocks.add(block)
            drop = True
        if drop:
            self.dropped += 1
        return not drop


@dataclass
class DownloadStats:
    """Counters for status and tests."""

    requests: int = 0
    blocks_written: int = 0
    duplicate_blocks: int = 0
    rejected_frames: int = 0
    stale_frames: int = 0
    timeouts: int = 0
    resumed_blocks: int = 0
    requested_blocks: list[int] = field(default_factory=list)


def _state_paths(directory: Path, bundle_id: str) -> tuple[Path, Path, Path]:
    return (
        directory / f"{bundle_id}.part",
        directory / f"{bundle_id}.state",
        directory / f"{bundle_id}.bundle",
    )


def cleanup_downloads(state_dir: Path, keep: set[str]) -> list[str]:
    """Remove partial and complete downloads of bundles not in ``keep``; return their ids."""
    directory = Path(state_dir) / "downloads"
    removed: set[str] = set()
    if not directory.is_dir():
        return []
    for path in directory.iterdir():
        stem, _, ext = path.name.rpartition(".")
        if ext in ("part", "state", "bundle") and stem not in keep:
            with contextlib.suppress(OSError):
                path.unlink()
                removed.add(stem)
    return sorted(removed)


class Downloader:
    """Downloads one bundle into ``<state_dir>/downloads`` and verifies it."""

    def __init__(
        self,
        state_dir: Path,
        bundle: BundleRef,
        transport: ChunkTransport,
        options: DownloadOptions | None = None,
        *,
        faults: NetworkFaults | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Open (or resume) the partial download.

        Raises:
            OversizedPayloadError: the declared size exceeds ``max_bundle_bytes``.
            DownloadStorageError: the partial file cannot be created (e.g. ENOSPC).
        """
        self.bundle = bundle
        self.options = options or DownloadOptions()
        self.transport = transport
        self.faults = faults
        self._clock = clock
        if bundle.size > self.options.max_bundle_bytes:
            raise OversizedPayloadError(
                f"bundle {bundle.id} declares {bundle.size} bytes, limit "
                f"{self.options.max_bundle_bytes}"
            )
        self.dir = Path(state_dir) / "downloads"
        self.part_path, self.state_path, self.final_path = _state_paths(self.dir, bundle.id)
        self.nblocks = block_count(bundle.size, self.options.block_size)
        self.stats = DownloadStats()
        self._cond = threading.Condition()
        self._outstanding: set[int] = set()
        self._cursor = 0
        self._since_persist = 0
        self._failure: BaseException | None = None
        self._last_progress = clock()
        self._token = secrets.token_hex(6)
        self._fd: int | None = None
        self.have = Bitmap(self.nblocks)
        if not self.final_path.exists():
            self._open()

    # ------------------------------------------------------------ persistence

    def _open(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            resumed = self._load_state()
            flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
            self._fd = os.open(self.part_path, flags, 0o600)
            if not resumed:
                os.ftruncate(self._fd, 0)
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(self._fd, 0, self.bundle.size)
                else:  # pragma: no cover - non-Linux
                    os.ftruncate(self._fd, self.bundle.size)
                os.fsync(self._fd)
                self._write_state()
        except OSError as exc:
            self._close()
            raise DownloadStorageError(
                f"cannot prepare download of {self.bundle.id} in {self.dir}: {exc}"
            ) from exc

    def _load_state(self) -> bool:
        """Load a matching checkpoint; return True if resuming."""
        try:
            raw = self.state_path.read_bytes()
            part_size = self.part_path.stat().st_size
        except FileNotFoundError:
            return False
        try:
            doc = canonical.decode_strict(raw)
            matches = (
                doc.get("bundle_id") == self.bundle.id
                and doc.get("sha256") == self.bundle.sha256
                and doc.get("size") == self.bundle.size
                and doc.get("block_size") == self.options.block_size
                and part_size == self.bundle.size
            )
            if not matches:
                log.info(
                    "download %s: checkpoint is for another file; starting over", self.bundle.id
                )
                return False
            bits = base64.b64decode(str(doc["bitmap"]), validate=True)
            self.have = Bitmap.from_bytes(self.nblocks, bits)
        except (canonical.CanonicalError, binascii.Error, ValueError, KeyError):
            log.warning("download %s: checkpoint unreadable; starting over", self.bundle.id)
            self.have = Bitmap(self.nblocks)
            return False
        self.stats.resumed_blocks = self.have.count
        return True

    def _write_state(self) -> None:
        doc = {
            "bundle_id": self.bundle.id,
            "sha256": self.bundle.sha256,
            "size": self.bundle.size,
            "block_size": self.options.block_size,
            "bitmap": base64.b64encode(self.have.to_bytes()).decode("ascii"),
        }
        atomic_write_bytes(self.state_path, canonical.encode(doc), mode=0o600)

    def _checkpoint(self) -> None:
        """fsync the data, then record which blocks it holds (caller holds the lock)."""
        if self._fd is None:
            return
        os.fsync(self._fd)
        self._write_state()
        self._since_persist = 0

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Delete the partial and completed files of this bundle."""
        with self._cond:
            self._close()
            for path in (self.part_path, self.state_path, self.final_path):
                with contextlib.suppress(OSError):
                    path.unlink()

    # --------------------------------------------------------------- receive

    @property
    def complete(self) -> bool:
        return self.final_path.exists() or self.have.complete

    def progress(self) -> tuple[int, int]:
        """``(blocks held, total blocks)``."""
        if self.final_path.exists():
            return self.nblocks, self.nblocks
        return self.have.count, self.nblocks

    def deliver(self, payload: bytes) -> bool:
        """Handle one frame from the chunk-data topic; return True if a new block was stored.

        Never raises: bad frames are counted and dropped, and a fatal problem
        (wrong file size, storage failure, unknown bundle) is handed to ``run``.
        """
        try:
            frame = parse_chunk_frame(payload, max_block_size=self.options.block_size)
        except MalformedMessageError as exc:
            self.stats.rejected_frames += 1
            log.info("download %s: rejected frame: %s", self.bundle.id, exc)
            return False
        if frame.bundle_id != self.bundle.id:
            self.stats.stale_frames += 1
            return False
        if isinstance(frame, ChunkRefusal):
            self._fail(
                BundleUnavailableError(f"chunk service: {frame.reason} for {frame.bundle_id}")
            )
            return False
        if self.faults is not None and not self.faults.admit(frame.block):
            return False
        return self._store(frame)

    def _store(self, frame: ChunkData) -> bool:
        if frame.block_size != self.options.block_size:
            self.stats.stale_frames += 1  # an answer to a request with another block size
            return False
        if frame.file_size != self.bundle.size:
            self._fail(
                LengthMismatchError(
                    f"chunk service serves {frame.file_size} bytes for {self.bundle.id}, the "
                    f"signed desired state declares {self.bundle.size}"
                )
            )
            return False
        offset, length = block_span(frame.block, self.bundle.size, self.options.block_size)
        if len(frame.data) != length or offset + length > self.bundle.size:
            self.stats.rejected_frames += 1  # unreachable: ChunkData checks it; kept as a guard
            return False
        with self._cond:
            if self._fd is None or frame.block in self.have:
                self.stats.duplicate_blocks += 1
                return False
            try:
                written = os.pwrite(self._fd, frame.data, offset)
                if written != length:
                    raise OSError(errno.EIO, f"short write at {offset}")
                self.have.add(frame.block)
                self._outstanding.discard(frame.block)
                self.stats.blocks_written += 1
                self._last_progress = self._clock()
                self._since_persist += 1
                if self._since_persist >= self.options.persist_every_blocks or self.have.complete:
                    self._checkpoint()
            except OSError as exc:
                self._failure = DownloadStorageError(f"cannot write block {frame.block}: {exc}")
                self._failure.__cause__ = exc
            self._cond.notify_all()
        return True

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            self._failure = error
            self._cond.notify_all()

    # ------------------------------------------------------------------- run

    def _plan(self) -> list[ChunkRequest]:
        """Requests that keep more than half a window outstanding (lock held)."""
        opts = self.options
        planned: list[ChunkRequest] = []
        while len(self._outstanding) <= opts.window_blocks // 2:
            request = plan_request(
                self.bundle.id,
                self.have,
                opts.block_size,
                max_blocks=opts.window_blocks,
                start=self._cursor,
                exclude=self._outstanding.__contains__,
                token=self._token,
            )
            if request is None:
                break
            blocks = request.blocks()
            planned.append(request)
            self.stats.requests += 1
            self.stats.requested_blocks.extend(blocks)
            self._outstanding.update(blocks)
            self._cursor = blocks[-1] + 1
        return planned

    def run(self, *, stop: threading.Event | None = None, deadline_s: float | None = None) -> Path:
        """Download the missing blocks and return the verified bundle's path.

        Args:
            stop: set it to make ``run`` return early (partial state kept).
            deadline_s: give up after this many seconds (``DownloadStalledError``).

        Returns:
            ``<state_dir>/downloads/<id>.bundle``, whose sha256 matches.

        Raises:
            HashMismatchError: the assembled file does not match the signed
                sha256 (partial state discarded).
            LengthMismatchError: the chunk service serves a file of another size.
            DownloadStalledError: no progress while connected, ``max_stalls``
                times in a row, or past ``deadline_s``.
            BundleUnavailableError: the chunk service does not know the bundle.
            DownloadStorageError: writing failed (disk full, I/O error).
            DownloadCancelledError: ``stop`` was set.
            TransportError: sending a request failed.
        """
        if self.final_path.exists():
            return self._verify_final()
        started = self._clock()
        stalls = 0
        with self._cond:
            self._last_progress = self._clock()
            seen = self.have.count
        while True:
            with self._cond:
                if self.have.complete:
                    break
                self._raise_if_finished(stop, started, deadline_s)
                now = self._clock()
                if self.have.count != seen:
                    seen, stalls = self.have.count, 0
                if now - self._last_progress >= self.options.request_timeout_s:
                    self._last_progress = now
                    if self.transport.connected:
                        stalls += 1
                        self.stats.timeouts += 1
                        if stalls > self.options.max_stalls:
                            self._persist_quietly()
                            raise DownloadStalledError(
                                f"no block of {self.bundle.id} arrived in {stalls} timeouts"
                            )
                    # Forget what was asked: whatever is still missing is asked again.
                    self._outstanding.clear()
                    self._cursor = 0
                planned = self._plan() if self.transport.connected else []
            # Send outside the lock: the network thread delivers frames under it.
            for request in planned:
                self.transport.send_request(request)
            with self._cond:
                if not self.have.complete and self._failure is None:
                    self._cond.wait(timeout=min(0.05, self.options.request_timeout_s / 4))
        with self._cond:
            try:
                self._checkpoint()
            except OSError as exc:
                raise DownloadStorageError(f"cannot checkpoint {self.bundle.id}: {exc}") from exc
            self._close()
        return self._finish()

    def _raise_if_finished(
        self, stop: threading.Event | None, started: float, deadline_s: float | None
    ) -> None:
        """Raise the pending failure, a cancel or a deadline (lock held)."""
        if self._failure is not None:
            failure, self._failure = self._failure, None
            self._persist_quietly()
            raise failure
        if stop is not None and stop.is_set():
            self._persist_quietly()
            raise DownloadCancelledError(f"download of {self.bundle.id} stopped")
        if deadline_s is not None and self._clock() - started > deadline_s:
            self._persist_quietly()
            raise DownloadStalledError(
                f"download of {self.bundle.id} exceeded {deadline_s:.0f} s "
                f"({self.have.count}/{self.nblocks} blocks)"
            )

    def _persist_quietly(self) -> None:
        try:
            self._checkpoint()
        except OSError as exc:
            log.warning("download %s: checkpoint failed: %s", self.bundle.id, exc)

    def _hash(self, path: Path) -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while True:
                block = fh.read(1 << 20)
                if not block:
                    break
                digest.update(block)
        return digest.hexdigest()

    def _finish(self) -> Path:
        try:
            actual = self._hash(self.part_path)
        except OSError as exc:
            raise DownloadStorageError(f"cannot read {self.part_path}: {exc}") from exc
        if actual != self.bundle.sha256:
            self.discard()
            raise HashMismatchError(
                f"downloaded bundle {self.bundle.id} has sha256 {actual[:16]}..., the signed "
                f"desired state declares {self.bundle.sha256[:16]}..."
            )
        try:
            os.replace(self.part_path, self.final_path)
            fsync_dir(self.dir)
            self.state_path.unlink(missing_ok=True)
        except OSError as exc:
            raise DownloadStorageError(f"cannot finalise {self.final_path}: {exc}") from exc
        return self.final_path

    def _verify_final(self) -> Path:
        """A completed file from an earlier run: check it again before trusting it."""
        try:
            ok = self._hash(self.final_path) == self.bundle.sha256
            size_ok = self.final_path.stat().st_size == self.bundle.size
        except OSError as exc:
            raise DownloadStorageError(f"cannot read {self.final_path}: {exc}") from exc
        if not (ok and size_ok):
            self.discard()
            raise HashMismatchError(f"stored bundle {self.bundle.id} no longer matches its sha256")
        return self.final_path

    def abandon(self) -> None:
        """What the kernel does when the process dies: close the file, write nothing.

        Used by the simulator's power cuts; the next ``Downloader`` on the same
        state directory resumes from the last durable checkpoint.
        """
        with self._cond:
            self._close()

    def close(self) -> None:
        """Checkpoint and release the file (the download can be resumed later)."""
        with self._cond:
            if self._fd is not None:
                self._persist_quietly()
            self._close()
