"""Named leases with an epoch used as a fencing token (one mechanism for every loop).

A lease row (``leases``: name, holder, epoch, expires_at) says which replica
may do a piece of singleton work now: the retention pass, the rollout
controller, one build job. Flow::

    held = acquire(s, name, holder, ttl, now=now)   # None: someone else holds it
    ... renew(s, held, ttl, now=now) every ttl/3 ...
    with transaction: fence(s, held); <writes>       # LeaseLostError: stop
    release(s, held)

Decisions, all conditional ``UPDATE``s (atomic on SQLite and PostgreSQL):

- ``acquire`` takes a lease that is free or expired and *increments its epoch*;
  the holder of a live lease only extends it (same epoch).
- ``renew`` extends the lease only while ``(holder, epoch)`` is still this
  one's; it raises ``LeaseLostError`` once another replica took over.
- ``fence`` checks, inside the transaction that makes the holder's writes,
  that the lease still carries this epoch, and locks the row (``FOR UPDATE``
  on PostgreSQL; SQLite has one writer), so a takeover cannot commit between
  the check and the writes. A replica that paused past its expiry (GC, a
  stopped VM) and wakes up finds a higher epoch and writes nothing.

Invariant: at most one holder per epoch, and epochs of a name only grow; a
write fenced by epoch *e* commits only while *e* is current. Times are aware
UTC from the caller's clock (tests pass ``now``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from server.errors import ConflictError
from server.models import Lease

__all__ = ["HeldLease", "LeaseLostError", "acquire", "fence", "release", "renew"]

MAX_NAME = 64
MAX_HOLDER = 128


class LeaseLostError(ConflictError):
    """Another replica holds the lease now (a higher epoch): the old holder must stop."""


@dataclass(frozen=True)
class HeldLease:
    """A lease this replica holds: ``epoch`` is the fencing token of its writes."""

    name: str
    holder: str
    epoch: int
    expires_at: datetime


def _check(name: str, holder: str) -> None:
    if not 0 < len(name) <= MAX_NAME:
        raise ValueError(f"lease name must be 1..{MAX_NAME} characters, got {len(name)}")
    if not 0 < len(holder) <= MAX_HOLDER:
        raise ValueError(f"lease holder must be 1..{MAX_HOLDER} characters, got {len(holder)}")


def _ensure_row(session: Session, name: str) -> None:
    if session.get(Lease, name) is not None:
        return
    try:
        with session.begin_nested():
            session.add(Lease(name=name, holder=None, epoch=0, expires_at=None))
    except IntegrityError:  # another replica inserted it first: fine
        pass


def acquire(
    session: Session, name: str, holder: str, ttl: timedelta, *, now: datetime
) -> HeldLease | None:
    """Take lease ``name`` for ``holder`` until ``now + ttl``, or extend it if already held.

    Returns the held lease (a new epoch when the holder changed or the lease
    had run out), or None while another holder's lease is live. The caller
    commits.
    """
    _check(name, holder)
    _ensure_row(session, name)
    expires = now + ttl
    live = Lease.expires_at > now
    # Extend a live lease this holder already has: same epoch.
    extended = session.execute(
        update(Lease)
        .where(Lease.name == name, Lease.holder == holder, live)
        .values(expires_at=expires)
        .execution_options(synchronize_session=False)
    )
    if extended.rowcount != 1:  # type: ignore[attr-defined]
        taken = session.execute(
            update(Lease)
            .where(
                Lease.name == name,
                or_(Lease.holder.is_(None), Lease.expires_at.is_(None), Lease.expires_at <= now),
            )
            .values(holder=holder, epoch=Lease.epoch + 1, expires_at=expires, acquired_at=now)
            .execution_options(synchronize_session=False)
        )
        if taken.rowcount != 1:  # type: ignore[attr-defined]
            return None
    epoch = session.scalar(select(Lease.epoch).where(Lease.name == name, Lease.holder == holder))
    if epoch is None:  # pragma: no cover - the row was just updated in this transaction
        return None
    return HeldLease(name, holder, int(epoch), expires)


def renew(session: Session, held: HeldLease, ttl: timedelta, *, now: datetime) -> HeldLease:
    """Extend ``held`` to ``now + ttl``; the caller commits.

    Raises:
        LeaseLostError: another holder took the lease (its epoch is no longer ``held.epoch``).
    """
    expires = now + ttl
    result = session.execute(
        update(Lease)
        .where(Lease.name == held.name, Lease.holder == held.holder, Lease.epoch == held.epoch)
        .values(expires_at=expires)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise LeaseLostError(f"lease {held.name!r} epoch {held.epoch} was taken over")
    return HeldLease(held.name, held.holder, held.epoch, expires)


def fence(session: Session, held: HeldLease) -> None:
    """Check, in the caller's writing transaction, that ``held`` is still the current epoch.

    Locks the lease row until that transaction ends, so no takeover commits
    between this check and the caller's writes.

    Raises:
        LeaseLostError: the lease has a newer epoch or another holder.
    """
    row = session.execute(
        select(Lease.holder, Lease.epoch).where(Lease.name == held.name).with_for_update()
    ).first()
    if row is None or row.holder != held.holder or int(row.epoch) != held.epoch:
        current = None if row is None else int(row.epoch)
        raise LeaseLostError(
            f"lease {held.name!r}: epoch {held.epoch} is stale (current {current}); "
            "another replica holds it"
        )


def release(session: Session, held: HeldLease) -> bool:
    """Give ``held`` up (the epoch stays, so the next holder gets a higher one); commits nothing.

    Returns whether this holder still had it.
    """
    result = session.execute(
        update(Lease)
        .where(Lease.name == held.name, Lease.holder == held.holder, Lease.epoch == held.epoch)
        .values(holder=None, expires_at=None)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]
