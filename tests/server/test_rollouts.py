"""The rollout controller around the core: REST, reconcile passes, desired states, revert.

Devices are simulated at the database boundary (their status rows and
telemetry, as the MQTT ingester stores them); the desired states the
controller signs are the real ones. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select

from edgefleet.wire import LatencySummary, ModelRef, TelemetryRecord
from server.models import AuditEntry, DesiredStateRow, Device, RolloutEvent
from server.services import rollouts, telemetry
from tests.server.conftest import Api
from tests.server.test_desired import _enroll, _publish

DEVICES = [f"cam-{i}" for i in range(5)]


def setup(api: Api) -> None:
    for v in (1, 2, 3):  # 3: version 1's payload re-released above the candidate
        _publish(api, "m", v)
    for d in DEVICES:
        _enroll(api, d, ["g"])
    r = api.put("/api/v1/groups/g/desired", role="operator", json={"model": "m", "version": 1})
    assert r.status_code in (200, 201), r.text


def start(api: Api, **extra) -> dict:
    body = {"model": "m", "version": 2, "group": "g", "waves": [20, 100], "soak_s": 60,
            "device_timeout_s": 600, "decision_deadline_s": 600, "revert_to": 3,
            "gates": {"min_devices": 1, "metric": False}, **extra}  # fmt: skip
    r = api.post("/api/v1/rollouts", role="operator", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def reconcile(api: Api, at: datetime) -> None:
    with api.sessions() as s, s.begin():
        rollouts.reconcile(s, api.settings, at)


def device_reports(api: Api, device: str, version: int, kind: str, at: datetime) -> None:
    """What the ingester stores for a status message and a telemetry window."""
    with api.sessions() as s:
        row = s.get(Device, device)
        assert row is not None
        row.model_name, row.model_version = "m", version
        row.last_update = {"ts": at.timestamp(), "kind": kind, "desired_version": None,
                           "model": {"name": "m", "version": version}, "reason": None}  # fmt: skip
        row.last_seen = at
        latency = LatencySummary(500, 1.0, 1.0, 2.0, 3.0, 4.0)
        record = TelemetryRecord(device, int(at.timestamp()), at.timestamp() - 60,
                                 at.timestamp() + 120, ModelRef("m", version), predictions=500,
                                 latency_ms=latency)  # fmt: skip
        telemetry.ingest_batch(s, [record], now=at)
        s.commit()


def desired_versions(api: Api, device: str) -> list[int | None]:
    with api.sessions() as s:
        return [r.model_version for r in s.scalars(
            select(DesiredStateRow).where(DesiredStateRow.target_kind == "device",
                                          DesiredStateRow.target_name == device)
            .order_by(DesiredStateRow.version))]  # fmt: skip


def show(api: Api, rollout_id: str) -> dict:
    r = api.get(f"/api/v1/rollouts/{rollout_id}", role="viewer")
    assert r.status_code == 200, r.text
    return r.json()


def test_a_good_rollout_takes_every_wave_through_signed_desired_states(api: Api) -> None:
    setup(api)
    ro = start(api)
    assert ro["status"] == "running" and ro["spec"]["previous"] == 1
    T0 = datetime.fromisoformat(ro["created_at"])  # the rollout's clock starts here
    reconcile(api, T0)
    body = show(api, ro["id"])
    canary = [d for d, s in body["devices"].items() if s["status"] == "notified"]
    assert len(canary) == 1
    assert desired_versions(api, canary[0]) == [2]
    assert all(desired_versions(api, d) == [] for d in DEVICES if d not in canary)
    for d in DEVICES:
        if d not in canary:
            device_reports(api, d, 1, "committed", T0 + timedelta(seconds=10))  # control on v1
    device_reports(api, canary[0], 2, "committed", T0 + timedelta(seconds=10))
    reconcile(api, T0 + timedelta(seconds=20))
    assert show(api, ro["id"])["devices"][canary[0]]["status"] == "soaking"
    reconcile(api, T0 + timedelta(seconds=100))  # soaked with telemetry: wave 0 passes
    body = show(api, ro["id"])
    assert body["wave"] == 1, body["reason"]
    reconcile(api, T0 + timedelta(seconds=110))  # wave 1 takes the rest
    for d in DEVICES:
        assert desired_versions(api, d)[-1] == 2
        if d not in canary:
            device_reports(api, d, 2, "committed", T0 + timedelta(seconds=120))
    reconcile(api, T0 + timedelta(seconds=130))
    reconcile(api, T0 + timedelta(seconds=300))
    body = show(api, ro["id"])
    assert body["status"] == "completed", body["reason"]
    assert body["device_counts"] == {"succeeded": 5}
    kinds = [e["detail"].get("decision") for e in body["events"] if e["kind"] == "decision"]
    assert kinds == ["advance", "complete"]
    with api.sessions() as s:
        actions = {a.action for a in s.scalars(select(AuditEntry))}
    assert {"rollout.start", "rollout.gates", "rollout.decision"} <= actions


def test_a_failed_canary_aborts_and_is_reverted_above_its_floor(api: Api) -> None:
    setup(api)
    ro = start(api)
    T0 = datetime.fromisoformat(ro["created_at"])
    reconcile(api, T0)
    (canary,) = [d for d, s in show(api, ro["id"])["devices"].items() if s["status"] == "notified"]
    device_reports(api, canary, 1, "rolled-back", T0 + timedelta(seconds=5))
    reconcile(api, T0 + timedelta(seconds=10))
    body = show(api, ro["id"])
    assert body["status"] == "aborting" and "first wave" in body["reason"]
    assert desired_versions(api, canary) == [2, 3]  # the re-release, above the candidate
    others = [d for d in DEVICES if d != canary]
    assert all(desired_versions(api, d) == [] for d in others)  # never told of version 2
    device_reports(api, canary, 3, "committed", T0 + timedelta(seconds=30))
    reconcile(api, T0 + timedelta(seconds=40))
    body = show(api, ro["id"])
    assert body["status"] == "reverted" and body["devices"][canary]["status"] == "reverted"
    r = api.post(f"/api/v1/rollouts/{ro['id']}/resume", role="operator")
    assert r.status_code == 409


def test_commands_are_taken_by_the_next_pass_and_checked(api: Api) -> None:
    setup(api)
    ro = start(api)
    T0 = datetime.fromisoformat(ro["created_at"])
    reconcile(api, T0)
    r = api.post(f"/api/v1/rollouts/{ro['id']}/pause", role="operator")
    assert r.status_code == 200 and r.json()["pending_command"]["command"] == "pause"
    assert api.post(f"/api/v1/rollouts/{ro['id']}/pause", role="viewer").status_code == 403
    reconcile(api, T0 + timedelta(seconds=1))
    body = show(api, ro["id"])
    assert body["status"] == "paused" and body["pending_command"] is None
    assert "paused by" in body["reason"]
    second = api.post("/api/v1/rollouts", role="operator",
                      json={"model": "m", "version": 2, "group": "g"})  # fmt: skip
    assert second.status_code == 422 and "has not finished" in second.text
    bad = api.post("/api/v1/rollouts", role="operator",
                   json={"model": "m", "version": 2, "group": "g", "waves": [50, 20]})  # fmt: skip
    assert bad.status_code == 422
    with api.sessions() as s:
        assert s.scalars(select(RolloutEvent)).first() is not None
    listing = api.get("/api/v1/rollouts", role="viewer").json()["rollouts"]
    assert [x["id"] for x in listing] == [ro["id"]]
