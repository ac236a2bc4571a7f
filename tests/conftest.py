"""Suite-wide fixtures: a real Mosquitto broker per test (see tests/mosquitto.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.mosquitto import Mosquitto


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Start brokers with custom settings (users, ACL); all are stopped at teardown."""
    brokers: list[Mosquitto] = []

    def make(
        *,
        users: Mapping[str, str] | None = None,
        acl: str | None = None,
        name: str = "broker",
        **kw: Any,
    ) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"{name}-{len(brokers)}", users=users, acl=acl, **kw)
        brokers.append(broker)
        broker.start()
        return broker

    yield make
    for broker in brokers:
        broker.kill()


@pytest.fixture
def mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    """An anonymous broker with persistence, on a free port."""
    return mosquitto_factory()


class ChunkService:
    """The server half of the chunk protocol on a real broker (what issue 5 builds).

    Subscribes to every device's ``chunks/req`` through a shared subscription,
    answers with ``edgefleet.chunks.ChunkResponder`` over the registered files,
    and publishes each frame (QoS 1) to the requesting device's ``chunks/data``.
    """

    def __init__(self, broker: Mosquitto, bundles: dict[str, Path], client_id: str) -> None:
        from agent.mqtt import MqttConnection, MqttOptions
        from edgefleet.chunks import ChunkResponder, FileBlockSource
        from edgefleet.topics import DeviceChannel, all_devices, shared

        self.bundles = bundles
        self.requests: list[tuple[str, Any]] = []
        self.responder = ChunkResponder(
            lambda bid: FileBlockSource(bundles[bid]) if bid in bundles else None
        )
        self.conn = MqttConnection(
            MqttOptions(
                host=broker.host,
                port=broker.port,
                client_id=client_id,
                backoff_initial_s=0.05,
                backoff_max_s=0.3,
                max_queued_messages=10_000,
            ),
            on_message=self._on_message,
        )
        self.conn.subscribe(str(shared("chunks", all_devices(DeviceChannel.CHUNK_REQUEST))))
        self.conn.start()
        assert self.conn.wait_connected(5), self.conn.last_error

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        from edgefleet.topics import DeviceTopic, parse
        from edgefleet.wire import ChunkRequest

        target = parse(topic)
        assert isinstance(target, DeviceTopic)
        request = ChunkRequest.from_bytes(payload)
        self.requests.append((target.device_id, request))
        out = str(DeviceTopic.chunk_data(target.device_id))
        for frame in self.responder.respond(request):
            self.conn.publish(out, frame.to_bytes(), qos=1)

    def stop(self) -> None:
        self.conn.stop(timeout_s=2)


@pytest.fixture
def chunk_service() -> Iterator[Callable[..., ChunkService]]:
    """Start chunk services on a broker: ``chunk_service(broker, {bundle_id: path})``."""
    services: list[ChunkService] = []

    def make(broker: Mosquitto, bundles: dict[str, Path]) -> ChunkService:
        service = ChunkService(broker, bundles, f"chunk-service-{len(services)}")
        services.append(service)
        return service

    yield make
    for service in services:
        service.stop()
