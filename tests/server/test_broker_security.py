"""A device's broker credentials against another device, on a Mosquitto the server configures.

The broker runs on the password and ACL files the server writes at start and
on every enrollment (reloaded by SIGHUP); the server's MQTT service is
connected with its own login. The attacker is a paho client logged in with
device A's credentials going after device B: B's chunk data, B's desired
state and B's group's, B's chunk-request and telemetry topics, and B's bundle
through A's own chunk-request topic. A forged desired state published by
someone with broker write access but without the director key is refused by
a real agent daemon.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.config import parse_config
from agent.core import Agent
from agent.daemon import Daemon
from edgefleet.chunks import Bitmap, plan_request
from edgefleet.keys import generate, load_signing_key
from edgefleet.timeutil import utcnow
from edgefleet.topics import DeviceTopic, GroupTopic
from edgefleet.wire import (
    BundleRef,
    ChunkRefusal,
    DesiredState,
    DesiredTarget,
    ModelRef,
    parse_chunk_frame,
)
from server.db import make_engine, upgrade_schema
from server.services import desired
from tests.mosquitto import wait_until
from tests.server.conftest import Keys, managed_broker
from tests.server.mqtt_harness import Harness, Probe, record

SERVER_PASSWORD = "server-secret"


@pytest.fixture
def secured(tmp_path: Path, keys: Keys) -> Iterator[Harness]:
    """The server's generated broker configuration and files, and the server's MQTT service."""
    db_url = f"sqlite:///{tmp_path / 'secured.db'}"
    engine = make_engine(db_url)
    upgrade_schema(engine)
    managed = managed_broker(
        tmp_path,
        db_url,
        keys,
        engine,
        mqtt_password=SERVER_PASSWORD,
        desired_poll_seconds=0.1,
        ingest_batch_seconds=0.05,
    )
    acl = managed.settings.mosquitto_acl_file
    assert acl is not None and "pattern read edgefleet/v1/devices/%u/desired" in acl.read_text()
    managed.api.client.__enter__()
    h = Harness(
        tmp_path, managed.broker, engine, managed.api, managed.settings,
        server_port=managed.server_port,
    )  # fmt: skip
    try:
        yield h
    finally:
        h.close()
        managed.api.client.__exit__(None, None, None)
        engine.dispose()
        managed.close()


def _login(
    h: Harness, user: str, password: str, *, port: int | None = None, client_id: str | None = None
) -> Probe:
    """Log in (device listener unless ``port``), retrying while the broker applies a reload."""
    probes: list[Probe] = []

    def attempt() -> bool:
        probe = Probe(port or h.broker.port, client_id, user=user, password=password)
        if probe.accepted:
            probes.append(probe)
            return True
        probe.close()
        return False

    assert wait_until(attempt, 10, 0.2), h.broker.log()
    return probes[0]


@pytest.fixture
def fleet(secured: Harness) -> dict[str, Any]:
    h = secured
    h.publish_model("m", 1)
    h.publish_model("m", 2)
    creds = {"a": h.enroll("dev-a", groups=("ga",)), "b": h.enroll("dev-b", groups=("gb",))}
    svc = h.service()
    with h.api.sessions() as s:
        desired.assign(s, h.settings, desired.Target("device", "dev-b"), model="m", version=1,
                       actor="test")  # fmt: skip
    with h.api.sessions() as s:
        desired.assign(s, h.settings, desired.Target("group", "gb"), model="m", version=2,
                       actor="test")  # fmt: skip
    assert wait_until(lambda: not _unpublished(h), 10)
    return {"h": h, "svc": svc, "creds": creds}


def _unpublished(h: Harness) -> list[Any]:
    with h.api.sessions() as s:
        return list(desired.unpublished(s))


def test_device_credentials_cannot_read_another_devices_desired_state_or_chunks(
    fleet: dict[str, Any],
) -> None:
    h, creds = fleet["h"], fleet["creds"]
    attacker = _login(h, "dev-a", creds["a"])
    victim_topics = [
        str(DeviceTopic.desired("dev-b")),
        str(GroupTopic("gb")),
        str(DeviceTopic.chunk_data("dev-b")),
        "edgefleet/v1/devices/+/chunks/data",
        "edgefleet/v1/#",
    ]
    granted = {topic: attacker.subscribe(topic) for topic in victim_topics}
    # The legitimate device B reads its own desired state and its chunks.
    victim = _login(h, "dev-b", creds["b"])
    assert victim.subscribe(str(DeviceTopic.desired("dev-b"))) == 1
    assert victim.subscribe(str(DeviceTopic.chunk_data("dev-b"))) == 1
    assert wait_until(lambda: victim.received(str(DeviceTopic.desired("dev-b"))), 5)
    request = plan_request("m-1", Bitmap(4), 1024, token="victim")
    assert request is not None
    assert victim.publish(str(DeviceTopic.chunk_request("dev-b")), request.to_bytes()) == 0
    assert wait_until(lambda: len(victim.received(str(DeviceTopic.chunk_data("dev-b")))) >= 4, 10)
    # Whatever the broker answered to the subscriptions, nothing of B's reached A.
    assert not [t for t, _, _ in attacker.messages if "dev-b" in t or "/gb/" in t], (
        granted,
        attacker.messages,
    )
    # Mosquitto 2.0 grants such subscriptions and applies the ACL at delivery:
    # B's retained desired states and live chunk frames reached B (above) but
    # nothing at all reached A. (A broker that refuses them, 0x80/0x87, is as good.)
    assert all(code in (0, 1) or code >= 0x80 for code in granted.values()), granted
    assert attacker.messages == []
    attacker.close()
    victim.close()


def test_device_credentials_cannot_publish_in_another_devices_name(
    fleet: dict[str, Any],
) -> None:
    h, creds, svc = fleet["h"], fleet["creds"], fleet["svc"]
    attacker = _login(h, "dev-a", creds["a"])
    victim = _login(h, "dev-b", creds["b"])
    victim.subscribe(str(DeviceTopic.chunk_data("dev-b")))
    served_before = svc.chunks.stats.requests
    request = plan_request("m-1", Bitmap(4), 1024, token="spoof")
    assert request is not None
    # Chunk requests and telemetry in B's name: refused by the ACL (PUBACK 0x87).
    assert attacker.publish(str(DeviceTopic.chunk_request("dev-b")), request.to_bytes()) == 0x87
    assert attacker.publish(str(DeviceTopic.telemetry("dev-b")), record("dev-b", 1).to_bytes()) == (
        0x87
    )
    # A's own, legitimate record goes through (the marker that the pipe works).
    assert attacker.publish(str(DeviceTopic.telemetry("dev-a")), record("dev-a", 1).to_bytes()) == 0
    assert wait_until(lambda: h.telemetry_count("dev-a") == 1, 10)
    assert h.telemetry_count("dev-b") == 0
    assert svc.chunks.stats.requests == served_before
    assert victim.received(str(DeviceTopic.chunk_data("dev-b"))) == []
    # A desired state in B's name: refused too.
    assert attacker.publish(str(DeviceTopic.desired("dev-b")), b"{}", retain=True) == 0x87
    attacker.close()
    victim.close()


def test_device_cannot_fetch_a_bundle_assigned_to_another_device(fleet: dict[str, Any]) -> None:
    h, creds, svc = fleet["h"], fleet["creds"], fleet["svc"]
    attacker = _login(h, "dev-a", creds["a"])
    assert attacker.subscribe(str(DeviceTopic.chunk_data("dev-a"))) == 1
    for bundle in ("m-1", "m-2"):  # B's own bundle and B's group's bundle
        request = plan_request(bundle, Bitmap(8), 1024, token="steal")
        assert request is not None
        assert attacker.publish(str(DeviceTopic.chunk_request("dev-a")), request.to_bytes()) == 0
    assert wait_until(lambda: len(attacker.received(str(DeviceTopic.chunk_data("dev-a")))) == 2, 5)
    frames = [
        parse_chunk_frame(p, max_block_size=1024)
        for p in attacker.received(str(DeviceTopic.chunk_data("dev-a")))
    ]
    assert all(isinstance(f, ChunkRefusal) and f.reason == "unknown-bundle" for f in frames), frames
    assert svc.chunks.stats.blocks_sent == 0
    attacker.close()


def test_forged_desired_state_from_a_broker_writer_is_ignored_by_the_agent(
    fleet: dict[str, Any], keys: Keys, tmp_path: Path
) -> None:
    h, creds, svc = fleet["h"], fleet["creds"], fleet["svc"]
    pw = tmp_path / "dev-a.password"
    pw.write_text(creds["a"])
    pw.chmod(0o600)
    state = tmp_path / "dev-a-state"
    config = parse_config(
        {
            "device": {"id": "dev-a", "class": "cam", "state_dir": str(state), "groups": ["ga"],
                       "trust_root": str(keys.trust_root)},
            "broker": {"host": "127.0.0.1", "port": h.broker.port, "password_file": str(pw),
                       "backoff_initial_s": 0.05, "backoff_max_s": 0.3},
            "download": {"chunk_size": 1024, "chunk_timeout_s": 0.5},
            "telemetry": {"window_s": 0.3},
        },
        tmp_path,
    )  # fmt: skip
    agent = Agent(state, config.agent_options())
    daemon = Daemon(config, agent)
    daemon.start()
    try:
        assert daemon.conn.wait_connected(10), daemon.conn.last_error
        # An admin with broker write access (the server's login) but no director key.
        admin = _login(h, "edgefleet-server", SERVER_PASSWORD, port=h.server_port)
        v1 = h.api.get("/api/v1/models/m/versions/1").json()["bundle"]
        now = utcnow()
        forged = DesiredState(
            target=DesiredTarget(device="dev-a"),
            version=99,
            model=ModelRef("m", 1),
            bundle=BundleRef(v1["id"], v1["sha256"], v1["size"]),
            issued=now - timedelta(minutes=1),
            expires=now + timedelta(days=1),
        )
        release = load_signing_key(keys.release[0])
        for key in (generate(), release):  # an unknown key; a real key of the wrong role
            payload = forged.sign([key]).to_bytes()
            assert admin.publish(str(DeviceTopic.desired("dev-a")), payload, retain=True) == 0
        assert wait_until(lambda: daemon.counters["desired_rejected"] >= 2, 10), daemon.status()
        assert daemon.effective() is None and agent.serving is None
        assert svc.chunks.stats.requests == 0  # it never asked for the bundle
        # The genuine path still works: the server assigns, the agent installs.
        r = h.api.client.put(
            "/api/v1/devices/dev-a/desired",
            headers=h.api.headers("operator"),
            json={"model": "m", "version": 1},
        )
        assert r.status_code == 200, r.text
        assert wait_until(lambda: agent.serving is not None and agent.serving.version == 1, 60), (
            daemon.status()
        )
        admin.close()
    finally:
        daemon.stop()
        agent.close()


# ---------------------------------------------------------------------------
# Session takeover and shared-subscription attacks (issue 9). Each fails on a
# broker configured the old way (one listener, no username-as-client-id, a
# guessable share group) and holds on the generated configuration.


def _telemetry(probe: Probe, device: str, seqs: range) -> list[int]:
    return [
        probe.publish(str(DeviceTopic.telemetry(device)), record(device, s).to_bytes())
        for s in seqs
    ]


def test_attack_client_id_takeover_of_the_server_session_is_refused(fleet: dict[str, Any]) -> None:
    h, creds, svc = fleet["h"], fleet["creds"], fleet["svc"]
    victim = _login(h, "dev-b", creds["b"])
    connects = svc.connection.connects
    guesses = [
        h.settings.effective_mqtt_client_id,  # even the real one, if A learned it
        f"edgefleet-server-{socket.gethostname()}",  # the old default
        "edgefleet-server",
    ]
    attackers: list[Probe] = []
    codes: list[int] = []
    for i in range(15):  # an attacker reconnecting in a loop while B sends telemetry
        attacker = Probe(h.broker.port, guesses[i % 3], user="dev-a", password=creds["a"])
        assert attacker.accepted  # A's login is valid; only the session name is A's own
        attackers.append(attacker)
        codes += _telemetry(victim, "dev-b", range(4 * i + 1, 4 * i + 5))
    assert codes == [0] * 60  # the broker acknowledged all 60 records to B ...
    assert wait_until(lambda: h.telemetry_count("dev-b") == 60, 15)  # ... and all are stored
    assert svc.connection.connects == connects, "the server's session was taken over"
    # On the replicas' own listener, A's login is refused whatever client id it names.
    on_server = Probe(
        h.server_port or 0, h.settings.effective_mqtt_client_id, user="dev-a", password=creds["a"]
    )
    assert not on_server.accepted
    for probe in (*attackers, victim, on_server):
        probe.close()


def test_attack_client_id_takeover_of_another_device_is_refused(fleet: dict[str, Any]) -> None:
    h, creds = fleet["h"], fleet["creds"]
    victim = _login(h, "dev-b", creds["b"], client_id="dev-b")
    assert victim.subscribe(str(DeviceTopic.desired("dev-b"))) == 1
    assert wait_until(lambda: victim.received(str(DeviceTopic.desired("dev-b"))), 5)
    attackers = [
        Probe(h.broker.port, "dev-b", user="dev-a", password=creds["a"]) for _ in range(10)
    ]
    assert all(a.accepted for a in attackers)
    time.sleep(0.5)  # a takeover would have disconnected B by now
    assert victim.disconnects == 0, "device A's client id 'dev-b' kicked device B"
    # A never sees B's session: no queued or retained message of B reaches it.
    assert all(not a.messages for a in attackers)
    assert victim.publish(str(DeviceTopic.telemetry("dev-b")), record("dev-b", 1).to_bytes()) == 0
    assert wait_until(lambda: h.telemetry_count("dev-b") == 1, 10)
    for probe in (*attackers, victim):
        probe.close()


def _guessed_share_filters(h: Harness, channel: str) -> list[str]:
    prefix = h.settings.mqtt_share_group
    return [
        f"$share/{group}/edgefleet/v1/devices/+/{channel}"
        for group in (f"{prefix}-chunks", f"{prefix}-ingest", prefix, "edgefleet")
    ]


def test_attack_shared_subscription_starves_the_chunk_service_is_refused(
    fleet: dict[str, Any],
) -> None:
    h, creds = fleet["h"], fleet["creds"]
    attacker = _login(h, "dev-a", creds["a"])
    for f in _guessed_share_filters(h, "chunks/req"):
        attacker.subscribe(f)  # Mosquitto 2.0 grants it; the ACL is applied at delivery
    victim = _login(h, "dev-b", creds["b"])
    assert victim.subscribe(str(DeviceTopic.chunk_data("dev-b"))) == 1
    topic = str(DeviceTopic.chunk_data("dev-b"))
    for i in range(20):  # one at a time: a request dealt to the attacker is never answered
        request = plan_request("m-1", Bitmap(4), 1024, max_blocks=1, token=f"t{i}")
        assert request is not None
        assert victim.publish(str(DeviceTopic.chunk_request("dev-b")), request.to_bytes()) == 0
        assert wait_until(lambda n=i + 1: len(victim.received(topic)) == n, 5), (
            f"chunk request {i} of B was not answered"
        )
    assert attacker.messages == []
    attacker.close()
    victim.close()


def test_attack_shared_subscription_loses_shared_mode_telemetry_is_refused(
    secured: Harness,
) -> None:
    h = secured
    creds = {"a": h.enroll("dev-a"), "b": h.enroll("dev-b")}
    h.service(telemetry_subscription="shared")
    attacker = _login(h, "dev-a", creds["a"])
    for f in _guessed_share_filters(h, "telemetry"):
        attacker.subscribe(f)
    victim = _login(h, "dev-b", creds["b"])
    assert _telemetry(victim, "dev-b", range(1, 61)) == [0] * 60
    assert wait_until(lambda: h.telemetry_count("dev-b") == 60, 15), h.telemetry_count("dev-b")
    assert attacker.messages == []
    attacker.close()
    victim.close()


def test_attack_system_topics_and_whole_tree_reveal_nothing(fleet: dict[str, Any]) -> None:
    h, creds = fleet["h"], fleet["creds"]
    attacker = _login(h, "dev-a", creds["a"])
    for f in ("$SYS/#", "#", "+/#", "$share/x/#", "$share/y/$SYS/#"):
        attacker.subscribe(f)
    victim = _login(h, "dev-b", creds["b"])
    assert victim.publish(str(DeviceTopic.telemetry("dev-b")), record("dev-b", 1).to_bytes()) == 0
    assert wait_until(lambda: h.telemetry_count("dev-b") == 1, 10)
    time.sleep(0.3)
    assert attacker.messages == []
    attacker.close()
    victim.close()


def test_attack_device_logins_on_the_server_listener_and_server_login_on_device_listener(
    fleet: dict[str, Any],
) -> None:
    h, creds = fleet["h"], fleet["creds"]
    assert not Probe(h.server_port or 0, "x", user="dev-a", password=creds["a"]).accepted
    assert not Probe(h.broker.port, "y", user="edgefleet-server", password=SERVER_PASSWORD).accepted
    assert _login(h, "edgefleet-server", SERVER_PASSWORD, port=h.server_port).accepted


def test_attack_enrolling_a_device_in_the_server_namespace_is_refused(secured: Harness) -> None:
    h = secured
    for device_id in (
        "edgefleet-server",
        "edgefleet-server-x",
        h.settings.effective_mqtt_client_id,
    ):
        r = h.api.post(
            "/api/v1/devices", role="operator", json={"device_id": device_id, "device_class": "cam"}
        )
        assert r.status_code == 409 and "namespace" in r.json()["detail"], r.text


def test_broker_config_cli_writes_the_configuration_the_attack_tests_run(
    secured: Harness,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from edgefleet.cli import main
    from server.services.broker import Listener, mosquitto_conf

    s = secured.settings
    for key in ("mqtt_url", "device_mqtt_url", "mqtt_password", "trust_root",
                "mosquitto_password_file", "mosquitto_acl_file", "mosquitto_pid_file"):  # fmt: skip
        monkeypatch.setenv(f"EDGEFLEET_{key.upper()}", str(getattr(s, key).get_secret_value()
                           if key == "mqtt_password" else getattr(s, key)))  # fmt: skip
    out = tmp_path / "out" / "mosquitto.conf"
    (tmp_path / "out").mkdir()
    rc = main(["server", "broker-config", "--persistence-dir", str(tmp_path), "--out", str(out)])
    assert rc == 0, capsys.readouterr()
    device = Listener("127.0.0.1", secured.broker.port)
    server = Listener("127.0.0.1", secured.server_port or 0)
    assert out.read_text() == mosquitto_conf(
        s, devices=[device], server=server, persistence_dir=tmp_path
    )
    capsys.readouterr()
    assert main(["server", "broker-config", "--persistence-dir", "x", "--server-listener",
                 "nope", "--json"]) == 1  # fmt: skip
    err = json.loads(capsys.readouterr().out)
    assert err["error"] == "ConfigError" and "HOST:PORT" in err["message"]
