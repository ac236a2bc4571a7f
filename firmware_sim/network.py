"""The simulated network: a real broker, a real chunk service, the real downloader.

Flow: ``SimNetwork(broker)`` connects a ``SimChunkService`` to a running MQTT
broker (Mosquitto in the tests). The service answers ``chunks/req`` messages
with ``edgefleet.chunks.ChunkResponder`` over the bundle files registered
with ``serve`` and publishes each frame (QoS 1) to the requesting device's
``chunks/data``, exactly as the server's chunk service does. A device's
process opens a ``SimLink`` (its own ``agent.mqtt.MqttConnection``); the link
hands every chunk frame to the downloader attached to it.
``download_and_install`` is what the daemon does with a desired state: tell
the core a download begins, run the real ``agent.download.Downloader`` into
``<state_dir>/daemon/downloads``, and give the verified file to the real
``Agent.install`` (or abort the update with the download's error).

Faults, each where it happens on a real device:

* ``NetworkFaults`` (the downloader's own hook): deterministic drops,
  ``seeded_loss`` (a seeded fraction of frames lost), delays, and a
  disconnect (``SimLink.disconnect`` cuts the TCP connection);
* the link: ``corrupt_blocks`` flips a data byte of a block's first arrival
  (chunk frames carry no checksum: only the whole-file sha256 catches it),
  and ``at_frame(n, action)`` runs an action when the n-th frame arrives
  (cut the power, restart the broker) so that faults land mid-download;
* the broker: ``SimNetwork.restart_broker`` (sessions and queued QoS 1
  messages survive when the broker persists them);
* power: once the device's disk declares the process dead (``SimDevice.
  cut_power_now``), the link delivers nothing more and the downloader's
  clock raises the crash on the thread running the download, so nothing is
  checkpointed that a dead process could not have written. The downloader
  writes with ``os`` calls, not through ``SimDisk``; ``lose_unsynced_downloads``
  applies the worst case of the durability model to its files instead: every
  block its durable checkpoint does not claim is overwritten with garbage.

Nothing here is a second agent: the bytes go through Mosquitto, the agent's
MQTT client, its downloader, verifier and update machine.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.core import Agent, InstallResult, new_update_id
from agent.download import (
    Downloader,
    DownloadOptions,
    DownloadStats,
    MqttChunkTransport,
    NetworkFaults,
    cleanup_downloads,
)
from agent.mqtt import MqttConnection, MqttError, MqttOptions
from edgefleet import canonical
from edgefleet.chunks import Bitmap, ChunkResponder, FileBlockSource, block_count, block_span
from edgefleet.errors import EdgefleetError
from edgefleet.topics import DeviceChannel, DeviceTopic, TopicError, all_devices, parse, shared
from edgefleet.wire import (
    BundleRef,
    ChunkData,
    ChunkRequest,
    MalformedMessageError,
    parse_chunk_frame,
)
from firmware_sim.disk import SimulatedCrash

__all__ = [
    "SIM_DOWNLOAD_OPTIONS",
    "Broker",
    "NetworkInstall",
    "SimChunkService",
    "SimLink",
    "SimNetwork",
    "download_and_install",
    "lose_unsynced_downloads",
    "seeded_loss",
]

log = logging.getLogger(__name__)

# Small blocks and short timeouts: a bundle of ~140 KB is ~35 blocks, and a
# lost frame is asked for again after 0.3 s instead of 10 s.
SIM_DOWNLOAD_OPTIONS = DownloadOptions(
    block_size=4096,  # bytes
    window_blocks=16,
    request_timeout_s=0.3,  # seconds
    max_stalls=20,
    persist_every_blocks=4,
)


class Broker(Protocol):
    """The broker process the network runs on (``tests.mosquitto.Mosquitto`` fits)."""

    host: str
    port: int

    def start(self) -> None:
        """Start and return once it accepts connections."""
        ...

    def stop(self) -> None:
        """Stop cleanly (a persisting broker writes its sessions)."""
        ...


def _mqtt_options(broker: Broker, client_id: str) -> MqttOptions:
    return MqttOptions(
        host=broker.host,
        port=broker.port,
        client_id=client_id,
        backoff_initial_s=0.05,  # seconds: reconnect quickly after a broker restart
        backoff_max_s=0.3,
        max_queued_messages=10_000,
    )


def seeded_loss(
    rate: float,
    seed: int,
    *,
    horizon: int = 10_000,
    delay_s: float = 0.0,
    disconnect_after: int | None = None,
    disconnect: Callable[[], None] | None = None,
) -> NetworkFaults:
    """``NetworkFaults`` that drop a seeded random fraction of the incoming frames.

    Args:
        rate: probability that a frame is lost, in [0, 1).
        seed: the random seed (same seed, same lost arrivals).
        horizon: frames after this many arrivals are never dropped, so every
            download ends.
        delay_s, disconnect_after, disconnect: as in ``NetworkFaults``.

    Raises:
        ValueError: ``rate`` outside [0, 1) or ``horizon`` < 1.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError("rate must be in [0, 1)")
    if horizon < 1:
        raise ValueError("horizon must be positive")
    rng = random.Random(seed)
    lost = frozenset(n for n in range(1, horizon + 1) if rng.random() < rate)
    return NetworkFaults(
        drop_frames=lost,
        delay_s=delay_s,
        disconnect_after=disconnect_after,
        disconnect=disconnect,
    )


