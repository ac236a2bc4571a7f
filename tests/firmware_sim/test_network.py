"""SimDevice over the simulated network: a real Mosquitto, the real downloader and agent."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.options import AgentOptions
from edgefleet.chunks import Bitmap, block_count
from edgefleet.errors import HashMismatchError
from edgefleet.wire import BundleRef
from firmware_sim.campaign import check_device
from firmware_sim.device import SimDevice
from firmware_sim.disk import PowerCut
from firmware_sim.models import GOLDEN_X, Release, golden_health_check, mlp_model
from firmware_sim.network import SIM_DOWNLOAD_OPTIONS, NetworkInstall, SimNetwork, seeded_loss
from tests.mosquitto import Mosquitto

SIZES = (8, 256, 128, 3)  # a ~140 KB bundle: ~35 blocks of 4 KiB


@dataclass(frozen=True)
class Models:
    release: Release
    bundles: dict[int, Path]
    model_sha: dict[int, str]  # version -> sha256 of the model bytes


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    release = Release(tmp_path_factory.mktemp("release"))
    bundles, shas = {}, {}
    for version in (1, 2):
        model = mlp_model(SIZES, seed=version)
        check = golden_health_check(model, {"x": GOLDEN_X})
        bundles[version] = release.build(model, version=version, health_check=check)
        shas[version] = hashlib.sha256(model).hexdigest()
    return Models(release, bundles, shas)


@pytest.fixture
def net(mosquitto: Mosquitto) -> Iterator[SimNetwork]:
    with SimNetwork(mosquitto) as network:
        yield network


@pytest.fixture
def refs(net: SimNetwork, models: Models) -> dict[int, BundleRef]:
    return {v: net.serve(path, f"tiny-{v}") for v, path in models.bundles.items()}


def device(tmp_path: Path, net: SimNetwork, models: Models) -> SimDevice:
    dev = SimDevice(tmp_path, options=AgentOptions(device_class="sim", health_runs=1), network=net)
    agent = dev.boot()
    assert agent is not None
    agent.pin_trust_root(models.release.trust_root_bytes)
    return dev


def installed(outcome: object) -> NetworkInstall:
    assert isinstance(outcome, NetworkInstall), outcome
    return outcome


def assert_serving(dev: SimDevice, models: Models, version: int) -> None:
    """The device serves ``version``: every slot invariant holds and the model bytes match."""
    status = check_device(dev.state_dir, {("tiny", version)}, agent=dev.agent)
    model = dev.state_dir / "slots" / status["active"]["slot"] / "model.onnx"
    assert hashlib.sha256(model.read_bytes()).hexdigest() == models.model_sha[version]


def test_download_lossy_link(tmp_path, net, models, refs):
    """30% of the chunk frames are lost: the missing blocks are asked again, the install commits."""
    dev = device(tmp_path, net, models)
    faults = seeded_loss(0.3, seed=7)
    done = installed(dev.download_and_install(refs[1], faults=faults))
    assert done.ok, done.result
    assert faults.dropped >= 8 and done.stats.timeouts >= 1
    nblocks = block_count(refs[1].size, SIM_DOWNLOAD_OPTIONS.block_size)
    assert done.stats.blocks_written == nblocks
    assert len(done.stats.requested_blocks) > nblocks  # lost blocks were requested again
    assert_serving(dev, models, 1)
    assert not any((dev.daemon_dir / "downloads").iterdir())  # cleaned up after the install


def test_download_power_cut(tmp_path, net, models, refs):
    """Power fails mid-download: after the reboot only the blocks not checkpointed are fetched."""
    dev = device(tmp_path, net, models)
    nblocks = block_count(refs[1].size, SIM_DOWNLOAD_OPTIONS.block_size)
    dev.connect().at_frame(20, dev.cut_power_now)
    crash = dev.download_and_install(refs[1], update_id="desired-tiny:v1")
    assert isinstance(crash, PowerCut) and not dev.up
    first = net.service.blocks_sent[dev.device_id]
    assert 20 <= first < nblocks + SIM_DOWNLOAD_OPTIONS.window_blocks

    agent = dev.power_cycle()  # recovery aborts the interrupted update; unclaimed blocks are lost
    assert agent is not None and dev.status()["state"] == "idle"
    assert dev.status()["active"] is None
    checkpoint = json.loads((dev.daemon_dir / "downloads" / "tiny-1.state").read_bytes())
    bitmap = Bitmap.from_bytes(nblocks, base64.b64decode(checkpoint["bitmap"]))
    durable = {b for b in range(nblocks) if b in bitmap}
    assert len(durable) >= 12, "checkpoints every 4 blocks: at least 12 of the first 19 survive"

    done = installed(dev.download_and_install(refs[1], update_id="desired-tiny:v1"))
    assert done.ok, done.result
    second = net.service.blocks_sent[dev.device_id] - first
    assert done.stats.resumed_blocks == len(durable)
    # Only missing blocks are asked for (frames the broker kept queued for the dead
    # process's session may fill some before they are asked for).
    assert set(done.stats.requested_blocks) <= set(range(nblocks)) - durable
    assert done.stats.blocks_written == nblocks - len(durable)
    assert second <= nblocks - len(durable) < nblocks  # fewer blocks fetched the second time
    assert dev.boots == 2 and isinstance(dev.crashes[-1], PowerCut)
    assert_serving(dev, models, 1)


def test_download_broker_restart(tmp_path, net, models, refs):
    """The broker goes down for 0.3 s mid-download: both sides reconnect and the install commits."""
    dev = device(tmp_path, net, models)
    link = dev.connect()
    link.at_frame(8, lambda: net.restart_broker(down_s=0.3, wait=False))
    done = installed(dev.download_and_install(refs[1]))
    assert done.ok, done.result
    assert net.restarts == 1 and link.conn.connects >= 2
    assert_serving(dev, models, 1)


def test_download_device_disconnect(tmp_path, net, models, refs):
    """The device's TCP connection is cut after 10 frames: it reconnects and completes."""
    dev = device(tmp_path, net, models)
    link = dev.connect()
    faults = seeded_loss(0.1, seed=3, disconnect_after=10, disconnect=link.disconnect)
    done = installed(dev.download_and_install(refs[1], faults=faults))
    assert done.ok, done.result
    assert link.conn.connects >= 2
    assert_serving(dev, models, 1)


def test_download_corrupted_chunk(tmp_path, net, models, refs):
    """A byte flipped in transit: the sha256 check rejects the file and v1 keeps serving."""
    dev = device(tmp_path, net, models)
    assert installed(dev.download_and_install(refs[1])).ok
    link = dev.connect()
    link.corrupt_blocks = {3}
    bad = installed(dev.download_and_install(refs[2]))
    assert link.corrupted == 1
    assert bad.result.outcome == "aborted" and isinstance(bad.error, HashMismatchError)
    assert bad.result.error is not None and bad.result.error.error == "HashMismatchError"
    assert_serving(dev, models, 1)
    assert not any((dev.daemon_dir / "downloads").iterdir())  # the bad file was discarded

    link.corrupt_blocks = set()
    retry = installed(dev.download_and_install(refs[2]))
    assert retry.ok, retry.result
    assert retry.stats.resumed_blocks == 0  # nothing of the corrupted download was trusted
    assert_serving(dev, models, 2)
