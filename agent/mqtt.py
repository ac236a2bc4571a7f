"""The agent's MQTT connection: paho-mqtt 2.x behind a small, typed wrapper.

Flow: ``MqttConnection.start()`` runs one network thread that owns an explicit
reconnection loop: open the socket and send CONNECT (MQTT 5, ``clean_start``
false, a session expiry interval, the retained ``offline`` last will), pump
``paho.Client.loop()``, and on any failure sleep an exponential backoff with
full jitter before trying again. Callers publish from any thread; incoming
messages and PUBACKs are handed to the callbacks given at construction, on the
network thread (handlers must be quick: the daemon queues the work).

Guarantees: those of the shared core, ``edgefleet.mqttcore.MqttSession``
(reconnect loop with full-jitter backoff, every paho/OS failure converted to
``MqttError``, subscriptions re-sent on every CONNACK, QoS 1 publishes queued
while disconnected with exactly one ``on_ack`` each, handler bugs contained),
plus: the broker keeps the session (subscriptions, queued QoS 1 messages)
for ``session_expiry_s`` while the agent is away, including across broker
restarts when the broker persists sessions. This module adds the device's
options (TLS with client certificates, the last will) and its message
handler.
"""

from __future__ import annotations

import logging
import random
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import paho.mqtt.client as paho
from paho.mqtt.properties import Properties

from edgefleet.mqttcore import (
    PERMANENT_PUBACK_CODES,
    AckHandler,
    BrokerUnavailableError,
    ConnectionRefusedByBrokerError,
    MqttError,
    MqttSession,
    NotAuthorizedError,
    NotConnectedError,
    PublishError,
    PublishResult,
    SubscriptionRefusedError,
    TlsError,
    TlsHandshakeError,
    backoff_delay,
)

__all__ = [
    "PERMANENT_PUBACK_CODES",
    "AckHandler",
    "BrokerUnavailableError",
    "ConnectionRefusedByBrokerError",
    "MessageHandler",
    "MqttConnection",
    "MqttError",
    "MqttOptions",
    "NotAuthorizedError",
    "NotConnectedError",
    "PublishError",
    "PublishResult",
    "SubscriptionRefusedError",
    "TlsError",
    "TlsHandshakeError",
    "TlsOptions",
    "Will",
    "backoff_delay",
]


@dataclass(frozen=True)
class TlsOptions:
    """TLS to the broker (server authentication; client certificate optional)."""

    ca_file: Path | None = None  # None: the system trust store
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure_skip_hostname: bool = False  # only for test brokers with IP-address certs


@dataclass(frozen=True)
class Will:
    """The message the broker publishes for us when the connection dies uncleanly."""

    topic: str
    payload: bytes
    retain: bool = True
    qos: int = 1


@dataclass(frozen=True)
class MqttOptions:
    """Connection settings, bounded."""

    host: str
    port: int = 1883
    client_id: str = ""
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: TlsOptions | None = None
    keepalive_s: int = 30  # seconds between PINGREQs when idle, [5, 3600]
    session_expiry_s: int = 7 * 86400  # seconds the broker keeps our session while away
    connect_timeout_s: float = 10.0  # seconds for TCP/TLS connect and for the CONNACK
    backoff_initial_s: float = 0.5  # seconds, first reconnect delay ceiling
    backoff_max_s: float = 60.0  # seconds, largest reconnect delay ceiling
    max_queued_messages: int = 1000  # QoS>0 messages paho holds while disconnected
    max_inflight: int = 20  # unacknowledged QoS>0 messages on the wire
    loop_timeout_s: float = 0.25  # seconds one network-loop iteration may block
    will: Will | None = None

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("MqttOptions.host is required")
        if not 1 <= self.port <= 65535:
            raise ValueError("MqttOptions.port must be in [1, 65535]")
        if not self.client_id or len(self.client_id) > 128:
            raise ValueError("MqttOptions.client_id must be 1-128 characters")
        if not 5 <= self.keepalive_s <= 3600:
            raise ValueError("MqttOptions.keepalive_s must be in [5, 3600] seconds")
        if not 0 <= self.session_expiry_s <= 0xFFFFFFFF:
            raise ValueError("MqttOptions.session_expiry_s must fit in 32 bits")
        if not 0.1 <= self.connect_timeout_s <= 300:
            raise ValueError("MqttOptions.connect_timeout_s must be in [0.1, 300] seconds")
        if not 0.01 <= self.backoff_initial_s <= self.backoff_max_s <= 3600:
            raise ValueError("MqttOptions backoff must satisfy 0.01 <= initial <= max <= 3600 s")
        if not 1 <= self.max_queued_messages <= 100_000:
            raise ValueError("MqttOptions.max_queued_messages must be in [1, 100000]")
        if not 1 <= self.max_inflight <= 65535:
            raise ValueError("MqttOptions.max_inflight must be in [1, 65535]")
        if not 0.01 <= self.loop_timeout_s <= 5:
            raise ValueError("MqttOptions.loop_timeout_s must be in [0.01, 5] seconds")


MessageHandler = Callable[[str, bytes, bool], None]  # topic, payload, retained


class MqttConnection(MqttSession[MqttOptions]):
    """One MQTT 5 session to the broker, kept alive by an explicit reconnect loop."""

    _log: ClassVar[logging.Logger] = logging.getLogger("agent.mqtt")

    def __init__(
        self,
        options: MqttOptions,
        *,
        on_message: MessageHandler | None = None,
        on_connect: Callable[[bool], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """Configure the client (nothing is opened until ``start``).

        Raises:
            TlsError: the TLS files cannot be loaded.
            PublishError: the last will is invalid.
        """
        self._on_message = on_message
        super().__init__(options, on_connect=on_connect, on_disconnect=on_disconnect, rng=rng)

    def _configure(self, client: paho.Client, connect_properties: Properties) -> None:
        o = self.options
        if o.tls is not None:
            try:
                client.tls_set(
                    ca_certs=str(o.tls.ca_file) if o.tls.ca_file else None,
                    certfile=str(o.tls.cert_file) if o.tls.cert_file else None,
                    keyfile=str(o.tls.key_file) if o.tls.key_file else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
                client.tls_insecure_set(o.tls.insecure_skip_hostname)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise TlsError(f"cannot configure TLS: {exc}") from exc
        if o.will is not None:
            try:
                client.will_set(o.will.topic, o.will.payload, qos=o.will.qos, retain=o.will.retain)
            except ValueError as exc:
                raise PublishError(f"invalid last will: {exc}") from exc

    def _deliver(self, msg: paho.MQTTMessage) -> None:
        if self._on_message is not None:
            self._on_message(msg.topic, bytes(msg.payload), bool(msg.retain))