# ----------------------------------------------------------------- the server


class SimChunkService:
    """The server half of the chunk protocol on a real broker.

    Subscribes to every device's ``chunks/req`` (shared subscription, as
    server replicas do); a worker thread answers each request with
    ``ChunkResponder`` and publishes the frames to that device's ``chunks/data``.
    ``blocks_sent`` counts the blocks served per device (what a device fetched).

    Raises:
        MqttError: the broker did not accept the connection within 10 s.
    """

    def __init__(self, broker: Broker, *, client_id: str = "sim-chunk-service") -> None:
        self._files: dict[str, Path] = {}
        self._lock = threading.Lock()
        self.responder = ChunkResponder(self._resolve)
        self.blocks_sent: collections.Counter[str] = collections.Counter()
        self.requests: collections.Counter[str] = collections.Counter()
        self._work: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self.conn = MqttConnection(_mqtt_options(broker, client_id), on_message=self._on_message)
        self.conn.subscribe(str(shared("chunks", all_devices(DeviceChannel.CHUNK_REQUEST))))
        self._worker = threading.Thread(target=self._serve, name="sim-chunk-service", daemon=True)
        self._worker.start()
        self.conn.start()
        if not self.conn.wait_connected(10):
            self.stop()
            raise MqttError(f"chunk service cannot connect: {self.conn.last_error}")

    def serve(self, path: Path, bundle_id: str | None = None) -> BundleRef:
        """Make ``path`` downloadable; return the reference a desired state would carry.

        Raises:
            OSError: the file cannot be read.
        """
        path = Path(path)
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        ref = BundleRef(bundle_id or path.stem, digest.hexdigest(), path.stat().st_size)
        with self._lock:
            self._files[ref.id] = path
        return ref

    def _resolve(self, bundle_id: str) -> FileBlockSource | None:
        with self._lock:
            path = self._files.get(bundle_id)
        return None if path is None else FileBlockSource(path)

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            target = parse(topic)
        except TopicError:
            return
        if isinstance(target, DeviceTopic) and target.channel is DeviceChannel.CHUNK_REQUEST:
            self._work.put((target.device_id, payload))

    def _serve(self) -> None:
        while (item := self._work.get()) is not None:
            device_id, payload = item
            try:
                request = ChunkRequest.from_bytes(payload)
            except MalformedMessageError as exc:
                log.info("sim chunk service: bad request from %s: %s", device_id, exc)
                continue
            self.requests[device_id] += 1
            out = str(DeviceTopic.chunk_data(device_id))
            try:
                for frame in self.responder.respond(request):
                    self.conn.publish(out, frame.to_bytes(), qos=1)
                    if isinstance(frame, ChunkData):
                        self.blocks_sent[device_id] += 1
            except (OSError, MqttError) as exc:  # the device asks again after its timeout
                log.info("sim chunk service: cannot answer %s: %s", device_id, exc)

    def stop(self) -> None:
        """Stop the worker and disconnect."""
        self._work.put(None)
        self._worker.join(5)
        self.conn.stop(timeout_s=2)


