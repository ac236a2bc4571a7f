"""The rollout controller loop: once per deployment, under the lease ``"rollouts"``.

Every ``rollout_interval_seconds`` the replica holding the lease runs one
``server.services.rollouts.reconcile`` pass in one transaction fenced by the
lease's epoch: a replica that lost the lease commits nothing (its desired
states and rollout states are rolled back together), and the new holder's
next pass decides again from the stored state (docs/rollouts.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.orm import Session

from server.services import rollouts
from server.settings import Settings
from server.workers.lease import HeldLease, fence
from server.workers.loop import LeasedLoop, utcnow

__all__ = ["rollout_loop"]

log = logging.getLogger("edgefleet.server.workers")


def rollout_loop(
    session_factory: Callable[[], Session], settings: Settings, holder: str
) -> LeasedLoop:
    """The rollout controller loop of this replica (not started)."""

    def step(held: HeldLease) -> None:
        with session_factory() as s, s.begin():
            fence(s, held)
            rollouts.reconcile(s, settings, utcnow())

    return LeasedLoop(
        "rollouts", holder, session_factory, step, interval_s=settings.rollout_interval_seconds
    )
