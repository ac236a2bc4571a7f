"""MqttConnection against a real Mosquitto: session, will, reconnect, errors."""

from __future__ import annotations

import ipaddress
import random
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.mqtt import (
    BrokerUnavailableError,
    MqttConnection,
    MqttOptions,
    NotAuthorizedError,
    NotConnectedError,
    PublishError,
    PublishResult,
    TlsError,
    TlsHandshakeError,
    TlsOptions,
    Will,
    backoff_delay,
)
from edgefleet.errors import TransportError
from edgefleet.topics import DeviceTopic, device_acl_patterns, mosquitto_acl
from tests.mosquitto import Mosquitto, free_port, wait_until

FAST = dict(backoff_initial_s=0.05, backoff_max_s=0.3, keepalive_s=5, connect_timeout_s=2.0)


class Inbox:
    """Collects messages from a connection's callback."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()

    def __call__(self, topic: str, payload: bytes, retained: bool) -> None:
        with self.lock:
            self.items.append((topic, payload, retained))

    def payloads(self, topic: str | None = None) -> list[bytes]:
        with self.lock:
            return [p for t, p, _ in self.items if topic is None or t == topic]


@pytest.fixture
def connect() -> Iterator[Callable[..., MqttConnection]]:
    made: list[MqttConnection] = []

    def make(
        broker: Mosquitto | Any, client_id: str, *, start: bool = True, **kw
    ) -> MqttConnection:
        handlers = {k: kw.pop(k) for k in ("on_message", "on_connect") if k in kw}
        opts = MqttOptions(
            host=broker.host, port=broker.port, client_id=client_id, **{**FAST, **kw}
        )
        conn = MqttConnection(opts, **handlers)
        made.append(conn)
        if start:
            conn.start()
            assert conn.wait_connected(5), conn.last_error
        return conn

    yield make
    for conn in made:
        conn.stop(timeout_s=2)


def test_publish_subscribe_and_ack(mosquitto, connect) -> None:
    inbox = Inbox()
    sub = connect(mosquitto, "server", on_message=inbox)
    sub.subscribe("edgefleet/v1/devices/+/telemetry")
    assert wait_until(lambda: sub.connects == 1)
    pub = connect(mosquitto, "pi-1")
    acks: list[PublishResult] = []
    wait_until(lambda: False, 0.1)  # let the SUBACK land
    mid = pub.publish(str(DeviceTopic.telemetry("pi-1")), b"hello", on_ack=acks.append)
    assert wait_until(lambda: acks)
    assert acks[0].mid == mid and acks[0].ok
    assert wait_until(lambda: inbox.payloads() == [b"hello"])
    assert pub.pending_acks() == 0


def test_last_will_is_published_when_connection_dies(mosquitto, connect) -> None:
    inbox = Inbox()
    watcher = connect(mosquitto, "watcher", on_message=inbox)
    status = str(DeviceTopic.status("pi-1"))
    watcher.subscribe(status)
    device = connect(mosquitto, "pi-1", will=Will(status, b"offline"))
    device.publish(status, b"online", retain=True)
    assert wait_until(lambda: b"online" in inbox.payloads(status))
    device.drop_connection()
    assert wait_until(lambda: b"offline" in inbox.payloads(status))
    # The explicit loop reconnects by itself.
    assert wait_until(lambda: device.connects == 2 and device.connected)


def test_clean_stop_does_not_publish_the_will(mosquitto, connect) -> None:
    inbox = Inbox()
    watcher = connect(mosquitto, "watcher", on_message=inbox)
    status = str(DeviceTopic.status("pi-1"))
    watcher.subscribe(status)
    device = connect(mosquitto, "pi-1", will=Will(status, b"offline"))
    device.publish(status, b"bye", retain=True)
    assert wait_until(lambda: b"bye" in inbox.payloads(status))
    device.stop()
    wait_until(lambda: False, 0.3)
    assert b"offline" not in inbox.payloads(status)


def test_session_survives_broker_restart(mosquitto, connect) -> None:
    inbox = Inbox()
    device = connect(mosquitto, "pi-1", on_message=inbox)
    desired = str(DeviceTopic.desired("pi-1"))
    device.subscribe(desired)
    wait_until(lambda: False, 0.1)
    mosquitto.restart()
    assert wait_until(lambda: device.connects == 2 and device.connected)
    assert device.session_present  # persisted by the broker
    server = connect(mosquitto, "server")
    server.publish(desired, b"v2", retain=True)
    assert wait_until(lambda: b"v2" in inbox.payloads(desired))


def test_messages_queued_while_agent_away_are_delivered(mosquitto, connect) -> None:
    desired = str(DeviceTopic.chunk_data("pi-1"))
    first = connect(mosquitto, "pi-1")
    first.subscribe(desired)
    wait_until(lambda: False, 0.1)
    first.stop()
    server = connect(mosquitto, "server")
    acks: list[PublishResult] = []
    server.publish(desired, b"while-away", on_ack=acks.append)
    assert wait_until(lambda: acks and acks[0].ok)
    inbox = Inbox()
    # A new process with the same client id resumes the session (clean_start=False).
    again = connect(mosquitto, "pi-1", on_message=inbox)
    assert again.session_present
    assert wait_until(lambda: inbox.payloads(desired) == [b"while-away"])


def test_qos1_publish_while_broker_down_is_sent_after_reconnect(mosquitto, connect) -> None:
    inbox = Inbox()
    server = connect(mosquitto, "server", on_message=inbox)
    topic = str(DeviceTopic.telemetry("pi-1"))
    server.subscribe(topic)
    device = connect(mosquitto, "pi-1")
    wait_until(lambda: False, 0.1)
    mosquitto.stop()
    assert wait_until(lambda: not device.connected)
    acks: list[PublishResult] = []
    device.publish(topic, b"queued", on_ack=acks.append)
    with pytest.raises(NotConnectedError):
        device.publish(topic, b"qos0", qos=0)
    assert wait_until(lambda: isinstance(device.last_error, BrokerUnavailableError))
    mosquitto.start()
    assert wait_until(lambda: acks and acks[0].ok, 10)
    assert wait_until(lambda: b"queued" in inbox.payloads(topic))


def test_wrong_password_is_not_authorized(mosquitto_factory, connect) -> None:
    broker = mosquitto_factory(users={"pi-1": "right"})
    conn = connect(broker, "pi-1", start=False, username="pi-1", password="wrong")
    conn.start()
    assert wait_until(lambda: isinstance(conn.last_error, NotAuthorizedError))
    assert not conn.connected
    assert isinstance(conn.last_error, TransportError)


def test_acl_denial_is_a_permanent_puback_failure(mosquitto_factory, connect) -> None:
    acl = mosquitto_acl({"pi-1": ["canary"]}, server_users=["server"])
    broker = mosquitto_factory(users={"pi-1": "pw", "pi-2": "pw2", "server": "s"}, acl=acl)
    device = connect(broker, "pi-1", username="pi-1", password="pw")
    acks: list[PublishResult] = []
    device.publish(str(DeviceTopic.telemetry("pi-1")), b"mine", on_ack=acks.append)
    device.publish(str(DeviceTopic.telemetry("pi-2")), b"forged", on_ack=acks.append)
    assert wait_until(lambda: len(acks) == 2)
    assert acks[0].ok
    assert not acks[1].ok and acks[1].permanent_failure and acks[1].reason_code == 0x87
    assert len(device_acl_patterns()) == 6


def test_unreachable_broker_is_broker_unavailable(connect) -> None:
    dead = SimpleNamespace(host="127.0.0.1", port=free_port())
    conn = connect(dead, "pi-1", start=False)
    conn.start()
    assert wait_until(lambda: isinstance(conn.last_error, BrokerUnavailableError))
    assert isinstance(conn.last_error.__cause__, OSError)


def test_publish_queue_bound_raises_publish_error(connect) -> None:
    dead = SimpleNamespace(host="127.0.0.1", port=free_port())
    conn = connect(dead, "pi-1", start=False, max_queued_messages=2)
    conn.publish("edgefleet/v1/x", b"1")
    conn.publish("edgefleet/v1/x", b"2")
    with pytest.raises(PublishError):
        conn.publish("edgefleet/v1/x", b"3")
    with pytest.raises(PublishError):
        conn.publish("edgefleet/v1/+", b"wild")


def test_backoff_is_bounded_full_jitter() -> None:
    rng = random.Random(1)
    delays = [backoff_delay(a, 0.5, 8.0, rng) for a in range(40)]
    assert all(0 <= d <= 8.0 for d in delays)
    assert max(backoff_delay(0, 0.5, 8.0, rng) for _ in range(200)) <= 0.5
    assert max(delays[10:]) > 2.0  # the ceiling grew


def test_options_are_bounded() -> None:
    with pytest.raises(ValueError):
        MqttOptions(host="h", client_id="c", port=0)
    with pytest.raises(ValueError):
        MqttOptions(host="h", client_id="c", keepalive_s=1)
    with pytest.raises(ValueError):
        MqttOptions(host="h", client_id="c", backoff_initial_s=5, backoff_max_s=1)
    with pytest.raises(ValueError):
        MqttOptions(host="h", client_id="")
    assert "secret" not in repr(MqttOptions(host="h", client_id="c", password="secret"))


def make_tls_files(directory: Path, name: str) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it (PEM files)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def test_tls_connects_with_the_right_ca_only(mosquitto_factory, connect, tmp_path) -> None:
    ca, cert, key = make_tls_files(tmp_path / "tls", "broker")
    broker = mosquitto_factory(tls=(ca, cert, key))
    good = connect(broker, "pi-1", tls=TlsOptions(ca_file=ca))
    assert good.connected
    other_ca, _, _ = make_tls_files(tmp_path / "other", "impostor")
    bad = connect(broker, "pi-2", start=False, tls=TlsOptions(ca_file=other_ca))
    bad.start()
    assert wait_until(lambda: isinstance(bad.last_error, TlsHandshakeError))
    assert isinstance(bad.last_error, BrokerUnavailableError)
    assert isinstance(bad.last_error.__cause__, ssl.SSLError)
    assert not bad.connected
    with pytest.raises(TlsError):
        MqttConnection(
            MqttOptions(host="h", client_id="c", tls=TlsOptions(ca_file=tmp_path / "missing.pem"))
        )
