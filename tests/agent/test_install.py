"""Installs end to end on a real filesystem: upgrades, rejections, rollback, trust root."""

from __future__ import annotations

import hashlib
import io
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from agent.core import Agent, read_status
from agent.errors import AgentBusyError, NothingToRollBackError, NoTrustRootError
from edgefleet.errors import RollbackError, ThresholdNotMetError, VerificationError
from edgefleet.keystore import KeyStore
from edgefleet.timeutil import utcnow
from edgefleet.trust import read_header
from firmware_sim.disk import ProcessKilled
from firmware_sim.models import GOLDEN_X, BundleSet, linear_model


def slot_hash(agent: Agent, slot: str) -> str:
    return hashlib.sha256((agent.layout.slot_dir(slot) / "model.onnx").read_bytes()).hexdigest()


def test_install_first_model_commits(agent: Agent, bundles: BundleSet, events):
    result = agent.install(bundles.v1)
    assert result.ok and result.outcome == "committed" and result.code == 0
    status = agent.status()
    assert status["state"] == "idle"
    assert status["active"]["slot"] == "a" and status["active"]["version"] == 1
    assert status["serving"] == status["active"]
    assert status["rollback_floor"] == {"tiny": 1}
    assert [e.outcome for e in events] == ["committed"]
    out = agent.predict(GOLDEN_X)
    assert out[0].shape == (2, 3)
    assert read_status(agent.layout.root)["active"] == status["active"]


def test_install_upgrade_switches_slot_and_keeps_previous(agent: Agent, bundles: BundleSet):
    agent.install(bundles.v1)
    before = agent.predict(GOLDEN_X)[0]
    result = agent.install(bundles.v2)
    assert result.ok
    status = agent.status()
    assert (status["active"]["slot"], status["previous"]["slot"]) == ("b", "a")
    assert status["rollback_floor"] == {"tiny": 2}
    assert not np.allclose(agent.predict(GOLDEN_X)[0], before)
    v3 = agent.install(bundles.v3)
    assert v3.ok and agent.status()["active"]["slot"] == "a"


def test_install_from_bytes_and_stream(agent: Agent, bundles: BundleSet):
    assert agent.install(bundles.v1.read_bytes()).ok
    assert agent.install(io.BytesIO(bundles.v2.read_bytes()), update_id="srv-42").ok
    assert agent.status()["history"][-1]["update_id"] == "srv-42"


@pytest.mark.parametrize(
    ("mutate", "error"),
    [
        (lambda b: b[:-20000] if len(b) > 20000 else b[:-600], "MalformedBundleError"),
        (lambda b: b.replace(b'"version":3', b'"version":4'), "BadSignatureError"),
    ],
    ids=["truncated", "manifest_edited"],
)
def test_install_rejected_bundle_keeps_active(agent: Agent, bundles: BundleSet, mutate, error):
    agent.install(bundles.v1)
    agent.install(bundles.v2)
    before = agent.status()
    a_hash = slot_hash(agent, "a")
    result = agent.install(mutate(bundles.v3.read_bytes()))
    assert result.outcome == "aborted" and result.error is not None
    assert result.error.error in (error, "LengthMismatchError", "MissingMemberError")
    after = agent.status()
    assert after["active"] == before["active"]
    assert after["last_error"]["error"] == result.error.error
    if result.error.error == "BadSignatureError":
        # Rejected on its metadata: the inactive slot (the rollback target) is untouched.
        assert after["previous"] == before["previous"] and slot_hash(agent, "a") == a_hash


def test_install_tampered_payload_never_touches_active(agent: Agent, bundles: BundleSet):
    agent.install(bundles.v1)
    active_hash = slot_hash(agent, "a")
    data = bytearray(bundles.v2.read_bytes())
    payload_at = read_header(bytes(data)).header_bytes + 512
    data[payload_at + 10] ^= 0xFF  # inside the payload member
    result = agent.install(bytes(data))
    assert result.error is not None and result.error.error == "HashMismatchError"
    assert slot_hash(agent, "a") == active_hash
    assert agent.status()["active"]["version"] == 1
    assert not any(p.name.endswith(".part") for p in agent.layout.slot_dir("b").iterdir())


def test_install_wrong_target_is_refused(agent: Agent, bundles: BundleSet):
    result = agent.install(bundles.wrong_target)
    assert result.error is not None and result.error.error == "WrongTargetError"
    assert result.code == 18
    assert agent.status()["active"] is None


def test_install_older_version_is_rollback_error(agent: Agent, bundles: BundleSet):
    agent.install(bundles.v2)
    result = agent.install(bundles.v1)
    assert result.error is not None and result.error.error == "RollbackError"
    assert result.code == RollbackError.code


def test_install_without_trust_root_is_refused(make_agent, bundles: BundleSet):
    agent = make_agent(pin=False)
    with pytest.raises(NoTrustRootError, match="give --trust-root"):
        agent.install(bundles.v1)
    assert agent.status()["state"] == "idle"


