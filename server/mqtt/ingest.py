"""Device messages into the database: telemetry in batches, status and facts.

Flow: the network thread hands every telemetry, status and facts delivery to
``Ingester.submit`` (a queue; no work on the network thread). The ingester
thread takes the first waiting delivery, keeps collecting until it holds
``batch_max`` of them or ``batch_seconds`` have passed, then parses each one
(``parse_payloads``, strict and bounded, with the one wire schema the agent
uses too: ``TelemetryRecord`` / ``StatusMessage`` / ``DeviceFactsMessage``
``.from_bytes``, msgspec in C), checks that
the payload's ``device_id`` is the topic's device, and stores the whole batch
in ONE transaction: ``telemetry.ingest_summaries`` (insert-or-ignore on
``(device_id, seq)``, the device's JSON stored as received),
``fleet.record_status`` and ``fleet.record_facts``. Only after the commit are
the deliveries acknowledged to the broker.

Invariants:

* No acknowledged telemetry is lost: a PUBACK leaves this replica only for a
  record that is committed (or is malformed or names another device, which
  no retry could fix: those are dropped and counted). A replica killed at any
  point leaves the unacknowledged rest in its broker session; the broker
  re-sends it on reconnect, and the dedupe makes that harmless.
* A database outage never drops anything: the batch is retried with backoff
  (not acknowledged meanwhile; the broker's receive maximum bounds what
  waits). The same holds for every store failure that is not the payloads'
  fault: a failover to a read-only server, missing grants, a pool timeout.
* A store failure a payload can cause (``_PAYLOAD_FAULTS``: the database
  refused a value, or a value tripped the code) is narrowed down by storing
  the batch's messages one at a time; only a message that fails alone is
  dropped (logged, counted, acknowledged), so one bad row cannot block the
  others. A message is acknowledged once: those dropped at parse time are not
  retried in the split.
* The transaction is the unit: records, statuses and facts of a batch land
  together or not at all.
* No payload can stop the ingester: a parser failure of any kind costs only
  the message that caused it (logged with its traceback, counted,
  acknowledged).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DataError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from edgefleet.errors import VerificationError
from edgefleet.topics import DeviceChannel, DeviceTopic, TopicError, parse_device_topic
from edgefleet.wire import DeviceFactsMessage, StatusMessage, TelemetryRecord
from server import metrics
from server.mqtt.connection import Delivery
from server.services import fleet, telemetry

__all__ = ["IngestStats", "Ingester", "parse_payloads"]

log = logging.getLogger("edgefleet.server.ingest")

_RETRY_MAX_S = 5.0  # seconds, longest wait between attempts on an unavailable database

# Store failures that a payload can cause: the database refused one of its values,
# or a value tripped the code. Every other failure (an outage, a failover to a
# read-only server, missing grants, a pool timeout) is the environment's.
_PAYLOAD_FAULTS = (DataError, IntegrityError, ValueError, TypeError, ArithmeticError)


@dataclass
class IngestStats:
    """What this ingester did since it started (for logs, tests and the benchmark)."""

    batches: int = 0
    stored: int = 0
    duplicates: int = 0
    statuses: int = 0
    facts: int = 0
    rejected: int = 0
    retries: int = 0
    unacked: int = 0  # commits whose delivery could not be acknowledged (reconnected since)


Parsed = tuple[Any, ...]  # ("telemetry", RecordSummary) | ("status", msg) | ... | ("reject", why)


def parse_payloads(items: Sequence[tuple[str, bytes]]) -> list[Parsed]:
    """Parse and check ``(topic, payload)`` pairs (no database or network access).

    Returns one entry per item: ``("telemetry", RecordSummary)``,
    ``("status", StatusMessage)``, ``("facts", DeviceFactsMessage)``,
    ``("empty",)`` for a cleared retained message, or ``("reject", reason,
    detail)`` with reason ``malformed`` or ``wrong-device``.
    """
    out: list[Parsed] = []
    for topic_text, payload in items:
        try:
            topic = parse_device_topic(topic_text)
            if not payload:
                out.append(("empty",))
                continue
            message: TelemetryRecord | StatusMessage | DeviceFactsMessage
            if topic.channel is DeviceChannel.TELEMETRY:
                message = TelemetryRecord.from_bytes(payload)
            elif topic.channel is DeviceChannel.STATUS:
                message = StatusMessage.from_bytes(payload)
            elif topic.channel is DeviceChannel.FACTS:
                message = DeviceFactsMessage.from_bytes(payload)
            else:
                raise TopicError(f"unexpected channel {topic.channel.value}")
        except (VerificationError, ValueError) as exc:  # TopicError is a ValueError
            out.append(("reject", "malformed", str(exc)[:300]))
            continue
        except Exception as exc:  # a parser bug: drop this message, never the ingester
            log.exception("ingest: parsing a message on %s failed", topic_text)
            out.append(("reject", "malformed", f"the parser failed: {exc!r}"[:300]))
            continue
        if isinstance(message, TelemetryRecord):
            out.append(_telemetry(telemetry.RecordSummary.of(message), topic))
        elif message.device_id != topic.device_id:
            out.append(
                (
                    "reject",
                    "wrong-device",
                    f"payload names {message.device_id!r} on {topic.device_id!r}'s topic",
                )
            )
        elif isinstance(message, StatusMessage):
            out.append(("status", message))
        else:
            out.append(("facts", message))
    return out


def _telemetry(summary: telemetry.RecordSummary, topic: DeviceTopic) -> Parsed:
    if summary.device_id != topic.device_id:
        return (
            "reject",
            "wrong-device",
            f"payload names {summary.device_id!r} on {topic.device_id!r}'s topic",
        )
    return ("telemetry", summary)


@dataclass
class _Batch:
    summaries: list[telemetry.RecordSummary]
    payloads: list[bytes]
    statuses: list[StatusMessage]
    facts: list[DeviceFactsMessage]


class Ingester:
    """Batches device messages into transactions and acknowledges them after commit."""

    def __init__(
        self,
        session_factory: Callable[[], Session],
        ack: Callable[[Delivery], bool],
        *,
        batch_max: int = 500,
        batch_seconds: float = 0.2,
    ) -> None:
        if batch_max < 1 or batch_seconds <= 0:
            raise ValueError("batch_max must be >= 1 and batch_seconds > 0")
        self._sessions = session_factory
        self._ack = ack
        self.batch_max = batch_max
        self.batch_seconds = batch_seconds
        self._queue: queue.SimpleQueue[Delivery] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._rng = random.Random()
        self.stats = IngestStats()

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="edgefleet-ingest", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the batch in hand (stored and acknowledged) and stop."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout_s)
            self._thread = None

    def submit(self, delivery: Delivery) -> None:
        """Queue a delivery (called on the network thread; never blocks)."""
        self._queue.put(delivery)

    def backlog(self) -> int:
        """Deliveries waiting for a batch."""
        return self._queue.qsize()

    # ------------------------------------------------------------------ loop

    def _next_batch(self) -> list[Delivery]:
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.batch_seconds
        while len(batch) < self.batch_max:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            if batch:
                self.process(batch)
        rest: list[Delivery] = []  # what already arrived: store it, so little is re-sent
        while True:
            try:
                rest.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for start in range(0, len(rest), self.batch_max):
            self.process(rest[start : start + self.batch_max])

    # ------------------------------------------------------------ processing

    def _parse(self, batch: Sequence[Delivery]) -> tuple[_Batch, list[Delivery]]:
        results = parse_payloads([(d.topic, d.payload) for d in batch])
        parsed = _Batch([], [], [], [])
        keep: list[Delivery] = []
        channels = Counter(d.topic.rpartition("/")[2] for d in batch)
        for channel, n in channels.items():
            metrics.MQTT_MESSAGES.labels(channel).inc(n)
        for delivery, result in zip(batch, results, strict=True):
            kind = result[0]
            if kind == "reject":
                self._reject(delivery, result[1], result[2])
                continue
            keep.append(delivery)
            if kind == "telemetry":
                parsed.summaries.append(result[1])
                parsed.payloads.append(delivery.payload)
            elif kind == "status":
                parsed.statuses.append(result[1])
            elif kind == "facts":
                parsed.facts.append(result[1])
        return parsed, keep

    def _reject(self, delivery: Delivery, reason: str, why: object) -> None:
        self.stats.rejected += 1
        metrics.TELEMETRY_REJECTED.labels(reason).inc()
        log.warning("ingest: dropped %s (%s): %s", delivery.topic, reason, why)
        self._ack(delivery)  # no retry can fix it: acknowledge so it is not re-sent forever

    def _store(self, parsed: _Batch) -> tuple[int, int]:
        started = time.perf_counter()
        with self._sessions() as session:
            stored, duplicates = telemetry.ingest_summaries(
                session, parsed.summaries, parsed.payloads
            )
            for status in parsed.statuses:
                fleet.record_status(session, status)
            for facts in parsed.facts:
                fleet.record_facts(session, facts)
            session.commit()
        metrics.INGEST_BATCH_SECONDS.observe(time.perf_counter() - started)
        return stored, duplicates

    def process(self, batch: Sequence[Delivery]) -> None:
        """Parse, store in one transaction, then acknowledge ``batch``.

        Retries while the database is unavailable (until ``stop``); never raises.
        """
        parsed, keep = self._parse(batch)  # rejected ones are acknowledged already
        attempt = 0
        while True:
            try:
                stored, duplicates = self._store(parsed)
                break
            except _PAYLOAD_FAULTS as exc:
                if len(keep) == 1:
                    log.warning("ingest: storing %s failed", keep[0].topic, exc_info=True)
                    self._reject(keep[0], "malformed", f"storing it failed: {exc}")
                    return
                log.warning("ingest: batch refused (%s); storing one message at a time", exc)
                for delivery in keep:
                    self.process([delivery])
                return
            except Exception as exc:  # the database or the connection, not the payloads
                self.stats.retries += 1
                if isinstance(exc, (OperationalError, InterfaceError)):
                    log.warning("ingest: database unavailable, batch kept unacknowledged: %s", exc)
                else:
                    log.exception("ingest: storing a batch failed; kept unacknowledged, retrying")
                if self._stop.is_set():
                    return  # not acknowledged: the broker re-sends it to the next session
                self._stop.wait(self._rng.uniform(0, min(_RETRY_MAX_S, 0.1 * 2**attempt)))
                attempt += 1
        self.stats.batches += 1
        self.stats.stored += stored
        self.stats.duplicates += duplicates
        self.stats.statuses += len(parsed.statuses)
        self.stats.facts += len(parsed.facts)
        for delivery in keep:
            if not self._ack(delivery):
                self.stats.unacked += 1
