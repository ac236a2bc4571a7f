"""The daemon end to end: a real Mosquitto, the real agent core, real signed bundles."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import parse_config
from agent.core import Agent
from agent.daemon import Daemon
from agent.download import Downloader, NetworkFaults
from agent.mqtt import MqttConnection, MqttOptions, PublishResult
from agent.options import AgentOptions
from edgefleet.build import BuildOptions, build_bundle
from edgefleet.keys import SigningKey, generate, load_signing_key
from edgefleet.keystore import KeyStore
from edgefleet.timeutil import utcnow
from edgefleet.topics import DeviceChannel, DeviceTopic, GroupTopic, all_devices
from edgefleet.wire import (
    BundleRef,
    DesiredState,
    DesiredTarget,
    DeviceFactsMessage,
    ModelRef,
    ShadowSpec,
    StatusMessage,
    TelemetryRecord,
)
from firmware_sim.models import linear_model as make_linear_model
from tests.mosquitto import Mosquitto, wait_until

DEVICE = "pi-1"
EDGES = [float(e) for e in np.linspace(-2, 2, 9)]
DRIFT = {
    "bins": 10,
    "features": [
        {"input": "x", "index": i, "name": f"f{i}", "edges": EDGES, "expected": [0.1] * 10}
        for i in range(8)
    ],
    "channels": [],
}


class Server:
    """The server side in miniature: keys, bundles, chunk service, desired-state publisher."""

    def __init__(self, broker: Mosquitto, tmp: Path, chunk_service: Callable[..., Any]) -> None:
        self.keys = KeyStore(tmp / "keys")
        self.keys.init()
        self.director = load_signing_key(self.keys.dir / "director-1.key")
        self.release = load_signing_key(self.keys.dir / "release-1.key")
        self.srv = tmp / "srv"
        self.srv.mkdir()
        self.bundles: dict[str, Path] = {}
        self.refs: dict[int, BundleRef] = {}
        self.chunks = chunk_service(broker, self.bundles)
        self.inbox: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.conn = MqttConnection(
            MqttOptions(
                host=broker.host,
                port=broker.port,
                client_id="server",
                backoff_initial_s=0.05,
                backoff_max_s=0.3,
            ),
            on_message=self._on_message,
        )
        for channel in (DeviceChannel.STATUS, DeviceChannel.TELEMETRY, DeviceChannel.FACTS):
            self.conn.subscribe(str(all_devices(channel)))
        self.conn.start()
        assert self.conn.wait_connected(5)

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        with self.lock:
            self.inbox.append((topic, payload))

    def bundle(self, version: int, *, classes: int = 3) -> BundleRef:
        import hashlib

        path = self.srv / f"tiny-{version}.bundle"
        opts = BuildOptions(
            name="tiny", version=version, device_classes=("pi4",), drift_reference=DRIFT
        )
        model = make_linear_model(features=8, classes=classes, seed=version)
        build_bundle(model, opts, [self.release], path)
        data = path.read_bytes()
        ref = BundleRef(f"tiny-{version}", hashlib.sha256(data).hexdigest(), len(data))
        self.bundles[ref.id] = path
        self.refs[version] = ref
        return ref

    def desired(self, version: int, model_version: int, **kw: Any) -> DesiredState:
        now = utcnow()
        return DesiredState(
            target=kw.pop("target", DesiredTarget(device=DEVICE)),
            version=version,
            model=ModelRef("tiny", model_version),
            bundle=self.refs[model_version],
            issued=now - timedelta(minutes=1),
            expires=now + timedelta(days=1),
            **kw,
        )

    def publish(self, payload: bytes, topic: str | None = None) -> None:
        acks: list[PublishResult] = []
        self.conn.publish(
            topic or str(DeviceTopic.desired(DEVICE)), payload, retain=True, on_ack=acks.append
        )
        assert wait_until(lambda: acks and acks[0].ok)

    def sign(self, state: DesiredState, keys: list[SigningKey] | None = None) -> bytes:
        return state.sign(keys or [self.director]).to_bytes()

    def messages(self, channel: DeviceChannel) -> list[bytes]:
        topic = str(DeviceTopic(DEVICE, channel))
        with self.lock:
            return [p for t, p in self.inbox if t == topic]

    def telemetry(self) -> list[TelemetryRecord]:
        return [TelemetryRecord.from_bytes(p) for p in self.messages(DeviceChannel.TELEMETRY)]

    def events(self) -> list[tuple[str, str | None]]:
        seen: dict[int, TelemetryRecord] = {r.seq: r for r in self.telemetry()}
        return [(e.kind, e.reason) for s in sorted(seen) for e in seen[s].events]

    def stop(self) -> None:
        self.conn.stop()


@pytest.fixture
def server(mosquitto, tmp_path, chunk_service) -> Iterator[Server]:
    s = Server(mosquitto, tmp_path, chunk_service)
    yield s
    s.stop()


class Device:
    """One agent process: the core on a state directory plus the daemon."""

    def __init__(self, broker: Mosquitto, server: Server, state: Path, **kw: Any) -> None:
        doc = {
            "device": {
                "id": DEVICE,
                "class": "pi4",
                "state_dir": str(state),
                "groups": ["canary", "eu"],
                "trust_root": str(kw.get("trust_root", server.keys.trust_root_path)),
            },
            "broker": {
                "host": broker.host,
                "port": broker.port,
                "backoff_initial_s": 0.05,
                "backoff_max_s": 0.3,
            },
            "download": {"chunk_size": 4096, "chunk_timeout_s": 0.5, "window_blocks": 16},
            "telemetry": {"window_s": 0.3},
        }
        self.config = parse_config(doc, state.parent)
        self.agent = Agent(state, self.config.agent_options())
        self.daemon = Daemon(self.config, self.agent, faults=kw.get("faults"))
        self.daemon.start()
        assert self.daemon.conn.wait_connected(5)

    def serving(self) -> tuple[str, int] | None:
        ref = self.agent.serving
        return None if ref is None else (ref.model, ref.version)

    def stop(self) -> None:
        self.daemon.stop()
        self.agent.close()


@pytest.fixture
def device(mosquitto, server, tmp_path) -> Iterator[Callable[..., Device]]:
    made: list[Device] = []

    def make(**kw: Any) -> Device:
        d = Device(mosquitto, server, tmp_path / "state", **kw)
        made.append(d)
        return d

    yield make
    for d in made:
        if d.daemon._threads:
            d.stop()


def test_daemon_installs_a_signed_desired_state(server, device) -> None:
    server.bundle(2)
    dev = device()
    server.publish(server.sign(server.desired(1, 2)))
    assert wait_until(lambda: dev.serving() == ("tiny", 2), 30), dev.daemon.status()
    # Predictions flow into telemetry with drift histograms over the manifest's edges.
    x = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    pid, _ = dev.agent.predict_with_id({"x": x})
    dev.agent.feedback(pid, 2)
    assert wait_until(lambda: any(r.predictions for r in server.telemetry()), 10)
    record = next(r for r in server.telemetry() if r.predictions)
    assert record.model == ModelRef("tiny", 2)
    assert sum(record.features[0].counts) == 4
    assert record.feedback[0].prediction_id == pid
    kinds = [k for k, _ in server.events()]
    for kind in ("desired-accepted", "download-started", "download-complete", "committed"):
        assert kind in kinds
    status = StatusMessage.from_bytes(server.messages(DeviceChannel.STATUS)[-1])
    assert status.state == "online" and status.model == ModelRef("tiny", 2)
    facts = DeviceFactsMessage.from_bytes(server.messages(DeviceChannel.FACTS)[-1])
    assert facts.device_class == "pi4" and facts.onnxruntime_version


def test_daemon_ignores_forged_desired_states(server, device) -> None:
    server.bundle(2)
    server.bundle(3)
    dev = device()
    server.publish(server.sign(server.desired(1, 2), [generate()]))  # unknown key
    server.publish(server.sign(server.desired(2, 2), [server.release]))  # wrong role
    tampered = server.desired(3, 2).sign([server.director]).to_dict()
    tampered["signed"]["model"]["version"] = 3
    tampered["signed"]["bundle"] = server.refs[3].to_dict()
    from edgefleet import canonical

    server.publish(canonical.encode(tampered))
    other = server.desired(4, 2, target=DesiredTarget(device="pi-2"))
    server.publish(server.sign(other))  # re-routed from another device's topic
    assert wait_until(lambda: dev.daemon.counters["desired_rejected"] == 4, 10)
    assert dev.serving() is None and dev.daemon.effective() is None
    assert wait_until(lambda: len([k for k, _ in server.events() if k == "desired-rejected"]) == 4)
    reasons = [r or "" for k, r in server.events() if k == "desired-rejected"]
    assert any("UnknownKeyError" in r for r in reasons)
    assert any("BadSignatureError" in r for r in reasons)
    assert any("WrongTargetError" in r for r in reasons)

    old = server.sign(server.desired(5, 2))  # genuine, recorded by an attacker
    server.publish(server.sign(server.desired(6, 3)))
    assert wait_until(lambda: dev.serving() == ("tiny", 3), 30)
    server.publish(old)  # replayed: older version for the same target
    assert wait_until(lambda: dev.daemon.counters["desired_rejected"] == 5, 10)
    assert wait_until(
        lambda: any(
            "RollbackError" in (r or "") for k, r in server.events() if k == "desired-rejected"
        )
    )
    assert dev.serving() == ("tiny", 3) and dev.daemon.effective()[1].version == 6


def test_daemon_replay_protection_survives_a_restart(server, device) -> None:
    server.bundle(2)
    dev = device()
    v1 = server.sign(server.desired(1, 2))
    server.publish(server.sign(server.desired(2, 2)))
    assert wait_until(lambda: dev.serving() == ("tiny", 2), 30)
    dev.stop()
    again = device()  # restart: the retained v2 is re-delivered and recognised
    assert wait_until(lambda: again.daemon.effective() is not None, 10)
    assert again.daemon.counters["desired_accepted"] == 0  # nothing new
    server.publish(v1)
    assert wait_until(lambda: again.daemon.counters["desired_rejected"] == 1, 10)
    assert again.daemon.effective()[1].version == 2


def test_daemon_resumes_a_download_after_an_agent_restart(server, device) -> None:
    ref = server.bundle(2, classes=2000)  # ~64 KiB of weights: 16 blocks of 4 KiB
    faults = NetworkFaults(delay_s=0.02)
    dev = device(faults=faults)
    server.publish(server.sign(server.desired(1, 2)))
    nblocks = -(-ref.size // 4096)
    assert wait_until(lambda: faults.frames_seen >= nblocks // 3, 20)
    dev.stop()  # the agent goes down mid-download
    assert dev.serving() is None
    checkpoint = dev.config.daemon_dir / "downloads" / f"{ref.id}.state"
    probe = Downloader(
        dev.config.daemon_dir, ref, dev.daemon.transport, dev.config.download_options()
    )
    held = probe.have
    probe.close()
    assert checkpoint.exists() and 0 < held.count < nblocks
    before = len(server.chunks.requests)
    again = device()
    assert wait_until(lambda: again.serving() == ("tiny", 2), 30)
    second = [b for _, req in server.chunks.requests[before:] for b in req.blocks()]
    assert not set(second) & {b for b in range(nblocks) if b in held}  # only what was missing


def test_group_desired_state_applies_and_the_device_one_wins(server, device) -> None:
    server.bundle(2)
    server.bundle(3)
    dev = device()
    group = server.desired(1, 2, target=DesiredTarget(group="eu"))
    server.publish(server.sign(group), str(GroupTopic("eu")))
    assert wait_until(lambda: dev.serving() == ("tiny", 2), 30)
    mine = server.desired(1, 3, shadow=ShadowSpec(ModelRef("tiny", 2), server.refs[2]))
    server.publish(server.sign(mine))
    assert wait_until(lambda: dev.serving() == ("tiny", 3), 30)
    assert wait_until(lambda: dev.agent.shadow_stats() is not None, 30)
    assert dev.agent.shadow_stats()["version"] == 2
    # A newer group version does not override the device's own desired state.
    server.publish(server.sign(server.desired(2, 2, target=DesiredTarget(group="eu"))),
                   str(GroupTopic("eu")))  # fmt: skip
    wait_until(lambda: False, 0.5)
    assert dev.serving() == ("tiny", 3)


def test_daemon_reports_a_bundle_that_fails_verification(server, device) -> None:
    good = server.bundle(2)
    bad = server.srv / "evil.bundle"
    bad.write_bytes(b"\0" * good.size)
    import hashlib

    evil = BundleRef("evil-1", hashlib.sha256(bad.read_bytes()).hexdigest(), good.size)
    server.bundles[evil.id] = bad
    dev = device()
    state = server.desired(1, 2)
    state = DesiredState(state.target, 1, state.model, evil, state.issued, state.expires)
    server.publish(server.sign(state))
    assert wait_until(lambda: dev.daemon.book.applied.get(f"device:{DEVICE}") is not None, 30)
    assert dev.serving() is None
    assert dev.daemon.book.applied[f"device:{DEVICE}"].outcome == "aborted"
    assert wait_until(lambda: "aborted" in [k for k, _ in server.events()], 10)


def test_daemon_uses_the_rotated_root_and_refuses_a_revoked_director(
    server, device, tmp_path
) -> None:
    v1 = tmp_path / "trust-root-v1.json"
    v1.write_bytes(server.keys.trust_root_path.read_bytes())
    device(trust_root=v1).stop()  # first start pins v1
    server.keys.rotate(add={"director": 1}, remove=[server.director.keyid])
    core = Agent(tmp_path / "state", AgentOptions(device_class="pi4"))
    assert core.update_trust_root(server.keys.chain_since(1)).version == 2
    core.close()
    dev = device(trust_root=v1)  # the config still names v1: the pinned v2 stays
    assert dev.agent.trust_root().version == 2
    server.bundle(2)
    server.publish(server.sign(server.desired(1, 2)))  # the revoked director key
    assert wait_until(lambda: dev.daemon.counters["desired_rejected"] == 1, 10)
    new_director = load_signing_key(server.keys.dir / "director-2.key")
    server.publish(server.sign(server.desired(2, 2), [new_director]))
    assert wait_until(lambda: dev.serving() == ("tiny", 2), 30)


def test_core_outcomes_reach_status_and_telemetry(server, device) -> None:
    from agent.state import ErrorInfo
    from agent.state import UpdateOutcome as CoreEvent

    dev = device()
    # What the core reports when it recovers from a crash during a trial at start-up.
    dev.daemon.core_event(
        CoreEvent("recover-3", "recover", "rolled-back", "tiny", 3, None,
                  ErrorInfo("TrialExhaustedError", 47, "3 starts on trial"), "2026-06-01T12:00:00Z")
    )  # fmt: skip
    assert wait_until(lambda: ("rolled-back", "TrialExhaustedError: 3 starts on trial")
                      in server.events(), 10)  # fmt: skip
    status = StatusMessage.from_bytes(server.messages(DeviceChannel.STATUS)[-1])
    assert status.update is not None and status.update.kind == "rolled-back"
