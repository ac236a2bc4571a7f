"""Chunked bundle download over a real Mosquitto: faults, restarts, attacks."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.download import (
    BundleUnavailableError,
    ChunkTransport,
    DownloadCancelledError,
    Downloader,
    DownloadOptions,
    DownloadStalledError,
    MqttChunkTransport,
    NetworkFaults,
    cleanup_downloads,
)
from agent.mqtt import MqttConnection, MqttOptions
from edgefleet.errors import HashMismatchError, LengthMismatchError, OversizedPayloadError
from edgefleet.topics import DeviceTopic
from edgefleet.wire import BundleRef, ChunkData, ChunkRefusal, ChunkRequest
from tests.mosquitto import Mosquitto, wait_until

BLOCK = 4096
DEVICE = "pi-1"


@pytest.fixture
def bundle_file(tmp_path: Path) -> tuple[Path, BundleRef]:
    data = os.urandom(60 * BLOCK + 123)  # 61 blocks, the last one short
    path = tmp_path / "srv" / "tiny-2.bundle"
    path.parent.mkdir()
    path.write_bytes(data)
    return path, BundleRef("tiny-2", hashlib.sha256(data).hexdigest(), len(data))


class Device:
    """The device side: an MQTT connection whose chunk frames feed the current downloader."""

    def __init__(self, broker: Mosquitto) -> None:
        self.downloader: Downloader | None = None
        self.conn = MqttConnection(
            MqttOptions(
                host=broker.host,
                port=broker.port,
                client_id=DEVICE,
                backoff_initial_s=0.05,
                backoff_max_s=0.3,
            ),
            on_message=self._on_message,
        )
        self.conn.subscribe(str(DeviceTopic.chunk_data(DEVICE)))
        self.conn.start()
        assert self.conn.wait_connected(5)
        self.transport = MqttChunkTransport(self.conn, DEVICE)

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if self.downloader is not None:
            self.downloader.deliver(payload)

    def downloader_for(self, state: Path, bundle: BundleRef, **kw: Any) -> Downloader:
        faults = kw.pop("faults", None)
        opts = DownloadOptions(block_size=BLOCK, **{"request_timeout_s": 0.4, **kw})
        self.downloader = Downloader(state, bundle, self.transport, opts, faults=faults)
        return self.downloader


@pytest.fixture
def device(mosquitto: Mosquitto) -> Iterator[Callable[[], Device]]:
    made: list[Device] = []

    def make() -> Device:
        d = Device(mosquitto)
        made.append(d)
        return d

    yield make
    for d in made:
        d.conn.stop(timeout_s=2)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_completes_with_the_signed_hash(
    mosquitto, chunk_service, device, bundle_file, tmp_path
):
    path, ref = bundle_file
    chunk_service(mosquitto, {ref.id: path})
    dl = device().downloader_for(tmp_path / "state", ref, window_blocks=16)
    out = dl.run(deadline_s=30)
    assert sha(out) == ref.sha256 and out.name == "tiny-2.bundle"
    assert not dl.state_path.exists() and not dl.part_path.exists()
    assert dl.stats.timeouts == 0 and dl.stats.blocks_written == 61


def test_download_dropped_chunks_are_requested_again(
    mosquitto, chunk_service, device, bundle_file, tmp_path
):
    path, ref = bundle_file
    chunk_service(mosquitto, {ref.id: path})
    faults = NetworkFaults(drop_frames=frozenset({2, 5, 9}), drop_blocks_once=frozenset({60}))
    dl = device().downloader_for(tmp_path / "state", ref, faults=faults, window_blocks=16)
    out = dl.run(deadline_s=30)
    assert sha(out) == ref.sha256
    assert faults.dropped == 4 and dl.stats.timeouts >= 1
    assert dl.stats.requested_blocks.count(60) >= 2


def test_download_survives_broker_restart_mid_download(
    mosquitto, chunk_service, device, bundle_file, tmp_path
):
    path, ref = bundle_file
    chunk_service(mosquitto, {ref.id: path})
    restarted = threading.Event()

    def restart_broker() -> None:
        mosquitto.restart(down_s=0.3)
        restarted.set()

    faults = NetworkFaults(delay_s=0.005, drop_frames=frozenset({3, 7, 30}))
    dev = device()
    dl = dev.downloader_for(tmp_path / "state", ref, faults=faults, window_blocks=8)
    original_admit = faults.admit

    def admit(block: int | None) -> bool:
        if faults.frames_seen == 20 and not restarted.is_set():
            threading.Thread(target=restart_broker, daemon=True).start()
        return original_admit(block)

    faults.admit = admit  # type: ignore[method-assign]
    out = dl.run(deadline_s=60)
    assert restarted.is_set() and faults.dropped == 3
    assert sha(out) == ref.sha256
    assert dev.conn.connects >= 2


def test_download_survives_a_dropped_connection(
    mosquitto, chunk_service, device, bundle_file, tmp_path
):
    path, ref = bundle_file
    chunk_service(mosquitto, {ref.id: path})
    dev = device()
    faults = NetworkFaults(disconnect_after=10, disconnect=dev.conn.drop_connection)
    dl = dev.downloader_for(tmp_path / "state", ref, faults=faults, window_blocks=16)
    out = dl.run(deadline_s=30)
    assert sha(out) == ref.sha256
    assert dev.conn.connects >= 2  # the connection really went down and came back


def test_download_resumes_after_agent_restart(
    mosquitto, chunk_service, device, bundle_file, tmp_path
):
    path, ref = bundle_file
    chunk_service(mosquitto, {ref.id: path})
    state = tmp_path / "state"
    first = device()
    stop = threading.Event()
    faults = NetworkFaults(delay_s=0.01)
    dl1 = first.downloader_for(state, ref, faults=faults, window_blocks=8, persist_every_blocks=4)
    result: dict[str, BaseException] = {}

    def run_first() -> None:
        try:
            dl1.run(stop=stop)
        except BaseException as exc:
            result["exc"] = exc

    worker = threading.Thread(target=run_first)
    worker.start()
    assert wait_until(lambda: dl1.have.count >= 25, 20)
    stop.set()
    worker.join(10)
    assert isinstance(result.get("exc"), DownloadCancelledError)
    # The agent process "dies": its connection goes away without cleanup.
    first.downloader = None
    first.conn.drop_connection()
    first.conn.stop(timeout_s=2)
    held = dl1.have.count

    second = device()
    dl2 = second.downloader_for(state, ref, window_blocks=8)
    assert dl2.stats.resumed_blocks >= held - 4 >= 20
    resumed = {b for b in range(61) if b in dl2.have}
    out = dl2.run(deadline_s=30)
    assert sha(out) == ref.sha256
    assert not resumed & set(dl2.stats.requested_blocks)  # only the missing blocks were asked
    assert dl2.stats.blocks_written == 61 - len(resumed)


def test_download_resume_discards_checkpoint_for_another_file(bundle_file, tmp_path):
    path, ref = bundle_file
    state = tmp_path / "state"

    class Offline:
        connected = False

        def send_request(self, request: ChunkRequest) -> None:
            raise AssertionError("offline")

    dl = Downloader(state, ref, Offline(), DownloadOptions(block_size=BLOCK))
    frame = ChunkData(ref.id, 0, BLOCK, ref.size, path.read_bytes()[:BLOCK])
    assert dl.deliver(frame.to_bytes())
    dl.close()
    assert Downloader(state, ref, Offline(), DownloadOptions(block_size=BLOCK)).have.count == 1
    other = BundleRef(ref.id, "00" * 32, ref.size)
    assert Downloader(state, other, Offline(), DownloadOptions(block_size=BLOCK)).have.count == 0


class Recorder:
    """A transport that records requests (for receiver-side attack tests, no network)."""

    def __init__(self) -> None:
        self.requests: list[ChunkRequest] = []
        self.connected = True

    def send_request(self, request: ChunkRequest) -> None:
        self.requests.append(request)


def test_download_oversized_chunk_is_rejected(bundle_file, tmp_path):
    path, ref = bundle_file
    data = path.read_bytes()
    dl = Downloader(tmp_path / "state", ref, Recorder(), DownloadOptions(block_size=BLOCK))
    good = ChunkData(ref.id, 0, BLOCK, ref.size, data[:BLOCK]).to_bytes()
    assert not dl.deliver(good + b"EXTRA")  # more bytes than the block
    last = ChunkData(ref.id, 60, BLOCK, ref.size, data[60 * BLOCK :]).to_bytes()
    assert not dl.deliver(last + b"\0" * 10)  # the short last block, padded
    big = ChunkData(ref.id, 0, 2 * BLOCK, ref.size, data[: 2 * BLOCK]).to_bytes()
    assert not dl.deliver(big)  # a block size above ours is refused before parsing
    assert dl.stats.rejected_frames == 3 and dl.have.count == 0
    assert dl.part_path.stat().st_size == ref.size  # never written past the declared size


def test_download_file_of_another_size_is_rejected(bundle_file, tmp_path):
    path, ref = bundle_file
    data = path.read_bytes()
    dl = Downloader(tmp_path / "state", ref, Recorder(), DownloadOptions(block_size=BLOCK))
    grown = ChunkData(ref.id, 0, BLOCK, ref.size + BLOCK, data[:BLOCK]).to_bytes()
    dl.deliver(grown)
    with pytest.raises(LengthMismatchError):
        dl.run(deadline_s=5)


def test_download_declared_size_above_limit_is_refused(bundle_file, tmp_path):
    _, ref = bundle_file
    with pytest.raises(OversizedPayloadError):
        Downloader(
            tmp_path, ref, Recorder(), DownloadOptions(block_size=BLOCK, max_bundle_bytes=1000)
        )


def test_download_hash_mismatch_discards_everything(
    mosquitto, chunk_service, device, bundle_file, tmp_path
):
    _, ref = bundle_file
    evil = tmp_path / "evil.bundle"
    evil.write_bytes(os.urandom(ref.size))
    chunk_service(mosquitto, {ref.id: evil})
    dl = device().downloader_for(tmp_path / "state", ref, window_blocks=64)
    with pytest.raises(HashMismatchError):
        dl.run(deadline_s=30)
    assert not any((tmp_path / "state" / "downloads").iterdir())


def test_download_unknown_bundle_is_a_transport_error(
    mosquitto, chunk_service, device, bundle_file, tmp_path
):
    _, ref = bundle_file
    chunk_service(mosquitto, {})
    dl = device().downloader_for(tmp_path / "state", ref)
    with pytest.raises(BundleUnavailableError):
        dl.run(deadline_s=10)
    assert dl.state_path.exists()  # kept for a later retry


def test_download_stalls_when_nobody_answers(mosquitto, device, bundle_file, tmp_path):
    _, ref = bundle_file
    dl = device().downloader_for(tmp_path / "state", ref, request_timeout_s=0.1, max_stalls=2)
    with pytest.raises(DownloadStalledError):
        dl.run(deadline_s=10)
    assert dl.stats.timeouts == 3


def test_download_stale_frames_are_ignored(bundle_file, tmp_path):
    path, ref = bundle_file
    dl = Downloader(tmp_path / "state", ref, Recorder(), DownloadOptions(block_size=BLOCK))
    other = ChunkData("other-1", 0, BLOCK, ref.size, path.read_bytes()[:BLOCK]).to_bytes()
    assert not dl.deliver(other)
    assert not dl.deliver(ChunkRefusal("other-1", "unknown-bundle").to_bytes())
    assert dl.stats.stale_frames == 2


def test_completed_download_is_reverified_and_cleanup_keeps_wanted(bundle_file, tmp_path):
    path, ref = bundle_file
    state = tmp_path / "state"
    transport: ChunkTransport = Recorder()
    dl = Downloader(state, ref, transport, DownloadOptions(block_size=BLOCK))
    data = path.read_bytes()
    for block in range(61):
        chunk = data[block * BLOCK : (block + 1) * BLOCK]
        assert dl.deliver(ChunkData(ref.id, block, BLOCK, ref.size, chunk).to_bytes())
    out = dl.run(deadline_s=5)
    again = Downloader(state, ref, transport, DownloadOptions(block_size=BLOCK))
    assert again.run() == out
    out.write_bytes(b"corrupted on disk")
    with pytest.raises(HashMismatchError):
        Downloader(state, ref, transport, DownloadOptions(block_size=BLOCK)).run()
    Downloader(state, BundleRef("old-1", ref.sha256, ref.size), transport).close()
    assert cleanup_downloads(state, keep={ref.id}) == ["old-1"]
