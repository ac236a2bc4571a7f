"""Named leases with an epoch fencing token and the loops under them (SQLite, PostgreSQL)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import func, select

from server.models import Lease, TelemetryRow
from server.workers import lease
from server.workers.lease import LeaseLostError
from server.workers.loop import LeasedLoop
from server.workers.retention import retention_loop

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
TTL = timedelta(seconds=30)


def test_acquire_is_exclusive_while_live_and_taken_over_with_a_new_epoch(sessions) -> None:
    with sessions() as s, s.begin():
        a = lease.acquire(s, "retention", "replica-a", TTL, now=T0)
    assert a is not None and a.epoch == 1
    with sessions() as s, s.begin():
        assert (
            lease.acquire(s, "retention", "replica-b", TTL, now=T0 + timedelta(seconds=29)) is None
        )
    with sessions() as s, s.begin():  # the holder extends: same epoch
        again = lease.acquire(s, "retention", "replica-a", TTL, now=T0 + timedelta(seconds=10))
    assert again is not None and again.epoch == 1
    with sessions() as s, s.begin():  # a's lease ran out at T0 + 40 s
        b = lease.acquire(s, "retention", "replica-b", TTL, now=T0 + timedelta(seconds=41))
    assert b is not None and b.epoch == 2 and b.holder == "replica-b"


def test_a_stale_holder_cannot_renew_or_write(sessions) -> None:
    with sessions() as s, s.begin():
        a = lease.acquire(s, "controller", "a", TTL, now=T0)
    with sessions() as s, s.begin():
        b = lease.acquire(s, "controller", "b", TTL, now=T0 + timedelta(minutes=5))
    assert a is not None and b is not None and b.epoch == a.epoch + 1
    with sessions() as s, s.begin(), pytest.raises(LeaseLostError):
        lease.renew(s, a, TTL, now=T0 + timedelta(minutes=5))
    # a fenced write of the stale holder commits nothing
    with pytest.raises(LeaseLostError, match="epoch 1 is stale"), sessions() as s, s.begin():
        lease.fence(s, a)
        s.add(Lease(name="written-by-stale-holder", holder="a", epoch=0))
    with sessions() as s:
        assert s.get(Lease, "written-by-stale-holder") is None
        lease.fence(s, b)  # the current holder passes


def test_release_lets_another_replica_take_over_at_once_with_a_higher_epoch(sessions) -> None:
    with sessions() as s, s.begin():
        a = lease.acquire(s, "retention", "a", TTL, now=T0)
    assert a is not None
    with sessions() as s, s.begin():
        assert lease.release(s, a)
    with sessions() as s, s.begin():
        b = lease.acquire(s, "retention", "b", TTL, now=T0 + timedelta(seconds=1))
    assert b is not None and b.epoch == a.epoch + 1
    with sessions() as s, s.begin():
        assert not lease.release(s, a)  # a no longer holds it: nothing changes
        row = s.get(Lease, "retention")
        assert row is not None and row.holder == "b"


def test_bad_names_are_refused_before_any_row_is_written(sessions) -> None:
    with sessions() as s, s.begin(), pytest.raises(ValueError, match="lease name"):
        lease.acquire(s, "x" * 65, "a", TTL, now=T0)
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Lease)) == 0


def _two_loops(
    sessions: Callable[[], Any], step: Callable[[str, lease.HeldLease], None], now: list[datetime]
) -> tuple[LeasedLoop, LeasedLoop]:
    def make(holder: str) -> LeasedLoop:
        return LeasedLoop(
            "singleton",
            holder,
            sessions,
            lambda held: step(holder, held),
            interval_s=0.001,
            ttl_s=30,
            clock=lambda: now[0],
        )

    return make("a"), make("b")


def test_only_the_holder_steps_and_a_takeover_fences_the_old_one(sessions) -> None:
    ran: list[tuple[str, int]] = []

    def step(holder: str, held: lease.HeldLease) -> None:
        with sessions() as s, s.begin():
            lease.fence(s, held)
            ran.append((holder, held.epoch))

    now = [T0]
    a, b = _two_loops(sessions, step, now)
    for _ in range(3):
        a.run_once()
        b.run_once()
    assert {h for h, _ in ran} == {"a"} and len(ran) == 3
    # a stops renewing (paused process); b takes over after the TTL
    now[0] = T0 + timedelta(seconds=31)
    assert b.run_once() and ran[-1] == ("b", 2)
    # a wakes up: its renewal fails, it steps no more and holds nothing
    assert not a.run_once()
    assert a.held is None and ran[-1] == ("b", 2)
    b.stop()  # releases: a can take over at once, with epoch 3
    assert a.run_once() and ran[-1] == ("a", 3)
    a.stop()


def test_loop_threads_never_step_concurrently(sessions) -> None:
    inside = threading.Lock()
    overlaps: list[int] = []
    steps: list[str] = []

    def step(holder: str, held: lease.HeldLease) -> None:
        if not inside.acquire(blocking=False):
            overlaps.append(held.epoch)
            return
        try:
            steps.append(holder)
        finally:
            inside.release()

    loops = [
        LeasedLoop(
            "busy",
            h,
            sessions,
            (lambda held, h=h: step(h, held)),
            interval_s=0.01,
            ttl_s=3,
            poll_s=0.01,
        )
        for h in ("a", "b", "c")
    ]
    for loop in loops:
        loop.start()
    deadline = threading.Event()
    deadline.wait(0.5)
    before_stop = list(steps)
    for loop in loops:
        loop.stop()  # releases: the next loop may take over before it stops too
    assert before_stop and not overlaps
    assert len(set(before_stop)) == 1  # nobody released while running: one holder throughout


def test_retention_runs_under_its_lease_once_per_deployment(settings, sessions) -> None:
    import time

    from server.services import telemetry
    from tests.server.test_telemetry import rec

    with sessions() as s, s.begin():
        days = settings.telemetry_retention_days
        telemetry.ingest_batch(s, [rec("a", 1, at=time.time() - (days + 1) * 86400),
                                   rec("a", 2, at=time.time())])  # fmt: skip
    a = retention_loop(sessions, settings, "replica-a")
    b = retention_loop(sessions, settings, "replica-b")
    assert a.run_once() and not b.run_once()
    with sessions() as s:
        rows = s.scalar(select(func.count()).select_from(TelemetryRow))
    assert rows == 1  # the old record went, the new one stayed
    a.stop()
    b.stop()
