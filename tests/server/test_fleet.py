"""Fleet: enrollment writes broker files a REAL Mosquitto accepts; ACLs; status and facts."""

from __future__ import annotations

import subprocess
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edgefleet.topics import DeviceTopic, GroupTopic
from edgefleet.wire import DeviceFactsMessage, ModelRef, StatusMessage, UpdateEvent
from server import metrics
from server.services import broker, fleet
from tests.mosquitto import wait_until
from tests.server.conftest import Api, Keys, make_api, make_settings, managed_broker

SERVER_PASSWORD = "server-secret"


class Client:
    """A paho client that records its CONNACK and the messages it receives."""

    def __init__(self, port: int, user: str, password: str) -> None:
        self.rc: mqtt.ReasonCode | None = None
        self.messages: list[tuple[str, bytes]] = []
        self.subscribed = threading.Event()
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"{user}-{uuid.uuid4().hex[:6]}"
        )
        self.c.username_pw_set(user, password)
        self.c.on_connect = lambda c, u, f, rc, p: setattr(self, "rc", rc)
        self.c.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.c.on_subscribe = lambda *a: self.subscribed.set()
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert wait_until(lambda: self.rc is not None, 5), "no CONNACK"

    @property
    def accepted(self) -> bool:
        return self.rc is not None and not self.rc.is_failure

    def subscribe(self, *topics: str) -> None:
        for topic in topics:
            self.subscribed.clear()
            self.c.subscribe(topic, qos=1)
            assert self.subscribed.wait(5)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def broker_api(tmp_path: Path, db_url: str, keys: Keys, engine):
    """A real broker on the server's generated configuration and files, reloaded by SIGHUP."""
    managed = managed_broker(tmp_path, db_url, keys, engine, mqtt_password=SERVER_PASSWORD)
    api, mq = managed.api, managed.broker
    clients: list[Client] = []

    def connect(user: str, password: str, *, server: bool = False) -> Client:
        """Log in on the device listener (``server``: on the replicas' listener)."""
        client = Client(managed.server_port if server else mq.port, user, password)
        clients.append(client)
        return client

    with api.client:
        yield api, mq, connect
    for c in clients:
        c.close()
    managed.close()


def _connects_eventually(connect, user: str, password: str) -> bool:
    """Mosquitto applies SIGHUP asynchronously: retry until the reload landed."""

    def attempt() -> bool:
        client = connect(user, password)
        return client.accepted

    return wait_until(attempt, 5, 0.1)


