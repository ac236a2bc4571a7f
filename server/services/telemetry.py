"""Telemetry storage: idempotent batch ingestion, queries and retention.

Flow: the MQTT ingester (``server.mqtt.ingest``) parses payloads with
``TelemetryRecord.from_bytes``, checks that each record's ``device_id``
matches its topic, and hands batches of ``RecordSummary`` + the payload bytes
to ``ingest_summaries`` (``ingest_batch`` does the same for parsed records);
the API reads with ``query``; the job worker (and ``server mqtt``) call
``apply_retention`` hourly.

Invariants: a (device_id, seq) pair is stored at most once. ``ingest_batch``
runs one cached ``INSERT ... ON CONFLICT (device_id, seq) DO NOTHING
RETURNING id`` as an executemany in the caller's transaction (the returned
ids are the new rows), so duplicates inside a batch, across batches and between
replicas racing on the same record are all counted as duplicates, never as
errors, and ``stored + duplicates == len(records)``. The stored ``record`` is
the device's canonical JSON as received. Retention deletes by ``window_end``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple

from sqlalchemy import JSON, Text, bindparam, cast, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from edgefleet import canonical
from edgefleet.messages import TelemetryRecord
from server import metrics
from server.db import is_postgres
from server.models import TelemetryRow

__all__ = ["RecordSummary", "apply_retention", "ingest_batch", "ingest_summaries", "query"]


def _received(now: datetime | None) -> datetime:
    return now or datetime.now(timezone.utc)


@functools.lru_cache(maxsize=2)
def _insert_statement(dialect: str) -> Any:
    """``INSERT ... ON CONFLICT (device_id, seq) DO NOTHING RETURNING id``, for executemany.

    The ``record`` column is bound as text holding the canonical JSON the
    device sent (already validated), so it is not decoded and re-encoded per
    row; PostgreSQL casts it to JSON.
    """
    table: Any = TelemetryRow.__table__
    record = bindparam("record", type_=Text())
    values: dict[str, Any] = {c: bindparam(c) for c in _COLUMNS}
    values["record"] = cast(record, JSON) if dialect == "postgresql" else record
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return (
        insert(table)
        .values(values)
        .on_conflict_do_nothing(index_elements=["device_id", "seq"])
        .returning(table.c.id)
    )


_COLUMNS = (
    "device_id",
    "seq",
    "window_start",
    "window_end",
    "model_name",
    "model_version",
    "predictions",
    "errors",
    "received_at",
)


class RecordSummary(NamedTuple):
    """The indexed columns of one record (small and picklable: parse workers return it)."""

    device_id: str
    seq: int
    window_start: float
    window_end: float
    model_name: str | None
    model_version: int | None
    predictions: int
    errors: int

    @classmethod
    def of(cls, record: TelemetryRecord) -> RecordSummary:
        model = record.model
        return cls(
            record.device_id,
            record.seq,
            record.window_start,
            record.window_end,
            model.name if model else None,
            model.version if model else None,
            record.predictions,
            record.errors,
        )


def ingest_batch(
    session: Session,
    records: Sequence[TelemetryRecord],
    *,
    payloads: Sequence[bytes] | None = None,
    now: datetime | None = None,
) -> tuple[int, int]:
    """Store records not seen before; the caller commits.

    Args:
        session: the transaction to insert in.
        records: parsed records (any devices, any order, duplicates allowed).
        payloads: the canonical JSON each record was parsed from (the MQTT
            payloads), stored as received; default: each record re-encoded.
        now: the receive time to stamp (default: now).

    Returns:
        (stored, duplicates), summing to ``len(records)``.

    Raises:
        ValueError: ``payloads`` does not match ``records`` one to one.
    """
    if payloads is None:
        payloads = [canonical.encode(r.to_dict()) for r in records]
    return ingest_summaries(session, [RecordSummary.of(r) for r in records], payloads, now=now)


def ingest_summaries(
    session: Session,
    summaries: Sequence[RecordSummary],
    payloads: Sequence[bytes],
    *,
    now: datetime | None = None,
) -> tuple[int, int]:
    """``ingest_batch`` for records already parsed elsewhere (the ingester's workers).

    Each payload must be the JSON that ``TelemetryRecord.from_bytes``
    accepted and ``summaries[i]`` was taken from.

    Raises:
        ValueError: ``payloads`` does not match ``summaries`` one to one.
    """
    if len(payloads) != len(summaries):
        raise ValueError("payloads must match records one to one")
    if not summaries:
        return 0, 0
    received = _received(now)
    seen: set[tuple[str, int]] = set()
    rows: list[dict[str, Any]] = []
    utc = timezone.utc
    for summary, raw in zip(summaries, payloads, strict=True):
        key = (summary.device_id, summary.seq)
        if key in seen:
            continue
        seen.add(key)
        rows.append(
            {
                "device_id": summary.device_id,
                "seq": summary.seq,
                "window_start": datetime.fromtimestamp(summary.window_start, utc),
                "window_end": datetime.fromtimestamp(summary.window_end, utc),
                "model_name": summary.model_name,
                "model_version": summary.model_version,
                "predictions": summary.predictions,
                "errors": summary.errors,
                "received_at": received,
                "record": raw.decode("utf-8"),
            }
        )
    dialect = "postgresql" if is_postgres(session) else "sqlite"
    # executemany + RETURNING: SQLAlchemy sends it as batched multi-row INSERTs
    # ("insertmanyvalues"), compiled once; the returned ids are the new rows.
    stored = len(session.execute(_insert_statement(dialect), rows).all())
    duplicates = len(summaries) - stored
    metrics.TELEMETRY_RECORDS.labels("stored").inc(stored)
    metrics.TELEMETRY_RECORDS.labels("duplicate").inc(duplicates)
    return stored, duplicates


def query(
    session: Session,
    *,
    device_id: str | None = None,
    model_name: str | None = None,
    model_version: int | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[TelemetryRow], int]:
    """Records matching every filter, newest window first, and the number matching.

    ``since``/``until`` bound ``window_end`` (inclusive / exclusive).
    """
    q = select(TelemetryRow)
    if device_id is not None:
        q = q.where(TelemetryRow.device_id == device_id)
    if model_name is not None:
        q = q.where(TelemetryRow.model_name == model_name)
    if model_version is not None:
        q = q.where(TelemetryRow.model_version == model_version)
    if since is not None:
        q = q.where(TelemetryRow.window_end >= since)
    if until is not None:
        q = q.where(TelemetryRow.window_end < until)
    total = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = session.scalars(
        q.order_by(TelemetryRow.window_end.desc(), TelemetryRow.device_id, TelemetryRow.seq.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    return list(rows), int(total)


def apply_retention(session: Session, max_age: timedelta, *, now: datetime | None = None) -> int:
    """Delete records whose window ended more than ``max_age`` ago; return how many."""
    cutoff = (now or datetime.now(timezone.utc)) - max_age
    result = session.execute(delete(TelemetryRow).where(TelemetryRow.window_end < cutoff))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
