"""The MQTT side of one server replica: ingest, chunk service, desired-state publisher.

Flow: ``MqttService(session_factory, settings)`` opens one persistent broker
session (``BrokerConnection``: MQTT 5, ``clean_start`` false, session expiry
``mqtt_session_expiry_seconds``, manual acknowledgements) under the
replica's stable client id, subscribes, and routes every delivery by its
parsed topic:

=====================  =========================================  ===========
channel                subscription                               handled by
=====================  =========================================  ===========
``telemetry``          ``devices/+/telemetry`` (exclusive), or    ``Ingester``
                       ``$share/<prefix>-ingest-<s>/...`` (shared)
``status``, ``facts``  ``devices/+/status``, ``devices/+/facts``  ``Ingester``
                       (never shared: they are retained)
``chunks/req``         ``$share/<prefix>-chunks-<s>/...``, QoS 0  ``ChunkServer``
=====================  =========================================  ===========

``<s>`` is ``Settings.broker_secret``: Mosquitto grants any SUBSCRIBE and
checks its ACL only at delivery, so a device that joined a guessable share
group would be handed (and then denied) a share of other devices' requests;
a group name only the replicas can compute keeps devices out of it.

``DesiredPublisher`` keeps the retained desired-state topics equal to the
database. ``start`` and ``stop`` run and end all of it; ``stop`` stores and
acknowledges the batch in hand first.

Invariants: the process holds no state the database and bundle storage do
not (queues only hold unacknowledged messages, which the broker re-sends to
this client id after a crash). Telemetry, status and facts are acknowledged
only after their transaction committed. Chunk requests are subscribed with
QoS 0: a request lost while the replica is down costs the device one
re-request, and no stale requests pile up in the session. The subscription
mode is ``telemetry_subscription`` (docs/server.md explains the Mosquitto
caveat that makes ``exclusive`` the safe default).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from edgefleet.topics import DeviceChannel, TopicError, all_devices, parse_device_topic, shared
from server import metrics
from server.mqtt.chunks import ChunkServer
from server.mqtt.connection import BrokerConnection, ConnectionOptions, Delivery
from server.mqtt.ingest import Ingester
from server.settings import Settings
from server.workers.desired import DesiredPublisher

__all__ = ["MqttService", "connection_options", "subscriptions"]

log = logging.getLogger("edgefleet.server.mqtt")


def connection_options(settings: Settings, **overrides: Any) -> ConnectionOptions:
    """The broker connection of this replica, from its settings.

    Raises:
        ConfigError: no ``mqtt_url``.
    """
    host, port, tls = settings.mqtt_address
    values: dict[str, Any] = {
        "host": host,
        "port": port,
        "tls": tls,
        "ca_file": settings.mqtt_ca_file,
        "client_id": settings.effective_mqtt_client_id,
        "username": settings.mqtt_username if settings.mqtt_password else None,
        "password": settings.mqtt_password.get_secret_value() if settings.mqtt_password else None,
        "session_expiry_s": settings.mqtt_session_expiry_seconds,
        "receive_maximum": settings.mqtt_receive_maximum,
    }
    values.update(overrides)
    return ConnectionOptions(**values)


def subscriptions(settings: Settings) -> list[tuple[str, int]]:
    """``(filter, qos)`` of every subscription a replica holds."""
    telemetry = all_devices(DeviceChannel.TELEMETRY)
    if settings.telemetry_subscription == "shared":
        telemetry = shared(settings.ingest_share_group, telemetry)
    chunks = shared(settings.chunk_share_group, all_devices(DeviceChannel.CHUNK_REQUEST))
    return [
        (str(telemetry), 1),
        (str(all_devices(DeviceChannel.STATUS)), 1),
        (str(all_devices(DeviceChannel.FACTS)), 1),
        (str(chunks), 0),
    ]


class MqttService:
    """Everything one replica does over MQTT."""

    def __init__(
        self,
        session_factory: Callable[[], Session],
        settings: Settings,
        **connection_overrides: Any,
    ) -> None:
        """Build the parts (nothing connects until ``start``).

        Args:
            session_factory: sessions on the replica's database.
            settings: the replica's settings (``mqtt_url`` must be set).
            **connection_overrides: ``ConnectionOptions`` fields (tests).

        Raises:
            ConfigError: no broker configured.
        """
        self.settings = settings
        self._sessions = session_factory
        self.connection = BrokerConnection(
            connection_options(settings, **connection_overrides),
            on_message=self._route,
            on_connect=self._on_connect,
            on_disconnect=lambda: metrics.MQTT_CONNECTED.set(0),
        )
        self.ingester = Ingester(
            session_factory,
            self.connection.ack,
            batch_max=settings.ingest_batch_max,
            batch_seconds=settings.ingest_batch_seconds,
        )
        self.chunks = ChunkServer(
            session_factory,
            settings.bundles_dir,
            lambda topic, payload: self.connection.publish(topic, payload, qos=1),
            lambda: self.connection.connected,
            rate_bytes_per_s=settings.chunk_rate_bytes_per_second,
            max_pending_blocks=settings.chunk_max_pending_blocks,
            inflight=self.connection.pending_publishes,
        )
        self.publisher = DesiredPublisher(session_factory, settings, self.connection)
        for topic_filter, qos in subscriptions(settings):
            self.connection.subscribe(topic_filter, qos)

    def _on_connect(self, session_present: bool) -> None:
        metrics.MQTT_CONNECTED.set(1)
        self.publisher.on_connect(session_present)

    def _route(self, delivery: Delivery) -> None:
        try:
            topic = parse_device_topic(delivery.topic)  # memoized: the network thread
        except TopicError:
            log.info("mqtt: ignored a message on %s", delivery.topic)
            self.connection.ack(delivery)
            return
        if topic.channel is DeviceChannel.CHUNK_REQUEST:
            self.chunks.submit(delivery)
            self.connection.ack(delivery)
        elif topic.channel in (DeviceChannel.TELEMETRY, DeviceChannel.STATUS, DeviceChannel.FACTS):
            self.ingester.submit(delivery)
        else:
            self.connection.ack(delivery)

    def start(self) -> None:
        """Start the ingester, chunk service and publisher, then connect."""
        self.ingester.start()
        self.chunks.start()
        self.publisher.start()
        self.connection.start()
        log.info(
            "mqtt service started: client id %s, telemetry subscription %s",
            self.connection.options.client_id,
            self.settings.telemetry_subscription,
        )

    def stop(self) -> None:
        """Store and acknowledge the batch in hand, then disconnect (the session stays)."""
        self.publisher.stop()
        self.chunks.stop()
        self.ingester.stop()
        self.connection.stop()
        metrics.MQTT_CONNECTED.set(0)

    def poke(self) -> None:
        """Publish newly stored desired states now."""
        self.publisher.poke()

    def status(self) -> dict[str, Any]:
        """A summary for health checks and logs."""
        conn = self.connection
        return {
            "connected": conn.connected,
            "client_id": conn.options.client_id,
            "telemetry_subscription": self.settings.telemetry_subscription,
            "last_error": str(conn.last_error) if conn.last_error else None,
            "ingest": vars(self.ingester.stats).copy(),
            "ingest_backlog": self.ingester.backlog(),
            "chunks": vars(self.chunks.stats).copy(),
        }