def test_enrolled_device_connects_to_real_broker_wrong_password_refused(broker_api) -> None:
    api, mq, connect = broker_api
    r = api.post(
        "/api/v1/devices",
        role="operator",
        json={"device_class": "cam", "device_id": "cam-1", "groups": ["lobby"]},
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["mqtt_username"] == "cam-1"
    assert body["broker"]["reloaded"] is True
    assert body["mqtt_url"] == f"mqtt://127.0.0.1:{mq.port}"
    assert body["trust_root"]["signed"]["_type"] == "edgefleet-trust-root"
    password = body["mqtt_password"]
    assert password not in (mq.workdir / "passwd").read_text()
    assert _connects_eventually(connect, "cam-1", password), mq.log()
    assert not connect("cam-1", password + "x").accepted
    assert not connect("cam-2", password).accepted
    # the server's own login still works after the rewrite, on its own listener only
    assert connect("edgefleet-server", SERVER_PASSWORD, server=True).accepted
    assert not connect("edgefleet-server", SERVER_PASSWORD).accepted


def test_acl_device_confined_to_its_topics(broker_api) -> None:
    api, mq, connect = broker_api
    creds = {}
    for dev, groups in (("cam-1", ["lobby"]), ("cam-2", ["dock"])):
        r = api.post(
            "/api/v1/devices",
            role="operator",
            json={"device_class": "cam", "device_id": dev, "groups": groups},
        )
        creds[dev] = r.json()["mqtt_password"]
    assert _connects_eventually(connect, "cam-2", creds["cam-2"]), mq.log()
    server = connect("edgefleet-server", SERVER_PASSWORD, server=True)
    server.subscribe("edgefleet/v1/devices/+/telemetry", "edgefleet/v1/devices/+/status")
    for topic in (
        DeviceTopic.desired("cam-1"),
        DeviceTopic.desired("cam-2"),
        GroupTopic("lobby"),
        GroupTopic("dock"),
    ):
        server.publish(str(topic), f"for {topic}".encode(), retain=True)
    cam1 = connect("cam-1", creds["cam-1"])
    cam1.subscribe(
        str(DeviceTopic.desired("cam-1")),
        str(GroupTopic("lobby")),
        str(DeviceTopic.desired("cam-2")),
        str(GroupTopic("dock")),
    )
    cam1.publish(str(DeviceTopic.telemetry("cam-1")), b"mine")
    cam1.publish(str(DeviceTopic.telemetry("cam-2")), b"spoofed")
    cam1.publish(str(DeviceTopic.status("cam-1")), b"online")
    assert wait_until(lambda: len(server.messages) >= 2, 5)
    assert wait_until(lambda: len(cam1.messages) >= 2, 5)
    # A last chance for forbidden traffic to show up before we assert it did not.
    cam1.publish(str(DeviceTopic.telemetry("cam-1")), b"marker")
    assert wait_until(
        lambda: ("edgefleet/v1/devices/cam-1/telemetry", b"marker") in server.messages, 5
    )
    assert ("edgefleet/v1/devices/cam-2/telemetry", b"spoofed") not in server.messages
    assert ("edgefleet/v1/devices/cam-1/telemetry", b"mine") in server.messages
    got = {t for t, _ in cam1.messages}
    assert got == {str(DeviceTopic.desired("cam-1")), str(GroupTopic("lobby"))}


def test_removed_device_loses_access(broker_api) -> None:
    api, _mq, connect = broker_api
    r = api.post("/api/v1/devices", role="operator", json={"device_class": "cam"})
    dev, pw = r.json()["mqtt_username"], r.json()["mqtt_password"]
    assert dev.startswith("dev-")
    assert _connects_eventually(connect, dev, pw)
    assert api.delete(f"/api/v1/devices/{dev}", role="operator").json()["broker"]["reloaded"]
    assert wait_until(lambda: not connect(dev, pw).accepted, 5, 0.1)
    assert api.get(f"/api/v1/devices/{dev}", role="viewer").status_code == 404


def test_group_change_rewrites_acl(broker_api) -> None:
    api, mq, _connect = broker_api
    api.post("/api/v1/devices", role="operator", json={"device_class": "cam", "device_id": "c1"})
    r = api.patch("/api/v1/devices/c1", role="operator", json={"groups": ["west", "east"]})
    assert r.status_code == 200 and r.json()["groups"] == ["east", "west"]
    acl = (mq.workdir / "acl").read_text()
    assert "user c1\ntopic read edgefleet/v1/groups/east/desired\n" in acl


def test_hash_compatible_with_mosquitto_passwd(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "u", "s3cret"], check=True)
    line = path.read_text().strip()
    assert broker.verify_password("s3cret", line.split(":", 1)[1])
    assert not broker.verify_password("wrong", line.split(":", 1)[1])
    mine = broker.hash_password("s3cret")
    assert mine.startswith("$7$101$") and broker.verify_password("s3cret", mine)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"device_class": "cam", "device_id": "a/b"}, "device_id"),
        ({"device_class": "cam", "device_id": "+"}, "device_id"),
        ({"device_class": "cam", "groups": ["#"]}, "group"),
        ({"device_class": "cam", "tags": ["has space"]}, "tag"),
        ({"device_class": "c/d"}, "device_class"),
        ({"device_class": "cam", "device_id": "edgefleet-server"}, "broker namespace"),
        ({"device_class": "cam", "device_id": "edgefleet-server-2"}, "broker namespace"),
    ],
)
def test_enroll_bad_input_rejected(api: Api, body: dict, needle: str) -> None:
    api.post("/api/v1/devices", role="operator", json={"device_class": "cam", "device_id": "ok"})
    before = (
        api.settings.mosquitto_acl_file.read_text(),
        api.get("/api/v1/devices/ok", role="viewer").json(),
    )
    r = api.post("/api/v1/devices", role="operator", json=body)
    assert r.status_code in (409, 422), r.text
    assert needle in r.text
    after = (
        api.settings.mosquitto_acl_file.read_text(),
        api.get("/api/v1/devices/ok", role="viewer").json(),
    )
    assert after == before
    assert api.get("/api/v1/devices", role="viewer").json()["total"] == 1


def test_enroll_duplicate_409(api: Api) -> None:
    body = {"device_class": "cam", "device_id": "dup"}
    assert api.post("/api/v1/devices", role="operator", json=body).status_code == 201
    r = api.post("/api/v1/devices", role="operator", json=body)
    assert r.status_code == 409 and "already enrolled" in r.json()["detail"]


