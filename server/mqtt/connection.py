"""The server replica's MQTT session: paho-mqtt 2.x with manual acknowledgements.

Flow: ``BrokerConnection.start()`` runs one network thread that owns an
explicit reconnect loop: open the socket and send CONNECT (MQTT 5,
``clean_start`` false, a session expiry interval, a receive maximum), pump
``paho.Client.loop()``, and after any failure sleep an exponential backoff
with full jitter before trying again. Every CONNACK re-sends the recorded
subscriptions. Each incoming message is handed to ``on_message`` as a
``Delivery`` on the network thread; the handler queues it, and whoever
finishes the work calls ``ack(delivery)``.

Guarantees:

* Manual acknowledgement: a QoS 1 message is PUBACKed only when ``ack`` is
  called, i.e. after the ingester committed it. A replica killed before that
  leaves the message in its broker session, and the broker re-sends it on the
  next connect (duplicates are absorbed by the ``(device_id, seq)`` dedupe).
* An ack for a delivery received on an earlier connection is not sent (its
  packet id belongs to that connection): the broker re-sends the message and
  it is acknowledged then.
* Every paho or OS failure is converted here into an ``MqttError`` subclass of
  ``edgefleet.errors.TransportError`` (``raise ... from``); nothing from paho
  escapes. The newest failure is kept in ``last_error``.
* QoS 1 publishes made while disconnected are kept by paho (up to
  ``max_queued_messages``) and sent after reconnecting; ``on_ack`` receives
  the PUBACK reason code exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.errors import TransportError

__all__ = [
    "BrokerConnection",
    "BrokerUnavailableError",
    "ConnectionOptions",
    "Delivery",
    "MqttError",
    "NotAuthorizedError",
    "NotConnectedError",
    "PublishError",
    "PublishResult",
    "SubscriptionRefusedError",
]

log = logging.getLogger("edgefleet.server.mqtt")

_AUTH_CONNACK_CODES = frozenset({0x86, 0x87, 0x8C})


class MqttError(TransportError):
    """Root of the server's MQTT transport failures."""


class BrokerUnavailableError(MqttError):
    """No connection could be opened (refused, unreachable, TLS, timeout)."""


class NotAuthorizedError(MqttError):
    """The broker refused the replica's credentials."""


class SubscriptionRefusedError(MqttError):
    """The broker refused a subscription (SUBACK reason code >= 0x80)."""


class NotConnectedError(MqttError):
    """The operation needs a live connection and there is none."""


class PublishError(MqttError):
    """paho refused to queue a publish (queue full, bad topic, payload too large)."""


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


@dataclass(frozen=True)
class Delivery:
    """One received message and what is needed to acknowledge it."""

    topic: str
    payload: bytes
    retained: bool
    qos: int
    mid: int
    generation: int  # connection number it arrived on


@dataclass(frozen=True)
class PublishResult:
    """The broker's answer to one QoS 1 publish."""

    mid: int
    reason_code: int

    @property
    def ok(self) -> bool:
        return self.reason_code < 0x80


MessageHandler = Callable[[Delivery], None]
AckHandler = Callable[[PublishResult], None]


