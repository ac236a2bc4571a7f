"""Telemetry retention: delete records older than the configured age, once per deployment.

One ``LeasedLoop`` under the lease ``"retention"`` runs the pass hourly on
whichever replica holds the lease (``server run`` and ``server mqtt`` both
start it; the lease, not the process kind, decides who runs it). The delete
is fenced by the lease's epoch in its own transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy.orm import Session

from server.services import telemetry
from server.settings import Settings
from server.workers.lease import HeldLease, fence
from server.workers.loop import LeasedLoop, utcnow

__all__ = ["RETENTION_EVERY_S", "retention_loop", "retention_pass"]

log = logging.getLogger("edgefleet.server.workers")

RETENTION_EVERY_S = 3600.0  # seconds between retention passes


def retention_pass(session: Session, settings: Settings, held: HeldLease | None = None) -> int:
    """Delete telemetry older than ``telemetry_retention_days``; fenced when ``held`` is given.

    Returns how many records went. The caller commits.
    """
    if held is not None:
        fence(session, held)
    return telemetry.apply_retention(
        session, timedelta(days=settings.telemetry_retention_days), now=utcnow()
    )


def retention_loop(
    session_factory: Callable[[], Session], settings: Settings, holder: str
) -> LeasedLoop:
    """The retention loop of this replica (not started)."""

    def step(held: HeldLease) -> None:
        with session_factory() as s, s.begin():
            deleted = retention_pass(s, settings, held)
        if deleted:
            log.info("retention removed %d telemetry records", deleted)

    return LeasedLoop("retention", holder, session_factory, step, interval_s=RETENTION_EVERY_S)
