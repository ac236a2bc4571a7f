"""The drift evaluation loop: once per deployment, under the lease ``"drift"``.

Every ``drift_interval_seconds`` the replica holding the lease runs, in one
transaction fenced by the lease's epoch (a replica that lost the lease
commits nothing), ``server.services.alerts.evaluate`` and then
``server.services.retrain.evaluate_policies``; the hooks of the requests
that fired run after the commit. Never on the ingest path: ingest only
stores records.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.orm import Session

from server.analysis.verdict import Thresholds
from server.services import alerts, retrain
from server.settings import Settings
from server.workers.lease import HeldLease, fence
from server.workers.loop import LeasedLoop, utcnow

__all__ = ["drift_loop", "thresholds_of"]

log = logging.getLogger("edgefleet.server.workers")


def thresholds_of(settings: Settings) -> Thresholds:
    """The drift thresholds of the server's settings (``ConfigError`` when inconsistent)."""
    return Thresholds(
        psi_warn=settings.drift_psi_warn,
        psi_alarm=settings.drift_psi_alarm,
        min_n=settings.drift_min_n,
    )


def drift_loop(
    session_factory: Callable[[], Session], settings: Settings, holder: str
) -> LeasedLoop:
    """The drift evaluation loop of this replica (not started)."""
    thresholds = thresholds_of(settings)

    def step(held: HeldLease) -> None:
        now = utcnow()
        with session_factory() as s, s.begin():
            fence(s, held)
            summary = alerts.evaluate(s, thresholds, now)
            s.flush()
            fired = retrain.evaluate_policies(s, settings, now)
        if summary.transitions:
            log.info("drift: %d alert level change(s)", summary.transitions)
        for request_id in fired:  # outside the transaction: a hook may take minutes
            log.info("retraining request %s; running the hook", request_id)
            retrain.run_hook(session_factory, settings, request_id, fence=lambda s: fence(s, held))

    return LeasedLoop(
        "drift", holder, session_factory, step, interval_s=settings.drift_interval_seconds
    )