def backoff_delay(attempt: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in ``[0, min(max, initial * 2**attempt)]``."""
    return rng.uniform(0.0, min(max_s, initial_s * (2 ** min(attempt, 32))))


def _no_socket_callback(client: paho.Client, userdata: object, sock: object) -> None:
    return None


class BrokerConnection:
    """One persistent MQTT 5 session, kept alive by an explicit reconnect loop."""

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
        self.options = options
        self._on_message = on_message
        self._on_connect_cb = on_connect
        self._on_disconnect_cb = on_disconnect
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._stopping = False
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._subscriptions: dict[str, int] = {}
        self._pending_acks: dict[int, AckHandler | None] = {}
        self._early_acks: dict[int, PublishResult] = {}
        self.generation = 0  # incremented on every CONNACK
        self.last_error: MqttError | None = None
        self.refused_subscriptions: list[str] = []
        self._sub_requests: dict[int, list[str]] = {}  # SUBSCRIBE mid -> filters
        self.active_subscriptions: set[str] = set()  # filters the broker acknowledged
        self.session_present = False
        self._client = self._make_client()

    def _make_client(self) -> paho.Client:
        o = self.options
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=o.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=True,
        )
        client.max_queued_messages_set(o.max_queued_messages)
        client.max_inflight_messages_set(o.max_inflight)
        client.connect_timeout = o.connect_timeout_s
        if o.username is not None:
            client.username_pw_set(o.username, o.password)
        if o.tls:
            try:
                client.tls_set(
                    ca_certs=str(o.ca_file) if o.ca_file else None, cert_reqs=ssl.CERT_REQUIRED
                )
            except (OSError, ValueError) as exc:
                raise BrokerUnavailableError(f"cannot configure TLS: {exc}") from exc
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        # Publishes and acks from other threads only queue packets; the network
        # thread is then the only socket writer.
        client.on_socket_register_write = _no_socket_callback
        client.on_socket_unregister_write = _no_socket_callback
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = o.session_expiry_s
        props.ReceiveMaximum = o.receive_maximum
        client.connect_async(
            o.host, o.port, keepalive=o.keepalive_s, clean_start=False, properties=props
        )
        return client

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the network thread (it connects in the background)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, name=f"mqtt-{self.options.client_id}", daemon=True
        )
        self._thread.start()

    def stop(self, *, timeout_s: float = 5.0) -> None:
        """Send DISCONNECT (the session stays on the broker) and stop the thread."""
        if self._thread is None:
            return
        self._stopping = True
        if self._connected.is_set():
            self._client.disconnect()
            deadline = time.monotonic() + min(timeout_s, 2.0)
            while self._connected.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
        self._stop.set()
        self._thread.join(timeout_s)
        self._thread = None
        self._connected.clear()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout_s: float) -> bool:
        """Block until a CONNACK arrived or ``timeout_s`` passed."""
        return self._connected.wait(timeout_s)

    def _run(self) -> None:
        attempt = 0
        socket_open = False
        opened_at = 0.0
        while not self._stop.is_set():
            if not socket_open:
                if self._stopping:
                    self._stop.wait(0.05)
                    continue
                try:
                    self._client.reconnect()
                    socket_open, opened_at = True, time.monotonic()
                except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                    self._record(
                        BrokerUnavailableError(
                            f"cannot reach broker {self.options.host}:{self.options.port}: {exc}"
                        ),
                        exc,
                    )
                    self._stop.wait(self._delay(attempt))
                    attempt += 1
                    continue
            try:
                rc = self._client.loop(timeout=self.options.loop_timeout_s)
            except (OSError, ValueError) as exc:
                self._record(MqttError(f"network loop failed: {exc}"), exc)
                rc = MQTTErrorCode.MQTT_ERR_CONN_LOST
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                if self._connected.is_set():
                    attempt = 0
                    continue
                if time.monotonic() - opened_at <= self.options.connect_timeout_s:
                    continue
                self._record(BrokerUnavailableError("no CONNACK within the connect timeout"))
            socket_open = False  # reconnect() closes the old socket
            self._connected.clear()
            if self._stop.is_set():
                break
            self._stop.wait(self._delay(attempt))
            attempt += 1
        with contextlib.suppress(OSError, ValueError):
            self._client.loop(timeout=0.01)
        sock = self._client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _delay(self, attempt: int) -> float:
        o = self.options
        return backoff_delay(attempt, o.backoff_initial_s, o.backoff_max_s, self._rng)

    def _record(self, error: MqttError, cause: BaseException | None = None) -> None:
        if cause is not None:
            error.__cause__ = cause
        self.last_error = error
        log.info("mqtt: %s", error)

    # -------------------------------------------------------------- callbacks

    def _handle_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            cls = NotAuthorizedError if reason_code.value in _AUTH_CONNACK_CODES else MqttError
            self._record(cls(f"broker refused the connection: {reason_code}"))
            return
        self.session_present = bool(flags.session_present)
        self.generation += 1
        self.last_error = None
        with self._lock:
            subs = list(self._subscriptions.items())
            self.active_subscriptions = set()
        if subs:
            _, mid = client.subscribe([(topic, qos) for topic, qos in subs])
            if mid is not None:
                with self._lock:
                    self._sub_requests[mid] = [topic for topic, _ in subs]
        self._connected.set()
        log.info(
            "mqtt: connected to %s:%d as %s (session present: %s)",
            self.options.host,
            self.options.port,
            self.options.client_id,
            self.session_present,
        )
        if self._on_connect_cb is not None:
            try:
                self._on_connect_cb(self.session_present)
            except Exception:
                log.exception("mqtt: connect handler failed")

    def _handle_disconnect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was and self._on_disconnect_cb is not None:
            try:
                self._on_disconnect_cb()
            except Exception:
                log.exception("mqtt: disconnect handler failed")

    def _handle_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        delivery = Delivery(
            msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos, msg.mid, self.generation
        )
        try:
            self._on_message(delivery)
        except Exception:  # a handler bug must not kill the network thread
            log.exception("mqtt: message handler failed for %s", msg.topic)

    def _handle_publish(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        result = PublishResult(mid, int(reason_code.value))
        with self._lock:
            if mid not in self._pending_acks:
                self._early_acks[mid] = result  # the PUBACK beat publish() back to its caller
                return
            handler = self._pending_acks.pop(mid)
        self._deliver_ack(handler, result)

    def _handle_subscribe(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._lock:
            filters = self._sub_requests.pop(mid, [])
            self.active_subscriptions.update(
                f for f, rc in zip(filters, reason_codes, strict=False) if not rc.is_failure
            )
        failed = [str(rc) for rc in reason_codes if rc.is_failure]
        if failed:
            self.refused_subscriptions.extend(failed)
            self._record(SubscriptionRefusedError(f"broker refused a subscription: {failed}"))

    @staticmethod
    def _deliver_ack(handler: AckHandler | None, result: PublishResult) -> None:
        if handler is None:
            return
        try:
            handler(result)
        except Exception:
            log.exception("mqtt: publish-ack handler failed")

    # ------------------------------------------------------------- operations

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now (when connected) and after every reconnect.

        Raises:
            PublishError: paho refused the filter.
        """
        with self._lock:
            self._subscriptions[topic_filter] = qos
        if self._connected.is_set():
            try:
                _, mid = self._client.subscribe(topic_filter, qos)
                if mid is not None:
                    with self._lock:
                        self._sub_requests[mid] = [topic_filter]
            except ValueError as exc:
                raise PublishError(f"invalid subscription {topic_filter!r}: {exc}") from exc

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

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        on_ack: AckHandler | None = None,
    ) -> int:
        """Queue a message and return its packet id.

        Raises:
            NotConnectedError: QoS 0 while disconnected (the message is lost).
            PublishError: paho's queue is full, or the topic or payload is invalid.
        """
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as exc:
            raise PublishError(f"cannot publish to {topic!r}: {exc}") from exc
        rc = info.rc
        if rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise PublishError(f"publish queue is full ({self.options.max_queued_messages})")
        if rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos == 0:
            raise NotConnectedError(f"not connected: QoS 0 message to {topic!r} dropped")
        if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise PublishError(f"publish to {topic!r} failed: {paho.error_string(rc)}")
        with self._lock:
            early = self._early_acks.pop(info.mid, None)
            if early is None:
                self._pending_acks[info.mid] = on_ack
                return info.mid
        self._deliver_ack(on_ack, early)
        return info.mid

    def pending_publishes(self) -> int:
        """Our QoS 1 publishes not yet acknowledged by the broker."""
        with self._lock:
            return len(self._pending_acks)
