"""Desired-state publisher: the database's newest signed state of each target, retained.

Flow: a thread wakes every ``desired_poll_seconds`` (or at once when poked
after an assignment, or after every broker connect) and, while connected:

1. re-signs states about to expire (``desired.reissue_due``, once a minute);
2. publishes, retained with QoS 1, the newest row of every target that no
   replica published yet (``desired.unpublished``), or of *every* target after
   a (re)connect and every ``desired_republish_seconds``;
3. marks each row whose PUBACK succeeded as published.

Invariants: only bytes stored by ``desired.assign``/``clear``/``reissue_due``
(signed and checked there) are published; a cleared target gets an empty
retained payload. Re-publishing after every connect means a broker that lost
its retained store (wiped, or restarted without persistence) has every
target's current state again within one poll, without an operator. Several
replicas may publish the same row: the bytes are identical and devices
recognise a byte-identical re-delivery. Were a slow replica to publish an
older row after a newer one, devices refuse it (rollback protection) and the
periodic full re-publish restores the newest retained copy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from edgefleet.errors import EdgefleetError
from server import metrics
from server.errors import ServerError
from server.models import DesiredStateRow
from server.mqtt.connection import BrokerConnection, MqttError, PublishResult
from server.services import desired
from server.settings import Settings

__all__ = ["DesiredPublisher"]

log = logging.getLogger("edgefleet.server.desired")

REISSUE_EVERY_S = 60.0  # seconds between checks for states close to expiry
ACK_TIMEOUT_S = 10.0  # seconds to wait for the broker's PUBACKs of one round


class DesiredPublisher:
    """Keeps every target's retained desired-state topic equal to the database."""

    def __init__(
        self,
        session_factory: Callable[[], Session],
        settings: Settings,
        connection: BrokerConnection,
    ) -> None:
        self._sessions = session_factory
        self._settings = settings
        self._conn = connection
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._republish_all = True
        self._last_full = 0.0
        self._last_reissue = -REISSUE_EVERY_S
        self._published_ids: set[int] = set()
        self._cond = threading.Condition()
        self.rounds = 0

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="edgefleet-desired", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join(timeout_s)
            self._thread = None

    def poke(self) -> None:
        """Publish what is unpublished now instead of at the next poll."""
        self._wake.set()

    def on_connect(self, session_present: bool) -> None:
        """After every CONNACK: re-publish every target (the broker may have lost them)."""
        self._republish_all = True
        self._wake.set()

    def wait_published(self, row_id: int, timeout_s: float) -> bool:
        """Block until this replica saw row ``row_id`` acknowledged, or the timeout passes."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while row_id not in self._published_ids:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._settings.desired_poll_seconds)
            self._wake.clear()
            if self._stop.is_set() or not self._conn.connected:
                continue
            try:
                self.run_once()
            except (SQLAlchemyError, MqttError, ServerError, EdgefleetError) as exc:
                log.warning("desired: round failed, retrying: %s", exc)
            except Exception:
                log.exception("desired: round crashed, retrying")

    def run_once(self) -> int:
        """One round (see the module docstring); return how many rows were acknowledged."""
        now = time.monotonic()
        if now - self._last_reissue >= REISSUE_EVERY_S:
            self._last_reissue = now
            with self._sessions() as session:
                made = desired.reissue_due(session, self._settings)
            if made:
                log.info("desired: re-signed %d state(s) close to expiry", len(made))
        full = self._republish_all or now - self._last_full >= (
            self._settings.desired_republish_seconds
        )
        with self._sessions() as session:
            rows = desired.current_all(session) if full else desired.unpublished(session)
        if full:
            self._republish_all = False
            self._last_full = now
        if not rows:
            self.rounds += 1
            return 0
        acked = self._publish(rows)
        with self._sessions() as session:
            desired.mark_published(session, [r.id for r in acked if r.published_at is None])
            session.commit()
        for row in acked:
            if row.published_at is None:
                metrics.DESIRED_PUBLISHED.labels(row.action).inc()
        with self._cond:
            self._published_ids.update(r.id for r in acked)
            self._cond.notify_all()
        self.rounds += 1
        return len(acked)

    def _publish(self, rows: list[DesiredStateRow]) -> list[DesiredStateRow]:
        results: dict[int, PublishResult] = {}
        done = threading.Event()
        lock = threading.Lock()

        def on_ack(row_id: int) -> Callable[[PublishResult], None]:
            def handler(result: PublishResult) -> None:
                with lock:
                    results[row_id] = result
                    if len(results) == len(rows):
                        done.set()

            return handler

        for row in rows:
            topic = desired.Target.of(row).topic
            self._conn.publish(topic, bytes(row.payload), qos=1, retain=True, on_ack=on_ack(row.id))
        done.wait(ACK_TIMEOUT_S)
        with lock:
            ok = {row_id for row_id, result in results.items() if result.ok}
            failed = {row_id: r.reason_code for row_id, r in results.items() if not r.ok}
        if failed:
            log.warning("desired: the broker refused rows %s", failed)
        return [row for row in rows if row.id in ok]