# ------------------------------------------------------------------- the link


class SimLink:
    """One device process's MQTT connection, carrying chunk frames to its downloader.

    Args:
        broker: where to connect.
        device_id: the MQTT client id and topic name of the device.
        dead: the crash that killed the device's process, or None while it
            lives (a dead process's network thread delivers nothing).

    Raises:
        MqttError: the broker did not accept the connection within 10 s.
    """

    def __init__(
        self,
        broker: Broker,
        device_id: str,
        *,
        dead: Callable[[], SimulatedCrash | None] = lambda: None,
    ) -> None:
        self.device_id = device_id
        self._dead = dead
        self._killed = False
        self._lock = threading.Lock()
        self._delivering = threading.Lock()  # held while a frame is handed to the downloader
        self._downloader: Downloader | None = None
        self._actions: dict[int, list[Callable[[], None]]] = {}
        self._corrupted: set[int] = set()
        self.corrupt_blocks: set[int] = set()  # flip a byte of these blocks' first arrival
        self.frames = 0  # chunk frames that reached this process
        self.corrupted = 0
        self.conn = MqttConnection(_mqtt_options(broker, device_id), on_message=self._on_message)
        self.conn.subscribe(str(DeviceTopic.chunk_data(device_id)))
        self.conn.start()
        if not self.conn.wait_connected(10):
            self.conn.stop(timeout_s=2)
            raise MqttError(f"device {device_id} cannot connect: {self.conn.last_error}")
        self.transport = MqttChunkTransport(self.conn, device_id)

    # ------------------------------------------------------------- faults

    def at_frame(self, n: int, action: Callable[[], None]) -> None:
        """Run ``action`` when the n-th chunk frame from now arrives, before it is handled.

        The action runs on the link's network thread (a broker restart should
        not block it for long: see ``SimNetwork.restart_broker(wait=False)``).
        """
        if n < 1:
            raise ValueError("at_frame counts from 1")
        with self._lock:
            self._actions.setdefault(self.frames + n, []).append(action)

    def disconnect(self) -> None:
        """Cut the TCP connection without DISCONNECT (the client reconnects by itself)."""
        self.conn.drop_connection()

    # -------------------------------------------------------------- frames

    def attach(self, downloader: Downloader | None) -> None:
        """Deliver chunk frames to ``downloader`` from now on (None: drop them).

        Waits for a frame being delivered to the previous downloader, so that
        none is running once this returns.
        """
        with self._delivering, self._lock:
            self._downloader = downloader

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic != str(DeviceTopic.chunk_data(self.device_id)):
            return
        with self._lock:
            self.frames += 1
            actions = self._actions.pop(self.frames, [])
        for action in actions:
            action()
        with self._delivering:
            with self._lock:
                downloader = self._downloader
            if downloader is None or self._killed or self._dead() is not None:
                return
            downloader.deliver(self._maybe_corrupt(payload))

    def _maybe_corrupt(self, payload: bytes) -> bytes:
        if not self.corrupt_blocks:
            return payload
        try:
            frame = parse_chunk_frame(payload)
        except MalformedMessageError:
            return payload
        if not isinstance(frame, ChunkData) or not frame.data:
            return payload
        if frame.block not in self.corrupt_blocks or frame.block in self._corrupted:
            return payload
        self._corrupted.add(frame.block)
        self.corrupted += 1
        flipped = bytearray(payload)
        flipped[-1 - len(frame.data) // 2] ^= 0xFF  # a byte in the middle of the block's data
        return bytes(flipped)

    # ------------------------------------------------------------ lifetime

    def kill(self) -> None:
        """The process died: deliver nothing more, drop the TCP connection uncleanly."""
        self._killed = True
        self.attach(None)
        self.conn.drop_connection()
        self.conn.stop(timeout_s=2)

    def close(self) -> None:
        """Disconnect cleanly (the process exits normally)."""
        self.attach(None)
        self.conn.stop(timeout_s=2)


# ---------------------------------------------------------------- the network


class SimNetwork:
    """A broker, a chunk service on it, and the links of the devices using it.

    Args:
        broker: a running broker; ``restart_broker`` stops and starts it.
        options: the download options devices use unless told otherwise.

    Raises:
        MqttError: the chunk service could not connect.
    """

    def __init__(self, broker: Broker, *, options: DownloadOptions = SIM_DOWNLOAD_OPTIONS) -> None:
        self.broker = broker
        self.options = options
        self.service = SimChunkService(broker)
        self.links: list[SimLink] = []
        self.restarts = 0
        self._restarters: list[threading.Thread] = []

    def serve(self, path: Path, bundle_id: str | None = None) -> BundleRef:
        """Register a bundle file with the chunk service (see ``SimChunkService.serve``)."""
        return self.service.serve(path, bundle_id)

    def connect(
        self, device_id: str, *, dead: Callable[[], SimulatedCrash | None] = lambda: None
    ) -> SimLink:
        """Open a device process's connection (see ``SimLink``)."""
        link = SimLink(self.broker, device_id, dead=dead)
        self.links.append(link)
        return link

    def restart_broker(self, *, down_s: float = 0.3, wait: bool = True) -> None:
        """Stop the broker, keep it down ``down_s`` seconds, start it again.

        Args:
            down_s: seconds the broker stays down.
            wait: return once it runs again; False returns as soon as it is
                down and starts it again from a background thread.
        """
        down = threading.Event()

        def cycle() -> None:
            try:
                self.broker.stop()
                self.restarts += 1
            finally:
                down.set()
            time.sleep(down_s)
            self.broker.start()

        if wait:
            cycle()
            return
        thread = threading.Thread(target=cycle, name="sim-broker-restart", daemon=True)
        self._restarters.append(thread)
        thread.start()
        down.wait(15)

    def close(self) -> None:
        """Wait for restarts, close every link and stop the chunk service."""
        for thread in self._restarters:
            thread.join(20)
        for link in self.links:
            link.close()
        self.service.stop()

    def __enter__(self) -> SimNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------ the operation


@dataclass(frozen=True)
class NetworkInstall:
    """What one download-and-install did."""

    update_id: str
    bundle: BundleRef
    result: InstallResult  # committed, rolled back, or aborted (also by a failed download)
    stats: DownloadStats  # the downloader's counters (resumed, requested, written blocks)
    error: EdgefleetError | None = None  # the download failure that aborted the update

    @property
    def ok(self) -> bool:
        return self.result.ok


def download_and_install(
    agent: Agent,
    link: SimLink,
    bundle: BundleRef,
    *,
    daemon_dir: Path,
    options: DownloadOptions = SIM_DOWNLOAD_OPTIONS,
    faults: NetworkFaults | None = None,
    update_id: str | None = None,
    deadline_s: float = 30.0,
    dead: Callable[[], SimulatedCrash | None] = lambda: None,
) -> NetworkInstall:
    """Download ``bundle`` with the real downloader and install it, as the daemon does.

    The core records the download (``begin_download``); a download failure
    aborts the update (``abort_download``: verification errors discard the
    partial file, transport errors keep it for a resume, as the downloader
    decides); a verified file goes to ``Agent.install``. The daemon would
    retry a transport failure; here the caller decides.

    Args:
        agent: the running agent.
        link: the device process's connection.
        bundle: what the signed desired state names.
        daemon_dir: where the daemon keeps ``downloads/``.
        options: download tuning.
        faults: the downloader's ``NetworkFaults``.
        update_id: the update's id (the daemon derives it from the desired state).
        deadline_s: give up the download after this many seconds.
        dead: the crash that killed the process, if any (checked by the
            downloader's clock on this thread).

    Raises:
        SimulatedCrash: the process died mid-download; nothing was cleaned up.
        StorageError: the core could not store its state.
        InvalidTransitionError: another update is in progress.
    """
    uid = update_id or new_update_id("sim")
    runner = threading.get_ident()

    def clock() -> float:
        crash = dead()
        if crash is not None and threading.get_ident() == runner:
            raise crash
        return time.monotonic()

    agent.begin_download(uid, f"mqtt:{bundle.id}")
    try:
        downloader = Downloader(
            daemon_dir, bundle, link.transport, options, faults=faults, clock=clock
        )
    except EdgefleetError as exc:  # oversized declaration, no disk for the partial file
        return NetworkInstall(uid, bundle, agent.abort_download(uid, exc), DownloadStats(), exc)
    link.attach(downloader)
    try:
        path = downloader.run(deadline_s=deadline_s)
    except SimulatedCrash:
        link.attach(None)  # no frame is being written once this returns
        # The kernel closes a dead process's descriptors: no checkpoint, no flush
        # (``close()`` would checkpoint, which a dead process cannot do).
        downloader.abandon()
        raise
    except EdgefleetError as exc:
        link.attach(None)
        downloader.close()
        return NetworkInstall(uid, bundle, agent.abort_download(uid, exc), downloader.stats, exc)
    link.attach(None)
    downloader.close()
    result = agent.install(path, update_id=uid, source_name=f"mqtt:{bundle.id}")
    cleanup_downloads(daemon_dir, keep=set())
    return NetworkInstall(uid, bundle, result, downloader.stats)


# ------------------------------------------------------------ power loss


def lose_unsynced_downloads(daemon_dir: Path) -> int:
    """Worst-case power loss for the downloader's files; return the blocks overwritten.

    The downloader writes ``<id>.part`` with ``os.pwrite`` (outside
    ``SimDisk``) and fsyncs it before each checkpoint claims its blocks. A
    power cut may lose any block written since: every block of a ``.part``
    that its ``.state`` checkpoint does not claim is overwritten with garbage
    (a checkpoint is only written after its blocks were fsynced, so the
    blocks it claims are kept).
    """
    directory = Path(daemon_dir) / "downloads"
    if not directory.is_dir():
        return 0
    lost = 0
    for state_path in sorted(directory.glob("*.state")):
        part = state_path.with_suffix(".part")
        try:
            doc = canonical.decode_strict(state_path.read_bytes())
            size, block_size = int(doc["size"]), int(doc["block_size"])
            nblocks = block_count(size, block_size)
            have = Bitmap.from_bytes(nblocks, base64.b64decode(str(doc["bitmap"])))
        except (OSError, canonical.CanonicalError, binascii.Error, ValueError, KeyError):
            continue  # the downloader starts such a download over anyway
        if not part.is_file():
            continue
        fd = os.open(part, os.O_WRONLY)
        try:
            on_disk = os.fstat(fd).st_size
            for block in have.missing():
                offset, length = block_span(block, size, block_size)
                if offset + length <= on_disk:  # never grow the file: only lose what is there
                    os.pwrite(fd, b"\xa5" * length, offset)
                    lost += 1
        finally:
            os.close(fd)
    return lost
