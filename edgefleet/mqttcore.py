"""The MQTT 5 session core shared by the agent and the server: paho-mqtt 2.x behind a typed wrapper.

``MqttSession`` owns one network thread with an explicit reconnection loop:
open the socket and send CONNECT (MQTT 5, ``clean_start`` false, a session
expiry interval, plus whatever a subclass adds in ``_configure``), pump
``paho.Client.loop()``, and on any failure sleep an exponential backoff with
full jitter before trying again. Callers publish and subscribe from any
thread; incoming messages go to the subclass's ``_deliver`` on the network
thread.

Guarantees:

* Every paho or OS failure is converted here into a ``MqttError`` subclass of
  ``edgefleet.errors.TransportError`` (``raise ... from``); nothing from paho
  escapes. The newest failure is kept in ``last_error``.
* Subscriptions are recorded and re-sent on every successful CONNACK, so they
  survive a broker that lost the session; the filters the broker acknowledged
  on the current connection are in ``active_subscriptions``.
* QoS 1 messages published while disconnected are queued by paho and re-sent
  after reconnecting (same packet id); ``on_ack`` is called exactly once per
  acknowledged publish with the MQTT 5 PUBACK reason code, even when the
  PUBACK races the return of ``publish``.
* A bug in a connect, disconnect, message or ack handler is logged and does
  not kill the network thread.

``agent.mqtt.MqttConnection`` (the device) and
``server.mqtt.connection.BrokerConnection`` (a server replica, with manual
acknowledgements) are the two subclasses; each states only what it adds.
This module lives in the shared package because both sides run it; it
imports nothing outside paho and ``edgefleet`` (paho comes with both the
``agent`` and the ``server`` extra, not with the base install, so nothing in
the base install imports this module).
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.errors import TransportError

__all__ = [
    "PERMANENT_PUBACK_CODES",
    "AckHandler",
    "BrokerUnavailableError",
    "ConnectionRefusedByBrokerError",
    "MqttError",
    "MqttSession",
    "NotAuthorizedError",
    "NotConnectedError",
    "PublishError",
    "PublishResult",
    "SessionOptions",
    "SubscriptionRefusedError",
    "TlsError",
    "TlsHandshakeError",
    "backoff_delay",
]

log = logging.getLogger("edgefleet.mqtt")

# PUBACK reason codes after which re-sending the same message cannot succeed.
PERMANENT_PUBACK_CODES = frozenset(
    {
        0x83,  # implementation specific error
        0x87,  # not authorized
        0x90,  # topic name invalid
        0x95,  # packet too large
        0x99,  # payload format invalid
    }
)
_AUTH_CONNACK_CODES = frozenset({0x86, 0x87, 0x8C})  # bad user/password, not authorized, bad auth


class MqttError(TransportError):
    """Root of the MQTT transport failures (all are ``TransportError``)."""


class BrokerUnavailableError(MqttError):
    """No connection could be opened (refused, unreachable, DNS, timeout)."""


class TlsHandshakeError(BrokerUnavailableError):
    """The TLS handshake failed (untrusted or mismatched broker certificate, protocol)."""


class ConnectionRefusedByBrokerError(MqttError):
    """The broker answered CONNECT with a failure reason code."""


class NotAuthorizedError(ConnectionRefusedByBrokerError):
    """The broker refused the credentials (bad username/password, not authorized)."""


class SubscriptionRefusedError(MqttError):
    """The broker refused a subscription (SUBACK reason code >= 0x80)."""


class TlsError(MqttError):
    """TLS could not be configured (missing/invalid CA, certificate or key file)."""


class NotConnectedError(MqttError):
    """The operation needs a live connection and there is none."""


class PublishError(MqttError):
    """paho refused to queue a publish (queue full, payload too large, bad topic)."""


@dataclass(frozen=True)
class PublishResult:
    """The broker's answer to one QoS>0 publish."""

    mid: int
    reason_code: int  # MQTT 5 PUBACK reason code (0 = success, >= 0x80 failure)
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.reason_code < 0x80

    @property
    def permanent_failure(self) -> bool:
        """True when re-sending the same message cannot succeed."""
        return self.reason_code in PERMANENT_PUBACK_CODES


AckHandler = Callable[[PublishResult], None]


