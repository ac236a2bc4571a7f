"""Telemetry: idempotent ingest_batch on both databases, queries, retention."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

from edgefleet.wire import ModelRef, TelemetryRecord
from server import metrics
from server.services import telemetry
from tests.server.conftest import Api

T0 = datetime(2030, 5, 1, 12, 0, tzinfo=timezone.utc).timestamp()


def rec(
    device: str,
    seq: int,
    *,
    at: float = T0,
    model: tuple[str, int] | None = ("m", 1),
    predictions: int = 10,
) -> TelemetryRecord:
    return TelemetryRecord(
        device_id=device,
        seq=seq,
        window_start=at - 60,
        window_end=at,
        model=ModelRef(*model) if model else None,
        predictions=predictions,
    )


def test_ingest_batch_dedupes_by_device_and_seq(sessions) -> None:
    before = metrics.TELEMETRY_RECORDS.labels("duplicate")._value.get()
    with sessions() as s:
        assert telemetry.ingest_batch(s, [rec("a", 1), rec("a", 2), rec("b", 1)]) == (3, 0)
        s.commit()
    with sessions() as s:
        # redelivery, a duplicate inside the batch, and one new record
        batch = [rec("a", 2), rec("a", 3), rec("a", 3, predictions=99), rec("b", 1)]
        assert telemetry.ingest_batch(s, batch) == (1, 3)
        s.commit()
    with sessions() as s:
        rows, total = telemetry.query(s, device_id="a")
        assert total == 3 and [r.seq for r in rows] == [3, 2, 1]
        assert rows[0].predictions == 10  # the first copy won
        assert rows[0].record == rec("a", 3).to_dict()
    assert metrics.TELEMETRY_RECORDS.labels("duplicate")._value.get() == before + 3


def test_ingest_batch_empty_and_large(sessions) -> None:
    with sessions() as s:
        assert telemetry.ingest_batch(s, []) == (0, 0)
        big = [rec("d", i) for i in range(1, 1001)]
        assert telemetry.ingest_batch(s, big) == (1000, 0)
        assert telemetry.ingest_batch(s, big) == (0, 1000)
        s.commit()


def test_ingest_batch_rolls_back_with_the_transaction(sessions) -> None:
    with sessions() as s:
        telemetry.ingest_batch(s, [rec("a", 1)])
        s.rollback()
    with sessions() as s:
        assert telemetry.ingest_batch(s, [rec("a", 1)]) == (1, 0)
        s.commit()


def test_ingest_batch_concurrent_replicas_store_each_record_once(sessions) -> None:
    records = [rec("c", i) for i in range(1, 201)]
    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []

    def replica() -> None:
        try:
            with sessions() as s:
                results.append(telemetry.ingest_batch(s, records))
                s.commit()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=replica) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(stored for stored, _ in results) == 200
    assert all(stored + dup == 200 for stored, dup in results)
    with sessions() as s:
        assert telemetry.query(s, device_id="c", limit=1)[1] == 200


def test_query_filters_by_model_version_and_window(sessions) -> None:
    with sessions() as s:
        telemetry.ingest_batch(
            s,
            [
                rec("a", 1, at=T0, model=("m", 1)),
                rec("a", 2, at=T0 + 3600, model=("m", 2)),
                rec("b", 1, at=T0 + 7200, model=("m", 2)),
                rec("b", 2, at=T0 + 7200, model=None),
            ],
        )
        s.commit()
        t = datetime.fromtimestamp(T0, timezone.utc)
        assert telemetry.query(s, model_name="m", model_version=2)[1] == 2
        assert telemetry.query(s, model_name="m")[1] == 3
        assert telemetry.query(s, since=t + timedelta(hours=1))[1] == 3
        assert telemetry.query(s, since=t, until=t + timedelta(hours=1))[1] == 1
        rows, total = telemetry.query(s, limit=2)
        assert total == 4 and rows[0].window_end == t + timedelta(hours=2)


def test_retention_deletes_old_windows(sessions) -> None:
    now = datetime.fromtimestamp(T0, timezone.utc)
    with sessions() as s:
        telemetry.ingest_batch(
            s, [rec("a", 1, at=T0 - 100 * 86400), rec("a", 2, at=T0 - 86400), rec("a", 3, at=T0)]
        )
        s.commit()
        assert telemetry.apply_retention(s, timedelta(days=90), now=now) == 1
        s.commit()
        assert [r.seq for r in telemetry.query(s)[0]] == [3, 2]


def test_telemetry_api(api: Api) -> None:
    with api.sessions() as s:
        telemetry.ingest_batch(s, [rec("a", 1), rec("a", 2, at=T0 + 60), rec("b", 1)])
        s.commit()
    r = api.get("/api/v1/telemetry", role="viewer", params={"device_id": "a"})
    assert r.status_code == 200
    assert [x["seq"] for x in r.json()["records"]] == [2, 1]
    r = api.get(
        "/api/v1/telemetry",
        role="viewer",
        params={"since": "2030-05-01T12:00:30Z", "model": "m", "version": 1},
    )
    assert r.json()["total"] == 1
    naive = api.get("/api/v1/telemetry", role="viewer", params={"since": "2030-05-01T12:00:00"})
    assert naive.status_code == 422 and "timezone" in naive.json()["detail"]
    for param, value in (
        ("since", "0001-01-01T00:00:00+01:00"),
        ("until", "9999-12-31T23:59:59-01:00"),
    ):
        edge = api.get("/api/v1/telemetry", role="viewer", params={param: value})
        assert edge.status_code == 422 and "years 1-9999" in edge.json()["detail"]  # was a 500
    text = api.get("/metrics", role="viewer").text
    assert 'edgefleet_telemetry_records_total{result="stored"}' in text
    assert 'route="/api/v1/telemetry",status="2xx"' in text
    assert 'route="/api/v1/telemetry",status="4xx"' in text


def test_ingested_timestamps_read_back_exactly_and_as_the_orm_writes_them(sessions) -> None:
    """The insert binds timestamps itself (no SQLAlchemy bind processing): same values."""
    from sqlalchemy import text

    from server.models import TelemetryRow

    r = rec("ts", 1, at=T0 + 0.123456)
    received = datetime(2030, 5, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
    with sessions() as s:
        assert telemetry.ingest_batch(s, [r], now=received) == (1, 0)
        orm = TelemetryRow(
            device_id="orm",
            seq=1,
            window_start=datetime.fromtimestamp(r.window_start, timezone.utc),
            window_end=datetime.fromtimestamp(r.window_end, timezone.utc),
            model_name="m",
            model_version=1,
            predictions=10,
            errors=0,
            received_at=received,
            record=r.to_dict(),
        )
        s.add(orm)
        s.commit()
    with sessions() as s:
        row = telemetry.query(s, device_id="ts")[0][0]
        assert row.window_start == datetime.fromtimestamp(r.window_start, timezone.utc)
        assert row.window_end == datetime.fromtimestamp(r.window_end, timezone.utc)
        assert row.received_at == received and row.record == r.to_dict()
        raw = s.execute(
            text(
                "SELECT device_id, CAST(window_start AS TEXT), CAST(window_end AS TEXT), "
                "CAST(received_at AS TEXT) FROM telemetry WHERE device_id IN ('ts', 'orm') "
                "ORDER BY device_id"
            )
        ).all()
        assert raw[0][1:] == raw[1][1:], raw  # byte-identical storage on both dialects
        # Window filters compare these columns (text on SQLite): the row is found.
        assert telemetry.query(s, since=row.window_end, until=row.window_end + timedelta(1))[1] == 2
