"""SimDevice: the real agent on simulated hardware (boots, crashes, disk full, network hook)."""

from __future__ import annotations

import errno
import hashlib
import io
from pathlib import Path

import pytest

from agent.errors import StorageError
from agent.options import AgentOptions
from firmware_sim.campaign import check_device
from firmware_sim.device import SimDevice
from firmware_sim.disk import PowerCut, ProcessKilled
from firmware_sim.models import GOLDEN_X, BundleSet, linear_model, mlp_model


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> BundleSet:
    return BundleSet.build(tmp_path_factory.mktemp("release"))


def device(tmp_path: Path, bundles: BundleSet, **kw) -> SimDevice:
    dev = SimDevice(tmp_path, options=AgentOptions(device_class="sim", health_runs=1), **kw)
    agent = dev.boot()
    assert agent is not None
    agent.pin_trust_root(bundles.release.trust_root_bytes)
    return dev


def test_device_boots_and_serves(tmp_path, bundles):
    dev = device(tmp_path, bundles)
    assert dev.install(bundles.v1).ok
    assert dev.run(lambda a: a.predict(GOLDEN_X))[0].shape == (2, 3)
    assert dev.boots == 1 and dev.events[-1].outcome == "committed"


def test_device_power_cut_mid_install_then_reboot(tmp_path, bundles):
    dev = device(tmp_path, bundles)
    dev.install(bundles.v1)
    dev.cut_power_at(12)
    crash = dev.install(bundles.v2)
    assert isinstance(crash, PowerCut) and not dev.up
    agent = dev.power_cycle()
    assert agent is not None and dev.boots == 2
    status = dev.status()
    assert status["state"] == "idle" and status["active"]["version"] in (1, 2)


def test_trial_ort_crash_reverts_after_restart_limit(tmp_path, bundles):
    """onnxruntime kills the process every time it loads v2: the trial counter reverts."""
    v2_model = linear_model(seed=2)
    dev = device(tmp_path, bundles, crash_on_load={hashlib.sha256(v2_model).hexdigest()})
    dev.install(bundles.v1)
    crash = dev.install(bundles.v2)
    assert isinstance(crash, ProcessKilled)
    states = []
    while not dev.up:
        dev.power_cycle()
        if dev.up:
            break
        states.append("crashed")
    status = dev.status()
    assert status["active"]["version"] == 1 and status["state"] == "idle"
    assert status["last_error"]["error"] == "TrialExhaustedError"
    assert dev.boots == 1 + 3, "three starts on trial (the limit), the last one reverts"
    assert dev.events[-1].outcome == "rolled-back"
    assert dev.run(lambda a: a.predict(GOLDEN_X))[0].shape == (2, 3)


@pytest.mark.parametrize("spare", [0, 150, 600, 1500, 3000, 6000])
def test_install_enospc_keeps_active(tmp_path, bundles, spare):
    """The disk fills up somewhere during the update (slot files or a state store).

    Either the install aborts (the slot write failed: v1 untouched), commits, or
    it stops with StorageError where the state could not be stored; in every
    case v1 keeps serving, and once space is freed the update resolves and the
    device moves on.
    """
    dev = device(tmp_path, bundles)
    dev.install(bundles.v1)
    state_size = (dev.state_dir / "state.json").stat().st_size
    dev.disk.free_bytes = 2 * state_size + spare
    try:
        result = dev.install(bundles.v2)
    except StorageError as exc:
        assert "no space left" in str(exc)
        result = None
    if result is not None and result.error is not None:
        assert result.outcome == "aborted" and result.error.error == "StorageError"
        assert "no space left" in result.error.message
    assert dev.run(lambda a: a.predict(GOLDEN_X))[0].shape == (2, 3)
    dev.disk.free_bytes = None
    dev.run(lambda a: a.recover())
    status = check_device(dev.state_dir, {("tiny", 1), ("tiny", 2)}, agent=dev.agent)
    if result is not None:
        assert status["active"]["version"] == (2 if result.ok else 1)
    assert dev.install(bundles.v3).ok


def test_install_payload_does_not_fit_aborts(tmp_path, bundles):
    big = bundles.release.build(
        mlp_model((8, 512, 256, 3)), version=6, compression="none", out=tmp_path / "big.bundle"
    )
    dev = device(tmp_path / "dev", bundles)
    dev.install(bundles.v1)
    dev.disk.free_bytes = 64 << 10  # room for state stores, not for the ~600 KB model
    result = dev.install(big)
    assert not isinstance(result, BaseException)
    assert result.outcome == "aborted" and result.error is not None
    assert result.error.error == "StorageError" and "no space left" in result.error.message
    assert dev.status()["active"]["version"] == 1
    assert list((dev.state_dir / "slots" / "b").iterdir()) == [], "partial files are freed"
    dev.disk.free_bytes = None
    assert dev.install(big).ok


def test_install_disk_already_full_refuses_cleanly(tmp_path, bundles):
    dev = device(tmp_path, bundles)
    dev.install(bundles.v1)
    dev.disk.free_bytes = 0
    with pytest.raises(StorageError, match="cannot store state verifying"):
        dev.install(bundles.v2)
    assert dev.status()["active"]["version"] == 1
    dev.disk.free_bytes = None
    assert dev.install(bundles.v2).ok


def test_install_sticky_io_error_then_disk_replaced(tmp_path, bundles):
    dev = device(tmp_path, bundles)
    dev.install(bundles.v1)
    dev.fail_at(3, errno.EIO, sticky=True)
    with pytest.raises(Exception, match="cannot store state"):
        dev.install(bundles.v2)
    dev.arm(None)
    agent = dev.power_cycle(lose_unsynced=False)
    assert agent is not None
    assert dev.status()["active"]["version"] == 1


def test_fetch_hook_supplies_the_bundle(tmp_path, bundles):
    fetched = []

    def fetch(ref: str):
        fetched.append(ref)
        return io.BytesIO(Path(ref).read_bytes())

    dev = device(tmp_path, bundles, fetch=fetch)
    assert dev.install(bundles.v1).ok
    assert fetched == [str(bundles.v1)]
