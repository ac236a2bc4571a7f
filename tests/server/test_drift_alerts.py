"""Persisted drift alerts: the periodic evaluation, its pooling, audit entries and the API."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
from sqlalchemy import select

from server.analysis.verdict import Thresholds
from server.models import AuditEntry, DriftAlert
from server.services import alerts, telemetry
from tests.server.conftest import Api
from tests.server.test_drift_report import publish_with_profile, window

T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
DEVICES = ["pi-1", "pi-2", "pi-3", "pi-4", "pi-5"]


def feed(api: Api, profile: dict, at: datetime, seq: int, rng, rows: dict[str, int]) -> None:
    records = [
        window(profile, d, seq, rng, {2: 1.0} if d == "pi-5" else {}, n) for d, n in rows.items()
    ]
    with api.sessions() as s:
        telemetry.ingest_batch(s, records, now=at)
        s.commit()


def run(api: Api, at: datetime) -> alerts.EvaluationSummary:
    with api.sessions() as s, s.begin():
        return alerts.evaluate(s, Thresholds(), at)


def levels(api: Api) -> dict[tuple[str, str], str]:
    with api.sessions() as s:
        return {(a.scope, a.subject): a.level for a in s.scalars(select(DriftAlert))}


def test_a_drifting_device_alarms_after_two_judged_windows_and_the_rest_stay_ok(api: Api) -> None:
    profile = publish_with_profile(api)
    rng = np.random.default_rng(0)
    for step in range(3):
        at = T0 + timedelta(minutes=5 * step)
        feed(api, profile, at + timedelta(seconds=1), step + 1, rng, dict.fromkeys(DEVICES, 600))
        summary = run(api, at + timedelta(minutes=1))
        assert summary.versions == 1 and summary.judged == 6 * 4, summary
        now = levels(api)
        if step == 0:  # one judged window: nothing entered yet
            assert set(now.values()) == {"ok"}
    assert now[("device:pi-5", "feature:distance")] == "alarm"
    flagged = {k for k, v in now.items() if v != "ok" and k[0] != "fleet"}
    assert flagged == {("device:pi-5", "feature:distance")}
    with api.sessions() as s:
        entries = s.scalars(select(AuditEntry).where(AuditEntry.action == "drift.alert")).all()
        details = [json.loads(e.detail) for e in entries]
        assert any(d["scope"] == "device:pi-5" and d["to"] == "alarm" for d in details)
    r = api.get("/api/v1/drift/alerts", role="viewer", params={"level": "alarm"})
    assert r.status_code == 200, r.text
    body = r.json()
    device_alarm = [a for a in body["alerts"] if a["scope"] == "device:pi-5"]
    assert device_alarm and device_alarm[0]["subject"] == "feature:distance"
    assert (
        device_alarm[0]["recent"][-2:] == ["alarm", "alarm"] and device_alarm[0]["last_psi"] > 0.25
    )
    fleet = levels(api)[("fleet", "feature:distance")]
    assert device_alarm[0]["suppressed"] is (fleet == "alarm")


def test_small_windows_are_pooled_until_min_n_and_a_new_version_starts_fresh(api: Api) -> None:
    profile = publish_with_profile(api)
    rng = np.random.default_rng(1)
    feed(api, profile, T0, 1, rng, {"pi-1": 200})
    assert run(api, T0 + timedelta(minutes=1)).judged == 0
    assert set(levels(api).values()) == {"insufficient"}
    feed(api, profile, T0 + timedelta(minutes=2), 2, rng, {"pi-1": 200})
    assert run(api, T0 + timedelta(minutes=3)).judged == 0  # 400 pooled: still short
    feed(api, profile, T0 + timedelta(minutes=4), 3, rng, {"pi-1": 200})
    summary = run(api, T0 + timedelta(minutes=5))
    assert summary.judged == 2 * 4  # 600 pooled: the device and the fleet, every feature
    with api.sessions() as s:
        a = s.scalar(select(DriftAlert).where(DriftAlert.scope == "device:pi-1"))
        assert a is not None and a.pending_since == T0 + timedelta(minutes=5)
        digest = a.manifest_sha256
    # the same evaluation again: nothing new arrived, nothing judged
    assert run(api, T0 + timedelta(minutes=6)).judged == 0
    from tests.server.conftest import onnx_model, run_jobs, upload

    upload(api, "fraud", onnx_model(features=4, seed=9), version=2)
    run_jobs(api)
    with api.sessions() as s:
        assert {a.manifest_sha256 for a in s.scalars(select(DriftAlert))} == {digest}


def test_the_drift_worker_evaluates_under_its_lease(api: Api) -> None:
    from server.workers.drift import drift_loop

    profile = publish_with_profile(api)
    feed(api, profile, datetime.now(timezone.utc) - timedelta(minutes=1), 1,
         np.random.default_rng(2), dict.fromkeys(DEVICES, 600))  # fmt: skip
    a = drift_loop(api.sessions, api.settings, "replica-a")
    b = drift_loop(api.sessions, api.settings, "replica-b")
    assert a.run_once() and not b.run_once()
    assert len(levels(api)) == 6 * 4
    a.stop()
    b.stop()


def test_alert_filters_are_checked(api: Api) -> None:
    assert (
        api.get("/api/v1/drift/alerts", role="viewer", params={"level": "bad"}).status_code == 422
    )
    r = api.get("/api/v1/drift/alerts", role="viewer", params={"scope": "fleet"})
    assert r.status_code == 200 and r.json() == {"alerts": [], "total": 0}


def test_group_alerts_follow_the_devices_of_each_group(api: Api) -> None:
    for device in DEVICES:
        group = "east" if device in ("pi-4", "pi-5") else "west"
        body = {"device_class": "pi4", "device_id": device, "groups": [group]}
        r = api.post("/api/v1/devices", role="operator", json=body)
        assert r.status_code == 201, r.text
    profile = publish_with_profile(api)
    rng = np.random.default_rng(7)
    for step in range(2):
        at = T0 + timedelta(minutes=5 * step)
        records = [
            window(profile, d, step + 1, rng, {2: 1.0} if d in ("pi-4", "pi-5") else {}, 600)
            for d in DEVICES
        ]
        with api.sessions() as s:
            telemetry.ingest_batch(s, records, now=at + timedelta(seconds=1))
            s.commit()
        run(api, at + timedelta(minutes=1))
    now = levels(api)
    assert now[("group:east", "feature:distance")] == "alarm"
    assert {v for (scope, _), v in now.items() if scope == "group:west"} == {"ok"}
    r = api.get("/api/v1/drift/alerts", role="viewer", params={"scope": "group:east"})
    assert r.status_code == 200 and {a["scope"] for a in r.json()["alerts"]} == {"group:east"}
