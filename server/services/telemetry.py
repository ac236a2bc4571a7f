"""Telemetry storage: idempotent batch ingestion, queries and retention.

Flow: the MQTT ingester parses payloads with ``TelemetryRecord.from_bytes``,
checks that each record's ``device_id`` matches its topic, and hands batches
to ``ingest_batch``; the API reads with ``query``; the worker calls
``apply_retention`` periodically.

Invariants: a (device_id, seq) pair is stored at most once. ``ingest_batch``
runs one ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` in the caller's
transaction, so duplicates inside a batch, across batches and between replicas
racing on the same record are all counted as duplicates, never as errors, and
``stored + duplicates == len(records)``. Retention deletes by ``window_end``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from edgefleet.messages import TelemetryRecord
from server import metrics
from server.db import is_postgres
from server.models import TelemetryRow

__all__ = ["apply_retention", "ingest_batch", "query"]

# Rows per INSERT statement; keeps SQLite under its bound-parameter limit.
_CHUNK = 200


def _row(record: TelemetryRecord, received: datetime) -> dict[str, Any]:
    return {
        "device_id": record.device_id,
        "seq": record.seq,
        "window_start": datetime.fromtimestamp(record.window_start, timezone.utc),
        "window_end": datetime.fromtimestamp(record.window_end, timezone.utc),
        "model_name": record.model.name if record.model else None,
        "model_version": record.model.version if record.model else None,
        "predictions": record.predictions,
        "errors": record.errors,
        "received_at": received,
        "record": record.to_dict(),
    }


def ingest_batch(
    session: Session, records: Sequence[TelemetryRecord], *, now: datetime | None = None
) -> tuple[int, int]:
    """Store records not seen before; the caller commits.

    Args:
        session: the transaction to insert in.
        records: parsed records (any devices, any order, duplicates allowed).
        now: the receive time to stamp (default: now).

    Returns:
        (stored, duplicates), summing to ``len(records)``.
    """
    if not records:
        return 0, 0
    received = now or datetime.now(timezone.utc)
    unique: dict[tuple[str, int], TelemetryRecord] = {}
    for record in records:
        unique.setdefault((record.device_id, record.seq), record)
    rows = [_row(r, received) for r in unique.values()]
    dialect_insert = postgresql.insert if is_postgres(session) else sqlite.insert
    stored = 0
    for start in range(0, len(rows), _CHUNK):
        stmt = (
            dialect_insert(TelemetryRow)
            .values(rows[start : start + _CHUNK])
            .on_conflict_do_nothing(index_elements=["device_id", "seq"])
            .returning(TelemetryRow.id)
        )
        stored += len(session.execute(stmt).all())
    duplicates = len(records) - stored
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