def test_state_dir_lock_busy(make_agent, tmp_path: Path):
    make_agent(pin=False)
    with pytest.raises(AgentBusyError, match="in use by another agent"):
        Agent(tmp_path / "state")


def test_restart_serves_committed_model(make_agent, bundles: BundleSet, tmp_path: Path):
    first = make_agent()
    first.install(bundles.v1)
    first.install(bundles.v2)
    expected = first.predict(GOLDEN_X)[0]
    first.close()
    second = make_agent(pin=False)
    assert second.serving is not None and second.serving.version == 2
    np.testing.assert_allclose(second.predict(GOLDEN_X)[0], expected)


def test_rollback_switches_back_and_floor_stays(agent: Agent, bundles: BundleSet, events):
    agent.install(bundles.v1)
    agent.install(bundles.v2)
    result = agent.rollback()
    assert result.ok and result.outcome == "rolled-back"
    status = agent.status()
    assert status["active"]["version"] == 1 and status["serving"]["version"] == 1
    assert status["rollback_floor"] == {"tiny": 2}
    assert events[-1].kind == "rollback" and events[-1].version == 2
    again = agent.install(bundles.v2)
    assert again.error is not None and again.error.error == "RollbackError"


def test_rollback_with_nothing_before(agent: Agent, bundles: BundleSet):
    agent.install(bundles.v1)
    with pytest.raises(NothingToRollBackError):
        agent.rollback()


def test_rollback_target_corrupted_is_refused(agent: Agent, bundles: BundleSet):
    agent.install(bundles.v1)
    agent.install(bundles.v2)
    model = agent.layout.slot_dir("a") / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\x00")
    result = agent.rollback()
    assert result.outcome == "aborted"
    assert result.error is not None and result.error.error == "SlotIntegrityError"
    assert agent.status()["active"]["version"] == 2


def test_rollback_to_model_signed_by_revoked_key_is_refused(make_agent, tmp_path: Path):
    bundles = BundleSet.build(tmp_path / "own-release")
    agent = make_agent(pin=False)
    agent.pin_trust_root(bundles.release.trust_root_bytes)
    agent.install(bundles.v1)
    store: KeyStore = bundles.release.keys
    old_release = store.trust_root().role("release").keyids[0]
    store.rotate(add={"release": 1}, remove=[old_release])
    agent.pin_trust_root(store.trust_root_path.read_bytes())
    v2 = bundles.release.build(linear_model(seed=2), version=2)
    assert agent.install(v2).ok
    result = agent.rollback()
    assert result.outcome == "aborted" and result.error is not None
    assert result.error.error in (ThresholdNotMetError.__name__, "UnknownKeyError")
    assert "no longer trusted by trust root v2" in result.error.message


def test_trust_root_pinned_then_foreign_refused(agent: Agent, tmp_path: Path):
    other = KeyStore(tmp_path / "other-keys")
    other.init(now=utcnow() - timedelta(days=1))
    with pytest.raises(VerificationError, match="not the pinned trust root v1 nor a valid"):
        agent.pin_trust_root(other.trust_root_path.read_bytes())
    assert agent.trust_root().version == 1


def test_trust_root_same_again_is_noop(agent: Agent, bundles: BundleSet):
    before = agent.layout.trust_root_file.stat().st_mtime_ns
    agent.pin_trust_root(bundles.release.trust_root_bytes)
    assert agent.layout.trust_root_file.stat().st_mtime_ns == before


def test_trust_root_successor_accepted_and_chain(make_agent, tmp_path: Path):
    store = KeyStore(tmp_path / "keys")
    store.init(now=utcnow() - timedelta(days=1))
    agent = make_agent(pin=False)
    agent.pin_trust_root(store.trust_root_path.read_bytes())
    store.rotate(add={"release": 1})
    store.rotate(add={"release": 1})
    with pytest.raises(VerificationError, match="skips versions"):
        agent.pin_trust_root(store.trust_root_path.read_bytes())
    agent.update_trust_root(store.chain_since(1))
    assert agent.trust_root().version == 3
    with pytest.raises(RollbackError, match="not newer than the trusted v3"):
        agent.pin_trust_root((tmp_path / "keys" / "trust-root.2.json").read_bytes())


def test_outcome_reported_again_after_crash_before_report(make_agent, bundles, tmp_path):
    """A crash between the commit store and the report: the restart reports it (at least once)."""

    def dying_sink(event):
        raise ProcessKilled("the process died while reporting")

    first = make_agent(event_sink=dying_sink)
    with pytest.raises(ProcessKilled):
        first.install(bundles.v1)
    first.abandon()
    assert read_status(tmp_path / "state")["state"] == "committed"
    second = Agent(tmp_path / "state")  # no sink yet, as when the daemon wires it later
    try:
        assert second.status()["state"] == "idle"
        got = []
        second.set_event_sink(got.append)
        assert [(e.outcome, e.version) for e in got] == [("committed", 1)]
    finally:
        second.close()
