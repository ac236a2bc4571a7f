"""The server replica's MQTT session: paho-mqtt 2.x with manual acknowledgements.

Flow: ``BrokerConnection.start()`` runs one network thread that owns an
explicit reconnect loop: open the socket and send CONNECT (MQTT 5,
``clean_start`` false, a session expiry interval, a receive maximum), pump
``paho.Client.loop()``, and after any failure sleep an exponential backoff
with full jitter before trying again. Every CONNACK re-sends the recorded
subscriptions. Each incoming message is handed to ``on_message`` as a
``Delivery`` on the network thread; the handler queues it, and whoever
finishes the work calls ``ack(delivery)``.

Guarantees: those of the shared core, ``edgefleet.mqttcore.MqttSession``
(reconnect loop, error conversion to ``MqttError``, subscriptions re-sent on
every CONNACK, QoS 1 publishes queued while disconnected with exactly one
``on_ack`` each), plus:

* Manual acknowledgement: a QoS 1 message is PUBACKed only when ``ack`` is
  called, i.e. after the ingester committed it. A replica killed before that
  leaves the message in its broker session, and the broker re-sends it on the
  next connect (duplicates are absorbed by the ``(device_id, seq)`` dedupe).
* An ack for a delivery received on an earlier connection is not sent (its
  packet id belongs to that connection): the broker re-sends the message and
  it is acknowledged then.

This module adds the replica's options, manual acknowledgements and
``Delivery``.
"""

from __future__ import annotations

import logging
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, NamedTuple

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties

from edgefleet.mqttcore import (
    AckHandler,
    BrokerUnavailableError,
    MqttError,
    MqttSession,
    NotAuthorizedError,
    NotConnectedError,
    PublishError,
    PublishResult,
    SubscriptionRefusedError,
)

__all__ = [
    "AckHandler",
    "BrokerConnection",
    "BrokerUnavailableError",
    "ConnectionOptions",
    "Delivery",
    "MessageHandler",
    "MqttError",
    "NotAuthorizedError",
    "NotConnectedError",
    "PublishError",
    "PublishResult",
    "SubscriptionRefusedError",
]


@dataclass(frozen=True)
class ConnectionOptions:
    """Connection settings of one replica, bounded."""

    host: str
    port: int = 1883
    client_id: str = "edgefleet-server"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    ca_file: Path | None = None  # None with tls: the system trust store
    keepalive_s: int = 30  # seconds, [5, 3600]
    session_expiry_s: int = 86400  # seconds the broker keeps the session while we are away
    receive_maximum: int = 1000  # unacknowledged QoS 1 messages the broker may send us
    connect_timeout_s: float = 10.0  # seconds for the socket and the CONNACK
    backoff_initial_s: float = 0.2  # seconds, first reconnect delay ceiling
    backoff_max_s: float = 10.0  # seconds, largest reconnect delay ceiling
    max_queued_messages: int = 10_000  # our QoS 1 publishes paho holds while disconnected
    max_inflight: int = 100  # our unacknowledged publishes on the wire
    loop_timeout_s: float = 0.1  # seconds one network-loop iteration may block

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("ConnectionOptions.host is required")
        if not 1 <= self.port <= 65535:
            raise ValueError("ConnectionOptions.port must be in [1, 65535]")
        if not 1 <= len(self.client_id) <= 128:
            raise ValueError("ConnectionOptions.client_id must be 1-128 characters")
        if not 5 <= self.keepalive_s <= 3600:
            raise ValueError("ConnectionOptions.keepalive_s must be in [5, 3600] seconds")
        if not 1 <= self.receive_maximum <= 65535:
            raise ValueError("ConnectionOptions.receive_maximum must be in [1, 65535]")
        if not 0.01 <= self.backoff_initial_s <= self.backoff_max_s <= 3600:
            raise ValueError("backoff must satisfy 0.01 <= initial <= max <= 3600 s")


class Delivery(NamedTuple):
    """One received message and what is needed to acknowledge it.

    A named tuple: one is built per message on the network thread, where a
    frozen dataclass's ``__init__`` was a measurable share of the cost.
    """

    topic: str
    payload: bytes
    retained: bool
    qos: int
    mid: int
    generation: int  # connection number it arrived on


MessageHandler = Callable[[Delivery], None]


class BrokerConnection(MqttSession[ConnectionOptions]):
    """One persistent MQTT 5 session with manual acknowledgements of QoS 1 deliveries."""

    _manual_ack: ClassVar[bool] = True
    _log: ClassVar[logging.Logger] = logging.getLogger("edgefleet.server.mqtt")

    def __init__(
        self,
        options: ConnectionOptions,
        *,
        on_message: MessageHandler,
        on_connect: Callable[[bool], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """Configure the client; nothing is opened until ``start``.

        Raises:
            BrokerUnavailableError: TLS is asked for and cannot be configured.
        """
        self._on_delivery = on_message
        super().__init__(
            options,
            on_connect=on_connect,
            on_disconnect=None if on_disconnect is None else (lambda _reason: on_disconnect()),
            rng=rng,
        )

    @property
    def generation(self) -> int:
        """The connection number: incremented on every CONNACK."""
        return self.connects

    def _configure(self, client: paho.Client, connect_properties: Properties) -> None:
        o = self.options
        if o.tls:
            try:
                client.tls_set(
                    ca_certs=str(o.ca_file) if o.ca_file else None, cert_reqs=ssl.CERT_REQUIRED
                )
            except (OSError, ValueError) as exc:
                raise BrokerUnavailableError(f"cannot configure TLS: {exc}") from exc
        connect_properties.ReceiveMaximum = o.receive_maximum

    def _deliver(self, msg: paho.MQTTMessage) -> None:
        self._on_delivery(
            Delivery(
                msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos, msg.mid, self.generation
            )
        )

    def ack(self, delivery: Delivery) -> bool:
        """Acknowledge a QoS 1 delivery; return False when it cannot be (reconnected since).

        A message that is not acknowledged is re-sent by the broker after the
        next connect.
        """
        if delivery.qos == 0:
            return True
        if delivery.generation != self.generation or not self._connected.is_set():
            return False
        rc = self._client.ack(delivery.mid, delivery.qos)
        return rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def pending_publishes(self) -> int:
        """Our QoS 1 publishes not yet acknowledged by the broker."""
        return self.pending_acks()
