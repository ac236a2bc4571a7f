"""The telemetry publisher: spooled records -> broker; a record leaves the spool only on PUBACK."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from agent.telemetry.spool import Spool

__all__ = ["AckPublisher", "TelemetryPublisher"]

log = logging.getLogger(__name__)


class AckPublisher(Protocol):
    """The slice of ``agent.mqtt.MqttConnection`` the publisher needs."""

    @property
    def connected(self) -> bool: ...

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        on_ack: Callable[[Any], None] | None = None,
    ) -> int: ...


class TelemetryPublisher:
    """Moves spooled records to the broker; a record leaves the spool only on PUBACK."""

    def __init__(
        self,
        spool: Spool,
        publisher: AckPublisher,
        topic: str,
        *,
        max_inflight: int = 8,
        ack_timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spool = spool
        self._publisher = publisher
        self.topic = topic
        self.max_inflight = max_inflight
        self.ack_timeout_s = ack_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._inflight: dict[int, float] = {}
        self.acked = 0
        self.rejected = 0
        self.retried = 0

    def pump(self) -> int:
        """Publish spooled records not already awaiting a PUBACK; return how many.

        Never raises: a transport failure leaves the records spooled.
        """
        if not self._publisher.connected:
            return 0
        now = self._clock()
        sent = 0
        with self._lock:
            for seq, since in list(self._inflight.items()):
                if now - since > self.ack_timeout_s:
                    del self._inflight[seq]  # no PUBACK: send again (the receiver dedupes)
                    self.retried += 1
            candidates = [s for s in self.spool.pending() if s not in self._inflight]
            room = self.max_inflight - len(self._inflight)
        for seq in candidates[: max(0, room)]:
            data = self.spool.read(seq)
            if data is None:
                continue
            with self._lock:
                self._inflight[seq] = now
            try:
                self._publisher.publish(
                    self.topic, data, qos=1, on_ack=functools.partial(self._acked, seq)
                )
            except Exception as exc:  # TransportError from the connection: retry later
                with self._lock:
                    self._inflight.pop(seq, None)
                log.info("telemetry: publish of %d deferred: %s", seq, exc)
                break
            sent += 1
        return sent

    def _acked(self, seq: int, result: Any) -> None:
        with self._lock:
            self._inflight.pop(seq, None)
        if result.ok:
            self.spool.remove(seq)
            self.acked += 1
        elif result.permanent_failure:
            self.spool.remove(seq)
            self.spool.count_rejected()
            self.rejected += 1
            log.warning("telemetry: broker refused record %d for good: %s", seq, result.reason)
        else:
            log.info("telemetry: broker refused record %d for now: %s", seq, result.reason)

    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)
