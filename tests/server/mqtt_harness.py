"""Helpers for the server's MQTT tests: a real broker, a real database, the real service.

``Harness`` owns an API (TestClient over the app, MQTT service off) for
registry and fleet set-up, and starts ``MqttService`` instances by hand, so
tests can stop, crash or restart "replicas" while the broker and the
database stay. ``Probe`` is a plain paho client (a device, an attacker or an
observer). No mock broker and no mock database.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from sqlalchemy import Engine, func, select

from edgefleet.wire import ModelRef, TelemetryRecord
from server.models import TelemetryRow
from server.mqtt.service import MqttService
from server.settings import Settings
from tests.mosquitto import Mosquitto, wait_until
from tests.server.conftest import Api, Keys, make_api, make_settings, onnx_model, run_jobs, upload

T0 = 1_900_000_000.0


def record(device: str, seq: int, predictions: int = 5) -> TelemetryRecord:
    return TelemetryRecord(
        device_id=device,
        seq=seq,
        window_start=T0 + seq,
        window_end=T0 + seq + 1,
        model=ModelRef("m", 1),
        predictions=predictions,
    )


class Probe:
    """A paho MQTT 5 client that records CONNACK, SUBACK codes and messages."""

    def __init__(
        self,
        port: int,
        client_id: str | None = None,
        *,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        self.rc: Any = None
        self.messages: list[tuple[str, bytes, bool]] = []
        self.granted: list[int] = []
        self.disconnects = 0  # DISCONNECTs and dropped connections seen by this client
        self.lock = threading.Lock()
        self._suback = threading.Event()
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"probe-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        if user is not None:
            self.c.username_pw_set(user, password)
        self.c.on_connect = lambda c, u, f, rc, p: setattr(self, "rc", rc)
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert wait_until(lambda: self.rc is not None, 5), "no CONNACK"

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self.lock:
            self.disconnects += 1

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        self.granted.extend(int(c.value) for c in codes)
        self._suback.set()

    @property
    def accepted(self) -> bool:
        return self.rc is not None and not self.rc.is_failure

    def subscribe(self, topic: str, qos: int = 1) -> int:
        """Subscribe and return the granted QoS (0x80+ = refused)."""
        self._suback.clear()
        self.c.subscribe(topic, qos=qos)
        assert self._suback.wait(5), "no SUBACK"
        return self.granted[-1]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        """Publish QoS 1 and return the PUBACK reason code."""
        codes: list[int] = []
        done = threading.Event()

        def on_publish(client: Any, userdata: Any, mid: int, rc: Any, props: Any) -> None:
            codes.append(int(rc.value))
            done.set()

        self.c.on_publish = on_publish
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        assert done.wait(5), "no PUBACK"
        info.wait_for_publish(1)
        return codes[-1]

    def received(self, topic: str) -> list[bytes]:
        with self.lock:
            return [p for t, p, _ in self.messages if t == topic]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@dataclass
class Harness:
    """One database, one broker, an API for set-up, and MQTT service replicas."""

    tmp: Path
    broker: Mosquitto
    engine: Engine
    api: Api
    settings: Settings
    services: list[MqttService] = field(default_factory=list)
    server_port: int | None = None  # the replicas' own listener, on a generated configuration

    def service(self, **overrides: Any) -> MqttService:
        """Start a replica (settings overrides: ``telemetry_subscription``, ...)."""
        settings = self.settings.model_copy(update=overrides) if overrides else self.settings
        svc = MqttService(self.api.sessions, settings, backoff_initial_s=0.05, backoff_max_s=0.3)
        svc.start()
        assert svc.connection.wait_connected(5), svc.connection.last_error
        # Acknowledged by the broker (SUBACK), not merely requested.
        assert wait_until(lambda: len(svc.connection.active_subscriptions) == 4)
        self.services.append(svc)
        return svc

    def publish_model(self, name: str = "m", version: int = 1, **form: Any) -> dict[str, Any]:
        r = upload(self.api, name, onnx_model(seed=version), version=version, **form)
        assert r.status_code == 202, r.text
        run_jobs(self.api)
        v = self.api.get(f"/api/v1/models/{name}/versions/{version}").json()
        assert v["status"] == "published", v
        return dict(v)

    def enroll(self, device: str, *, groups: tuple[str, ...] = (), klass: str = "cam") -> str:
        r = self.api.post(
            "/api/v1/devices",
            role="operator",
            json={"device_id": device, "device_class": klass, "groups": list(groups)},
        )
        assert r.status_code == 201, r.text
        return str(r.json()["mqtt_password"])

    def telemetry_count(self, device: str | None = None) -> int:
        with self.engine.connect() as conn:
            q = select(func.count()).select_from(TelemetryRow)
            if device is not None:
                q = q.where(TelemetryRow.device_id == device)
            return int(conn.execute(q).scalar_one())

    def seqs(self, device: str) -> list[int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(TelemetryRow.seq).where(TelemetryRow.device_id == device)
            ).all()
        return sorted(r[0] for r in rows)

    def close(self) -> None:
        for svc in self.services:
            svc.stop()


def make_harness(
    tmp: Path,
    db_url: str,
    keys: Keys,
    engine: Engine,
    broker_factory: Callable[..., Mosquitto],
    **settings_overrides: Any,
) -> Harness:
    broker = broker_factory()
    settings = make_settings(
        tmp,
        db_url,
        keys,
        mqtt_url=f"mqtt://127.0.0.1:{broker.port}",
        mqtt_client_id=f"edgefleet-server-{uuid.uuid4().hex[:6]}",
        desired_poll_seconds=0.1,
        ingest_batch_seconds=0.05,
        **settings_overrides,
    )
    api = make_api(settings, engine)
    api.client.__enter__()
    return Harness(tmp, broker, engine, api, settings)
