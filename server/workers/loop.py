"""A long-running loop that at most one replica runs at a time, under a named lease.

Flow of ``LeasedLoop``: every ``poll_s`` the thread tries to ``acquire`` (or
extend) its lease; while it holds it, it calls ``step(held)`` whenever
``interval_s`` has passed since its last step, and renews the lease every
``ttl/3``. ``step`` must fence its writes with ``lease.fence(session, held)``
in the transaction that makes them. When a step raises ``LeaseLostError`` or
a renewal finds the lease taken over, the loop drops it and goes back to
trying to acquire. ``stop`` releases the lease so another replica takes over
at once instead of after the TTL.

Invariant: two replicas never run ``step`` under one epoch; a step of a stale
holder commits nothing (the fence). The loop never dies of an exception: it
logs it and retries at the next poll.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from sqlalchemy.orm import Session

from server.workers.lease import HeldLease, LeaseLostError, acquire, release, renew

__all__ = ["LeasedLoop", "utcnow"]

log = logging.getLogger("edgefleet.server.workers")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class LeasedLoop:
    """Runs ``step`` every ``interval_s`` on the one replica holding lease ``name``.

    Args:
        name: the lease (one per kind of work, e.g. ``"retention"``).
        holder: this replica's name in the lease.
        session_factory: sessions on the shared database.
        step: the work; gets the held lease to fence its writes with.
        interval_s: seconds between steps on the holder.
        ttl_s: lease lifetime without renewal (> 3 x the renewal period).
        poll_s: seconds between acquisition attempts and renewals, at most ttl/3.
        clock: aware UTC now (tests).
    """

    def __init__(
        self,
        name: str,
        holder: str,
        session_factory: Callable[[], Session],
        step: Callable[[HeldLease], None],
        *,
        interval_s: float,
        ttl_s: float = 30.0,
        poll_s: float | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        if not 0 < interval_s <= 7 * 86400:
            raise ValueError(f"interval_s={interval_s} must be in (0, 604800]")
        if not 1 <= ttl_s <= 3600:
            raise ValueError(f"ttl_s={ttl_s} must be in [1, 3600]")
        self.name = name
        self.holder = holder
        self.interval_s = interval_s
        self.ttl = timedelta(seconds=ttl_s)
        self.poll_s = min(poll_s if poll_s is not None else ttl_s / 3, ttl_s / 3)
        self.steps = 0
        self._sessions = session_factory
        self._step = step
        self._clock = clock
        self._held: HeldLease | None = None
        self._last_step: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> HeldLease | None:
        """The lease while this replica holds it."""
        return self._held

    def run_once(self) -> bool:
        """One iteration: hold (acquire or renew) the lease, step if due; True when it stepped."""
        now = self._clock()
        with self._sessions() as s, s.begin():
            if self._held is None:
                self._held = acquire(s, self.name, self.holder, self.ttl, now=now)
                if self._held is not None:
                    log.info("%s: lease taken (epoch %d)", self.name, self._held.epoch)
            else:
                try:
                    self._held = renew(s, self._held, self.ttl, now=now)
                except LeaseLostError:
                    log.warning("%s: lease lost (epoch %d)", self.name, self._held.epoch)
                    self._held = None
        held = self._held
        if held is None:
            return False
        due = self._last_step is None or time.monotonic() - self._last_step >= self.interval_s
        if not due:
            return False
        self._last_step = time.monotonic()
        try:
            self._step(held)
        except LeaseLostError:
            log.warning("%s: step fenced off (epoch %d is stale)", self.name, held.epoch)
            self._held = None
            return False
        self.steps += 1
        return True

    def start(self) -> None:
        """Start the thread (idempotent)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"edgefleet-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and release the lease (another replica may take it at once)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
        held, self._held = self._held, None
        if held is not None:
            try:
                with self._sessions() as s, s.begin():
                    release(s, held)
            except Exception:  # it runs out by itself after the TTL
                log.exception("%s: releasing the lease failed", self.name)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("%s: iteration failed; retrying", self.name)
            self._stop.wait(self.poll_s)
