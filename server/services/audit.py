"""The append-only, hash-chained audit log.

Flow: every mutating service call ends with ``record(session, actor, action,
target, detail)`` in the same transaction as the change it describes, so an
entry exists exactly when the change was committed. ``verify(session)`` walks
the chain and reports every entry that was edited, deleted or reordered.

Entry ``n`` stores ``hash_n = sha256(canonical(seq, at, actor, action, target,
detail, prev_hash))`` with ``prev_hash = hash_{n-1}`` (64 zeros for the first),
and ``audit_head`` holds the newest (seq, hash). Appends are serialized across
replicas (PostgreSQL advisory lock; SQLite's write lock), so the chain never
forks.

What verification proves: any change to an entry's content breaks its own hash;
deleting or reordering entries breaks the ``seq`` sequence or the next entry's
``prev_hash``; deleting the newest entries disagrees with ``audit_head``. An
attacker with write access to the database who rewrites the whole tail *and*
the head is only caught by comparing against a head hash kept elsewhere:
``verify`` returns it so operators can record it outside the database.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.db import LOCK_AUDIT, transaction_lock
from server.models import AuditEntry, AuditHead

__all__ = [
    "GENESIS",
    "AuditProblem",
    "AuditReport",
    "entry_hash",
    "list_entries",
    "record",
    "verify",
]

GENESIS = "0" * 64
_HEAD_ID = 1


def _detail_text(detail: Mapping[str, Any]) -> str:
    return json.dumps(dict(detail), sort_keys=True, separators=(",", ":"), default=str)


def entry_hash(
    seq: int, at: str, actor: str, action: str, target: str, detail: str, prev_hash: str
) -> str:
    """The hash an entry with these stored values must carry."""
    body = json.dumps(
        {
            "seq": seq,
            "at": at,
            "actor": actor,
            "action": action,
            "target": target,
            "detail": detail,
            "prev": prev_hash,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def record(
    session: Session,
    actor: str,
    action: str,
    target: str,
    detail: Mapping[str, Any] | None = None,
    *,
    now: datetime | None = None,
) -> AuditEntry:
    """Append one entry in the caller's transaction (committed with the change).

    Args:
        session: the transaction that also carries the change.
        actor: who did it (``token:<name>`` or ``cli:<user>``).
        action: a dotted verb, e.g. ``device.enroll``.
        target: what it was done to, e.g. ``device/cam-1``.
        detail: JSON-able facts (never secrets).
        now: the time to record (default: now).
    """
    transaction_lock(session, LOCK_AUDIT)
    head = session.get(AuditHead, _HEAD_ID, with_for_update=True)
    seq = (head.seq if head else 0) + 1
    prev = head.hash if head else GENESIS
    at = (
        (now or datetime.now(timezone.utc))
        .astimezone(timezone.utc)
        .isoformat(timespec="microseconds")
    )
    text = _detail_text(detail or {})
    digest = entry_hash(seq, at, actor[:128], action, target[:256], text, prev)
    entry = AuditEntry(
        seq=seq,
        at=at,
        actor=actor[:128],
        action=action,
        target=target[:256],
        detail=text,
        prev_hash=prev,
        hash=digest,
    )
    session.add(entry)
    if head is None:
        session.add(AuditHead(id=_HEAD_ID, seq=seq, hash=digest))
    else:
        head.seq, head.hash = seq, digest
    session.flush()
    return entry


def _original_seq(e: AuditEntry, reach: int = 256) -> int | None:
    """The seq an entry's hash was computed for, if it is a nearby other one (a move)."""
    for seq in range(max(1, e.seq - reach), e.seq + reach + 1):
        if seq != e.seq and (
            entry_hash(seq, e.at, e.actor, e.action, e.target, e.detail, e.prev_hash) == e.hash
        ):
            return seq
    return None


@dataclass(frozen=True)
class AuditProblem:
    """One inconsistency, located at the entry where the chain breaks."""

    seq: int
    kind: str  # edited | deleted | reordered | truncated
    message: str


@dataclass
class AuditReport:
    """The outcome of ``verify``."""

    entries: int
    head_seq: int
    head_hash: str
    problems: list[AuditProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(session: Session, *, batch: int = 1000) -> AuditReport:
    """Walk the whole chain and report every break.

    Returns:
        The number of entries, the recorded head, and the problems found
        (empty when the log is intact).
    """
    head = session.get(AuditHead, _HEAD_ID)
    problems: list[AuditProblem] = []
    expected_seq = 1
    prev_hash = GENESIS
    count = 0
    last_seq = 0
    last_seq_seen = 0
    while True:
        rows = session.scalars(
            select(AuditEntry)
            .where(AuditEntry.seq > last_seq_seen)
            .order_by(AuditEntry.seq)
            .limit(batch)
        ).all()
        if not rows:
            break
        for e in rows:
            count += 1
            last_seq_seen = e.seq
            own = entry_hash(e.seq, e.at, e.actor, e.action, e.target, e.detail, e.prev_hash)
            if e.seq != expected_seq:
                problems.append(
                    AuditProblem(
                        expected_seq,
                        "deleted",
                        f"entries {expected_seq}..{e.seq - 1} are missing: deleted "
                        f"(the next entry present is {e.seq})",
                    )
                )
            if own != e.hash:
                moved_from = _original_seq(e)
                if moved_from is not None:
                    problems.append(
                        AuditProblem(
                            e.seq,
                            "reordered",
                            f"entry {e.seq} ({e.action} {e.target}) was moved: it was written "
                            f"as entry {moved_from}",
                        )
                    )
                else:
                    problems.append(
                        AuditProblem(
                            e.seq,
                            "edited",
                            f"entry {e.seq} ({e.action} {e.target}) was edited: its content "
                            "no longer matches its hash",
                        )
                    )
            elif e.prev_hash != prev_hash and e.seq == expected_seq:
                problems.append(
                    AuditProblem(
                        e.seq,
                        "reordered",
                        f"entry {e.seq} does not follow entry {e.seq - 1}: entries were "
                        "reordered, replaced or re-hashed",
                    )
                )
            prev_hash = e.hash
            expected_seq = e.seq + 1
            last_seq = e.seq
        session.expunge_all()
    head_seq = head.seq if head else 0
    head_hash = head.hash if head else GENESIS
    if head_seq > last_seq:
        problems.append(
            AuditProblem(
                last_seq + 1,
                "truncated",
                f"the log ends at entry {last_seq} but its head records entry {head_seq}: "
                f"entries {last_seq + 1}..{head_seq} were deleted",
            )
        )
    elif head_seq < last_seq or (last_seq and head_hash != prev_hash):
        problems.append(
            AuditProblem(
                last_seq,
                "edited",
                f"the head (entry {head_seq}) does not match the newest entry {last_seq}",
            )
        )
    return AuditReport(entries=count, head_seq=head_seq, head_hash=head_hash, problems=problems)


def list_entries(
    session: Session, *, after: int = 0, limit: int = 100
) -> tuple[list[AuditEntry], int]:
    """Entries with ``seq > after`` in order, and the total number of entries."""
    rows = session.scalars(
        select(AuditEntry).where(AuditEntry.seq > after).order_by(AuditEntry.seq).limit(limit)
    ).all()
    total = session.scalar(select(func.count()).select_from(AuditEntry)) or 0
    return list(rows), int(total)
