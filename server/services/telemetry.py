"""Telemetry storage: idempotent batch ingestion, queries and retention.

Flow: the MQTT ingester (``server.mqtt.ingest``) validates payloads
(``TelemetryRecord.from_bytes``, the one wire schema of ``edgefleet.wire``),
checks that each record's ``device_id`` matches its topic, and hands batches
of ``RecordSummary`` + the payload bytes to ``ingest_summaries``
(``ingest_batch`` does the same for parsed records); the API reads with
``query``; the job worker (and ``server mqtt``) call ``apply_retention``
hourly.

Invariants: a (device_id, seq) pair is stored at most once. ``ingest_summaries``
sends one ``INSERT ... ON CONFLICT (device_id, seq) DO NOTHING`` as a single
DBAPI executemany in the caller's transaction and counts what the driver
reports inserted, so duplicates inside a batch, across batches and between
replicas racing on the same record are all counted as duplicates, never as
errors, and ``stored + duplicates == len(records)``. The stored ``record`` is
the device's JSON as received (UTF-8, already validated). Retention deletes by
``window_end``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, NamedTuple, Protocol

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from edgefleet import canonical
from edgefleet.wire import TelemetryRecord
from server import metrics
from server.models import TelemetryRow

__all__ = [
    "RecordLike",
    "RecordSummary",
    "apply_retention",
    "ingest_batch",
    "ingest_summaries",
    "query",
]


def _received(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now


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
    "record",
)


@functools.lru_cache(maxsize=4)
def _insert_sql(dialect: str, paramstyle: str) -> str:
    """``INSERT ... ON CONFLICT (device_id, seq) DO NOTHING`` in the driver's own SQL.

    Sent with ``exec_driver_sql`` as one DBAPI ``executemany``: SQLAlchemy's
    per-row bind processing cost more than the insert itself on this path.
    ``record`` is bound as the JSON text the device sent (already validated,
    stored as received); PostgreSQL casts it to ``json``.

    Raises:
        RuntimeError: a database or driver other than SQLite or PostgreSQL/psycopg
            (not a ``ValueError``: the ingester must not blame the payloads).
    """
    if (dialect, paramstyle) == ("sqlite", "qmark"):
        marks = ["?"] * len(_COLUMNS)
    elif dialect == "postgresql" and paramstyle in ("format", "pyformat"):
        marks = ["%s"] * (len(_COLUMNS) - 1) + ["%s::json"]
    else:
        raise RuntimeError(
            f"telemetry ingest supports SQLite (qmark) and PostgreSQL (psycopg), "
            f"not {dialect} with paramstyle {paramstyle}"
        )
    return (
        f"INSERT INTO {TelemetryRow.__tablename__} ({', '.join(_COLUMNS)}) "
        f"VALUES ({', '.join(marks)}) ON CONFLICT (device_id, seq) DO NOTHING"
    )


def _sqlite_datetime(value: datetime) -> str:
    """A UTC datetime as SQLAlchemy's SQLite ``DATETIME`` stores it (naive, microseconds)."""
    return value.astimezone(timezone.utc).replace(tzinfo=None).isoformat(" ", "microseconds")


class _ModelLike(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> int: ...


class RecordLike(Protocol):
    """What ``RecordSummary.of`` reads: the fields of a telemetry record it indexes."""

    @property
    def device_id(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def window_start(self) -> float: ...
    @property
    def window_end(self) -> float: ...
    @property
    def model(self) -> _ModelLike | None: ...
    @property
    def predictions(self) -> int: ...
    @property
    def errors(self) -> int: ...


class RecordSummary(NamedTuple):
    """The indexed columns of one record (what the ingester stores besides the JSON)."""

    device_id: str
    seq: int
    window_start: float
    window_end: float
    model_name: str | None
    model_version: int | None
    predictions: int
    errors: int

    @classmethod
    def of(cls, record: RecordLike) -> RecordSummary:
        """The summary of a parsed record."""
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
        payloads: the JSON each record was parsed from (the MQTT payloads),
            stored as received; default: each record's canonical JSON.
        now: the receive time to stamp (default: now).

    Returns:
        (stored, duplicates), summing to ``len(records)``.

    Raises:
        ValueError: ``payloads`` does not match ``records`` one to one, or ``now`` is naive.
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
    """``ingest_batch`` for records already validated elsewhere (the MQTT ingester).

    Each payload must be the JSON that ``TelemetryRecord.from_bytes``
    accepted and ``summaries[i]`` was taken from.

    Raises:
        ValueError: ``payloads`` does not match ``summaries`` one to one, or ``now`` is naive.
    """
    if len(payloads) != len(summaries):
        raise ValueError("payloads must match records one to one")
    if not summaries:
        return 0, 0
    received = _received(now)
    conn = session.connection()
    dialect = conn.dialect
    sql = _insert_sql(dialect.name, dialect.paramstyle)
    utc = timezone.utc
    fromtimestamp = datetime.fromtimestamp
    stamp: Callable[[float], Any]
    if dialect.name == "sqlite":  # the text SQLAlchemy's SQLite DATETIME would store
        received_value: Any = _sqlite_datetime(received)

        def stamp(ts: float) -> Any:
            return _sqlite_datetime(fromtimestamp(ts, utc))
    else:
        received_value = received

        def stamp(ts: float) -> Any:
            return fromtimestamp(ts, utc)

    rows = [
        (s.device_id, s.seq, stamp(s.window_start), stamp(s.window_end), s.model_name,
         s.model_version, s.predictions, s.errors, received_value, raw.decode("utf-8"))
        for s, raw in zip(summaries, payloads, strict=True)
    ]  # fmt: skip
    # One executemany; the driver's rowcount sums the rows each statement inserted
    # (0 for a conflict), so duplicates within the batch are counted too.
    stored = int(conn.exec_driver_sql(sql, rows).rowcount)
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