class SessionOptions(Protocol):
    """The connection settings ``MqttSession`` reads (both options classes have them)."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def client_id(self) -> str: ...
    @property
    def username(self) -> str | None: ...
    @property
    def password(self) -> str | None: ...
    @property
    def keepalive_s(self) -> int: ...
    @property
    def session_expiry_s(self) -> int: ...
    @property
    def connect_timeout_s(self) -> float: ...
    @property
    def backoff_initial_s(self) -> float: ...
    @property
    def backoff_max_s(self) -> float: ...
    @property
    def max_queued_messages(self) -> int: ...
    @property
    def max_inflight(self) -> int: ...
    @property
    def loop_timeout_s(self) -> float: ...


OptionsT = TypeVar("OptionsT", bound=SessionOptions)


def _no_op_socket_callback(client: paho.Client, userdata: object, sock: object) -> None:
    return None


def backoff_delay(attempt: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in ``[0, min(max, initial * 2**attempt)]``."""
    ceiling = min(max_s, initial_s * (2 ** min(attempt, 32)))
    return rng.uniform(0.0, ceiling)


class MqttSession(Generic[OptionsT]):
    """One MQTT 5 session to the broker, kept alive by an explicit reconnect loop.

    Subclasses implement ``_deliver`` and may extend ``_configure``.
    """

    _manual_ack: ClassVar[bool] = False  # True: QoS 1 deliveries are PUBACKed by the caller
    _log: ClassVar[logging.Logger] = log

    def __init__(
        self,
        options: OptionsT,
        *,
        on_connect: Callable[[bool], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """Configure the client (nothing is opened until ``start``)."""
        self.options = options
        self._on_connect_cb = on_connect
        self._on_disconnect_cb = on_disconnect
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._stopping = False  # set before a clean DISCONNECT: do not reconnect
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._subscriptions: dict[str, int] = {}
        self._sub_requests: dict[int, list[str]] = {}  # SUBSCRIBE mid -> filters
        self.active_subscriptions: set[str] = set()  # filters the broker acknowledged
        self.refused_subscriptions: list[str] = []  # SUBACK failure reasons so far
        self._pending_acks: dict[int, AckHandler | None] = {}
        self._early_acks: dict[int, PublishResult] = {}
        self.last_error: MqttError | None = None
        self.connects = 0  # successful CONNACKs so far
        self.session_present = False
        self._client = self._make_client()

    # ------------------------------------------------------------------ setup

    def _make_client(self) -> paho.Client:
        o = self.options
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=o.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=self._manual_ack,
        )
        client.max_queued_messages_set(o.max_queued_messages)
        client.max_inflight_messages_set(o.max_inflight)
        client.connect_timeout = o.connect_timeout_s
        if o.username is not None:
            client.username_pw_set(o.username, o.password)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = o.session_expiry_s
        self._configure(client, props)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        client.on_subscribe = self._handle_subscribe
        # With these set, paho's publish()/subscribe()/ack() from other threads
        # only queue the packet and wake select(); the network thread is then
        # the only socket writer (without them paho writes from the caller's
        # thread too, racing our loop on the same stream).
        client.on_socket_register_write = _no_op_socket_callback
        client.on_socket_unregister_write = _no_op_socket_callback
        client.connect_async(
            o.host, o.port, keepalive=o.keepalive_s, clean_start=False, properties=props
        )
        return client

    def _configure(self, client: paho.Client, connect_properties: Properties) -> None:
        """Subclass hook: TLS, last will, extra CONNECT properties."""

    def _deliver(self, msg: paho.MQTTMessage) -> None:
        """Subclass hook: hand one incoming message on (network thread)."""
        raise NotImplementedError

    # -------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the network thread (connects in the background)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._stopping = False
        self._thread = threading.Thread(
            target=self._run, name=f"mqtt-{self.options.client_id}", daemon=True
        )
        self._thread.start()

    def stop(self, *, timeout_s: float = 5.0) -> None:
        """Disconnect cleanly (no last will; the session stays) and stop the network thread."""
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
        """Block until connected (CONNACK received) or ``timeout_s`` passes."""
        return self._connected.wait(timeout_s)

    def drop_connection(self) -> None:
        """Fault injection: cut the TCP connection without DISCONNECT.

        The broker then publishes the last will; the reconnect loop reconnects.
        """
        sock = self._client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]

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
                    self._client.reconnect()  # closes the old socket first
                    socket_open = True
                    opened_at = time.monotonic()
                except ssl.SSLError as exc:
                    self._record(
                        TlsHandshakeError(
                            f"TLS with {self.options.host}:{self.options.port} failed: {exc}"
                        ),
                        exc,
                    )
                    self._stop.wait(self._delay(attempt))
                    attempt += 1
                    continue
                except (OSError, ValueError) as exc:
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
                elif time.monotonic() - opened_at > self.options.connect_timeout_s:
                    self._record(BrokerUnavailableError("no CONNACK within the connect timeout"))
                    rc = MQTTErrorCode.MQTT_ERR_CONN_LOST
                else:
                    continue
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                socket_open = False
                self._connected.clear()
                if self._stop.is_set():
                    break
                self._stop.wait(self._delay(attempt))
                attempt += 1
        # Close the socket if still open (stop without a clean disconnect).
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
        self._log.info("mqtt: %s", error)

    # ------------------------------------------------------------- callbacks

    def _handle_connect(
        self,
        client: paho.Client,
        userdata: object,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            cls = (
                NotAuthorizedError
                if reason_code.value in _AUTH_CONNACK_CODES
                else ConnectionRefusedByBrokerError
            )
            self._record(cls(f"broker refused the connection: {reason_code}"))
            return
        self.session_present = bool(flags.session_present)
        self.connects += 1
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
        o = self.options
        self._log.info(
            "mqtt: connected to %s:%d as %s (session present: %s)",
            o.host,
            o.port,
            o.client_id,
            self.session_present,
        )
        self._call("connect", self._on_connect_cb, self.session_present)

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
        if was:
            self._call("disconnect", self._on_disconnect_cb, str(reason_code))

    def _call(self, what: str, handler: Callable[[Any], None] | None, arg: object) -> None:
        if handler is None:
            return
        try:
            handler(arg)
        except Exception:  # a handler bug must not kill the network thread
            self._log.exception("mqtt: %s handler failed", what)

    def _handle_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        try:
            self._deliver(msg)
        except Exception:  # a handler bug must not kill the network thread
            self._log.exception("mqtt: message handler failed for %s", msg.topic)

    def _handle_publish(
        self,
        client: paho.Client,
        userdata: object,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        result = PublishResult(mid, int(reason_code.value), str(reason_code))
        with self._lock:
            if mid not in self._pending_acks:
                self._early_acks[mid] = result  # the PUBACK beat publish() back to its caller
                return
            handler = self._pending_acks.pop(mid)
        self._call("publish-ack", handler, result)

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
            self._record(
                SubscriptionRefusedError(f"broker refused a subscription: {', '.join(failed)}")
            )

    # ------------------------------------------------------------- operations

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now (if connected) and after every reconnect.

        Raises:
            PublishError: the filter is invalid.
        """
        with self._lock:
            self._subscriptions[topic_filter] = qos
        if self._connected.is_set():
            try:
                _, mid = self._client.subscribe(topic_filter, qos)
            except ValueError as exc:
                raise PublishError(f"invalid subscription {topic_filter!r}: {exc}") from exc
            if mid is not None:
                with self._lock:
                    self._sub_requests[mid] = [topic_filter]

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        on_ack: AckHandler | None = None,
    ) -> int:
        """Queue a message; return its packet id.

        With QoS 1 the message is kept by paho while disconnected (up to
        ``max_queued_messages``) and sent after reconnecting; ``on_ack`` then
        receives the PUBACK result once.

        Raises:
            NotConnectedError: QoS 0 while disconnected (the message is lost).
            PublishError: paho's queue is full, or the topic/payload is invalid.
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
        mid = info.mid
        with self._lock:
            early = self._early_acks.pop(mid, None)
            if early is None:
                self._pending_acks[mid] = on_ack
                return mid
        self._call("publish-ack", on_ack, early)
        return mid

    def pending_acks(self) -> int:
        """QoS>0 publishes not yet acknowledged by the broker."""
        with self._lock:
            return len(self._pending_acks)
