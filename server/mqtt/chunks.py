"""The chunk service: bundle blocks for the devices that were told to fetch them.

Flow: the network thread hands each ``devices/{id}/chunks/req`` delivery to
``ChunkServer.submit`` (parse and queue; nothing else). The chunk thread
takes requests off the queue and checks each one: the bundle must be the
primary or shadow bundle of a current desired state of that device or of one
of its groups (``desired.allowed_bundles``), a published bundle on disk, and
the block size within limits; otherwise the device gets one error frame
(``unknown-bundle`` / ``bad-request``). Accepted blocks join the device's
pending set (a new bundle or block size replaces it; a repeated block is
queued once). The thread then sends one block per device per round (fair
between devices), each as a ``ChunkData`` frame read by
``edgefleet.chunks.ChunkResponder`` from a ``FileBlockSource`` (``pread``),
paced by a per-device token bucket (``chunk_rate_bytes_per_second``).

Invariants: memory per device is its pending block numbers plus, while
sending, one block; frames in flight to the broker are bounded
(``max_inflight_frames``), so the whole bundle is never held in memory. A
device never receives blocks of a bundle it was not assigned, whatever it
asks for (the ACL already keeps it from reading other devices' chunk
topics). Authorization is re-read from the database before any refusal, so a
fresh assignment is served at once; only positive answers are cached, for
``allow_cache_s``. Pending blocks are dropped while the broker connection is
down: devices ask again (``chunk_timeout_s``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session

from edgefleet.chunks import ChunkResponder, FileBlockSource, block_count
from edgefleet.errors import VerificationError
from edgefleet.topics import DeviceChannel, DeviceTopic, TopicError, parse_device_topic
from edgefleet.wire import (
    MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
    ChunkData,
    ChunkRefusal,
    ChunkRequest,
)
from server import metrics
from server.errors import NotFoundError
from server.mqtt.connection import Delivery, MqttError
from server.services import desired, registry

__all__ = ["ChunkServer"]

log = logging.getLogger("edgefleet.server.chunks")


@dataclass
class _Stream:
    """What one device is downloading and which blocks it still waits for."""

    bundle_id: str
    block_size: int
    token: str
    nblocks: int
    pending: dict[int, None] = field(default_factory=dict)  # insertion-ordered set
    tokens: float = 0.0  # token bucket, bytes
    refilled: float = 0.0  # monotonic seconds


class ChunkServer:
    """Answers chunk requests from bundle storage, paced per device."""

    def __init__(
        self,
        session_factory: Callable[[], Session],
        bundles_dir: Path,
        publish: Callable[[str, bytes], object],
        connected: Callable[[], bool],
        *,
        rate_bytes_per_s: int = 0,
        max_pending_blocks: int = 4096,
        max_inflight_frames: int = 64,
        inflight: Callable[[], int] = lambda: 0,
        allow_cache_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = session_factory
        self._bundles_dir = bundles_dir
        self._publish = publish
        self._connected = connected
        self._inflight = inflight
        self.rate = rate_bytes_per_s
        self.max_pending_blocks = max_pending_blocks
        self.max_inflight_frames = max_inflight_frames
        self.allow_cache_s = allow_cache_s
        self._clock = clock
        self._requests: queue.SimpleQueue[tuple[str, ChunkRequest]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._allowed: dict[str, tuple[float, frozenset[str]]] = {}
        self._sources: dict[str, FileBlockSource] = {}
        self._responder = ChunkResponder(self._sources.get, max_blocks_per_request=1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stats(self):  # type: ignore[no-untyped-def]
        """The responder's counters (requests, blocks and bytes sent, errors)."""
        return self._responder.stats

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="edgefleet-chunks", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout_s)
            self._thread = None

    def submit(self, delivery: Delivery) -> None:
        """Parse a request delivery and queue it (network thread; never blocks)."""
        metrics.MQTT_MESSAGES.labels(DeviceChannel.CHUNK_REQUEST.value).inc()
        try:
            topic = parse_device_topic(delivery.topic)
            request = ChunkRequest.from_bytes(delivery.payload)
        except (TopicError, VerificationError) as exc:
            metrics.CHUNK_REQUESTS.labels("malformed").inc()
            log.info("chunks: ignored a malformed request on %s: %s", delivery.topic, exc)
            return
        self._requests.put((topic.device_id, request))

    # ---------------------------------------------------------- authorization

    def _is_allowed(self, device: str, bundle_id: str) -> bool:
        now = self._clock()
        cached = self._allowed.get(device)
        if cached is not None and now - cached[0] < self.allow_cache_s and bundle_id in cached[1]:
            return True
        with self._sessions() as session:
            allowed = desired.allowed_bundles(session, device)
        self._allowed[device] = (now, allowed)
        return bundle_id in allowed

    def _source(self, bundle_id: str) -> FileBlockSource | None:
        source = self._sources.get(bundle_id)
        if source is not None:
            return source
        name, _, version = bundle_id.rpartition("-")
        if not name or not version.isdigit():
            return None
        try:
            with self._sessions() as session:
                row = registry.get_version(session, name, int(version))
                if row.status != registry.STATUS_PUBLISHED or not row.bundle_file:
                    return None
                path = self._bundles_dir / row.bundle_file
            source = FileBlockSource(path)
        except (NotFoundError, OSError) as exc:
            log.warning("chunks: bundle %s is not servable: %s", bundle_id, exc)
            return None
        self._sources[bundle_id] = source  # published bundles never change
        return source

    # ----------------------------------------------------------------- accept

    def _send(self, device: str, frame: ChunkData | ChunkRefusal) -> None:
        self._publish(str(DeviceTopic.chunk_data(device)), frame.to_bytes())

    def _accept(self, device: str, request: ChunkRequest) -> None:
        if not MIN_BLOCK_SIZE <= request.block_size <= MAX_BLOCK_SIZE:
            metrics.CHUNK_REQUESTS.labels("bad-request").inc()
            self._send(device, ChunkRefusal(request.bundle_id, "bad-request", request.token))
            return
        if not self._is_allowed(device, request.bundle_id):
            metrics.CHUNK_REQUESTS.labels("denied").inc()
            log.info("chunks: %s asked for %s, which it is not assigned", device, request.bundle_id)
            self._send(device, ChunkRefusal(request.bundle_id, "unknown-bundle", request.token))
            return
        source = self._source(request.bundle_id)
        if source is None:
            metrics.CHUNK_REQUESTS.labels("unknown-bundle").inc()
            self._send(device, ChunkRefusal(request.bundle_id, "unknown-bundle", request.token))
            return
        metrics.CHUNK_REQUESTS.labels("served").inc()
        stream = self._streams.get(device)
        if stream is None or (stream.bundle_id, stream.block_size) != (
            request.bundle_id,
            request.block_size,
        ):
            stream = _Stream(
                request.bundle_id,
                request.block_size,
                request.token,
                block_count(source.size, request.block_size),
                tokens=self._capacity(request.block_size),
                refilled=self._clock(),
            )
            self._streams[device] = stream
        stream.token = request.token
        for block in request.blocks():
            if block >= stream.nblocks or block in stream.pending:
                continue
            if len(stream.pending) >= self.max_pending_blocks:
                metrics.CHUNK_REQUESTS.labels("dropped").inc()
                break
            stream.pending[block] = None

    # ------------------------------------------------------------------ send

    def _capacity(self, block_size: int) -> float:
        return float(max(block_size, self.rate // 4)) if self.rate else float("inf")

    def _ready_in(self, stream: _Stream, now: float) -> float:
        """Seconds until the device may get its next block (0: now)."""
        if not self.rate:
            return 0.0
        capacity = self._capacity(stream.block_size)
        stream.tokens = min(capacity, stream.tokens + (now - stream.refilled) * self.rate)
        stream.refilled = now
        need = float(stream.block_size)
        return 0.0 if stream.tokens >= need else (need - stream.tokens) / self.rate

    def _round(self) -> float:
        """Send at most one block per device; return seconds to wait before the next round."""
        wait = 0.1
        now = self._clock()
        for device in list(self._streams):
            stream = self._streams[device]
            if not stream.pending:
                del self._streams[device]
                continue
            if self._inflight() >= self.max_inflight_frames:
                return 0.005
            delay = self._ready_in(stream, now)
            if delay > 0:
                wait = min(wait, delay)
                continue
            block = next(iter(stream.pending))
            del stream.pending[block]
            request = ChunkRequest(stream.bundle_id, stream.block_size, block, b"\x01",
                                   stream.token)  # fmt: skip
            try:
                for frame in self._responder.respond(request):
                    self._send(device, frame)
                    if isinstance(frame, ChunkData):
                        stream.tokens -= len(frame.data)
                        metrics.CHUNK_BYTES.inc(len(frame.data))
            except OSError as exc:
                log.error("chunks: cannot read %s: %s", stream.bundle_id, exc)
                self._sources.pop(stream.bundle_id, None)
                del self._streams[device]
                continue
            wait = 0.0
        return wait

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = 0.1
            try:
                if not self._connected():
                    self._streams.clear()  # devices ask again after reconnecting
                else:
                    wait = self._round()
            except MqttError as exc:
                log.warning("chunks: publish failed, retrying: %s", exc)
                wait = 0.05
            except Exception:  # a bug must not stop the chunk service
                log.exception("chunks: round failed")
                wait = 0.5
            try:
                item = self._requests.get(timeout=wait) if wait > 0 else self._requests.get_nowait()
            except queue.Empty:
                item = None
            while item is not None:
                try:
                    self._accept(*item)
                except Exception:
                    log.exception("chunks: request from %s failed", item[0])
                try:
                    item = self._requests.get_nowait()
                except queue.Empty:
                    item = None