def test_enroll_without_broker_files_503(tmp_path: Path, db_url: str, keys: Keys, engine) -> None:
    settings = make_settings(
        tmp_path, db_url, keys, mosquitto_password_file=None, mosquitto_acl_file=None
    )
    api = make_api(settings, engine)
    with api.client:
        r = api.post("/api/v1/devices", role="operator", json={"device_class": "cam"})
        assert r.status_code == 503 and "MOSQUITTO_PASSWORD_FILE" in r.json()["detail"]


def test_list_filters(api: Api) -> None:
    for dev, cls, groups, tags in (
        ("a", "cam", ["g1"], ["t1"]),
        ("b", "cam", ["g2"], []),
        ("c", "gw", ["g1"], ["t1", "t2"]),
    ):
        api.post(
            "/api/v1/devices",
            role="operator",
            json={"device_id": dev, "device_class": cls, "groups": groups, "tags": tags},
        )

    def ids(**params):
        return [
            d["id"]
            for d in api.get("/api/v1/devices", role="viewer", params=params).json()["devices"]
        ]

    assert ids() == ["a", "b", "c"]
    assert ids(group="g1") == ["a", "c"]
    assert ids(tag="t2") == ["c"]
    assert ids(device_class="cam") == ["a", "b"]
    assert ids(online=True) == []
    assert ids(limit=1, offset=1) == ["b"]
    # found by schemathesis: a NUL byte in a filter reached PostgreSQL (500)
    r = api.get("/api/v1/devices", role="viewer", params={"device_class": "\x00"})
    assert r.status_code == 422


def test_record_status_and_facts(api: Api) -> None:
    api.post("/api/v1/devices", role="operator", json={"device_id": "d1", "device_class": "cam"})
    t = datetime.now(timezone.utc).timestamp()
    facts = DeviceFactsMessage(
        "d1", "spoofed-class", "aarch64", 4 << 30, 4, "1.18.0", "0.2.0", 21, "3.11.7", "Linux"
    )
    committed = metrics.UPDATE_EVENTS.labels("committed")._value.get()
    with api.sessions() as s:
        assert fleet.record_facts(s, facts)
        assert fleet.record_status(
            s,
            StatusMessage(
                "d1",
                "online",
                t,
                "0.2.0",
                ModelRef("m", 3),
                3,
                UpdateEvent(t, "committed"),
            ),
        )
        # an older offline (e.g. a delayed last will) must not win
        assert not fleet.record_status(s, StatusMessage("d1", "offline", t - 10))
        assert not fleet.record_status(s, StatusMessage("ghost", "online", t))
        assert not fleet.record_facts(
            s,
            DeviceFactsMessage(
                "ghost", "cam", "x86_64", None, None, None, "0.1.0", None, "3.11", "Linux"
            ),
        )
        s.commit()
    assert metrics.UPDATE_EVENTS.labels("committed")._value.get() == committed + 1
    d = api.get("/api/v1/devices/d1", role="viewer").json()
    assert d["online"] is True and d["model"] == "m" and d["model_version"] == 3
    assert d["device_class"] == "cam"
    assert d["facts"]["arch"] == "aarch64" and d["facts"]["ram_bytes"] == 4 << 30
    assert d["facts"]["onnxruntime_version"] == "1.18.0"
    assert d["last_update"]["kind"] == "committed"
    assert api.get("/api/v1/devices", role="viewer", params={"online": True}).json()["total"] == 1
    with api.sessions() as s:
        assert fleet.record_status(s, StatusMessage("d1", "offline", t + 5))
        s.commit()
    assert api.get("/api/v1/devices/d1", role="viewer").json()["online"] is False
    text = api.get("/metrics", role="viewer").text
    assert "edgefleet_devices_online 0.0" in text
    assert 'edgefleet_update_events_total{outcome="committed"}' in text


def test_concurrent_enrollments_all_reach_the_password_file(api: Api) -> None:
    errors: list[BaseException] = []

    def replica(n: int) -> None:
        try:
            for i in range(5):
                with api.sessions() as s:
                    fleet.enroll(
                        s, api.settings, device_class="cam", device_id=f"r{n}-{i}", actor="test"
                    )
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=replica, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors

    def users(path: Path) -> set[str]:
        return {line.split(":", 1)[0] for line in path.read_text().splitlines()}

    assert users(api.settings.mosquitto_password_file) == {
        f"r{n}-{i}" for n in range(3) for i in range(5)
    }
    assert users(api.settings.effective_mosquitto_server_password_file) == {"edgefleet-server"}
