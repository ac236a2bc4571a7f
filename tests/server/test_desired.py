"""Desired state: assignment through the REST API and CLI, versions, signatures, audit.

Runs on SQLite and PostgreSQL. The MQTT side is in test_mqtt_service.py.
"""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from edgefleet.topics import DeviceTopic, GroupTopic
from edgefleet.trust import TrustRoot, verify_desired_state
from server.services import desired
from tests.server.conftest import Api, Keys, make_api, make_settings, onnx_model, run_jobs, upload


def _publish(api: Api, name: str = "m", version: int = 1, **form: Any) -> None:
    assert upload(api, name, onnx_model(seed=version), version=version, **form).status_code == 202
    run_jobs(api)


def _enroll(api: Api, device: str, groups: list[str] | None = None, klass: str = "cam") -> None:
    r = api.post(
        "/api/v1/devices",
        role="operator",
        json={"device_id": device, "device_class": klass, "groups": groups or []},
    )
    assert r.status_code == 201, r.text


def _payload(api: Api, kind: str, name: str) -> bytes:
    with api.sessions() as s:
        row = desired.current(s, desired.Target(kind, name))  # type: ignore[arg-type]
        assert row is not None
        return bytes(row.payload)


def test_put_device_desired_signs_versions_and_audits(api: Api, keys: Keys) -> None:
    _publish(api, "m", 1)
    _publish(api, "m", 2)
    _enroll(api, "d1", ["lobby"])
    r = api.client.put(
        "/api/v1/devices/d1/desired",
        headers=api.headers("operator"),
        json={"model": "m", "version": 1, "rollout_id": "r-1"},
    )
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["version"] == 1 and first["target"] == {"device": "d1"}
    assert first["bundle_id"] == "m-1" and first["topic"] == str(DeviceTopic.desired("d1"))
    assert first["published_at"] is None  # no MQTT service in this replica
    r = api.client.put(
        "/api/v1/devices/d1/desired",
        headers=api.headers("operator"),
        json={"model": "m", "version": 2, "shadow": {"model": "m", "version": 1}},
    )
    assert r.json()["version"] == 2 and r.json()["shadow"]["bundle_id"] == "m-1"
    state = verify_desired_state(
        _payload(api, "device", "d1"),
        trust_root=TrustRoot.from_bytes(keys.trust_root.read_bytes()),
        now=datetime.now(timezone.utc),
        topic=DeviceTopic.desired("d1"),
        device_id="d1",
        groups=["lobby"],
        floor=1,
    )
    assert state.version == 2 and state.model.version == 2 and state.shadow is not None
    version = api.get("/api/v1/models/m/versions/2").json()
    assert state.bundle.sha256 == version["bundle"]["sha256"]
    assert state.bundle.size == version["bundle"]["size"]
    actions = [e["action"] for e in api.get("/api/v1/audit").json()["entries"]]
    assert actions.count("desired.assign") == 2
    assert api.get("/api/v1/audit/verify").json()["ok"]


def test_group_deployment_and_effective_state(api: Api) -> None:
    _publish(api, "m", 1)
    _publish(api, "m", 2)
    _enroll(api, "d1", ["canary", "eu"])
    r = api.post(
        "/api/v1/deployments",
        role="operator",
        json={"target": {"group": "eu"}, "model": "m", "version": 1},
    )
    assert r.status_code == 201 and r.json()["topic"] == str(GroupTopic("eu"))
    view = api.get("/api/v1/devices/d1/desired", role="viewer").json()
    assert view["own"] is None and view["effective"]["target"] == {"group": "eu"}
    api.client.put(
        "/api/v1/groups/canary/desired",
        headers=api.headers("operator"),
        json={"model": "m", "version": 2},
    )
    view = api.get("/api/v1/devices/d1/desired", role="viewer").json()
    assert [g["target"] for g in view["groups"]] == [{"group": "canary"}, {"group": "eu"}]
    assert view["effective"]["target"] == {"group": "canary"}
    api.client.put(
        "/api/v1/devices/d1/desired",
        headers=api.headers("operator"),
        json={"model": "m", "version": 1},
    )
    assert api.get("/api/v1/devices/d1/desired").json()["effective"]["target"] == {"device": "d1"}
    # clearing the device's own state falls back to the groups
    cleared = api.delete("/api/v1/devices/d1/desired", role="operator").json()
    assert cleared["action"] == "clear" and cleared["version"] == 2 and cleared["model"] is None
    assert api.get("/api/v1/devices/d1/desired").json()["effective"]["target"] == {
        "group": "canary"
    }
    assert _payload(api, "device", "d1") == b""
    listing = api.get("/api/v1/deployments", params={"device": "d1"}).json()
    assert listing["total"] == 2 and listing["deployments"][0]["action"] == "clear"
    assert api.get("/api/v1/deployments", params={"group": "eu"}).json()["total"] == 1
    assert api.get("/api/v1/deployments").json()["total"] == 4
    with api.sessions() as s:
        assert desired.allowed_bundles(s, "d1") == {"m-1", "m-2"}
        assert desired.allowed_bundles(s, "nobody") == frozenset()


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "needle"),
    [
        ("PUT", "/api/v1/devices/ghost/desired", {"model": "m", "version": 1}, 404, "ghost"),
        ("PUT", "/api/v1/devices/d1/desired", {"model": "nope", "version": 1}, 404, "nope"),
        ("PUT", "/api/v1/devices/d1/desired", {"model": "m", "version": 9}, 404, "version 9"),
        ("PUT", "/api/v1/devices/d1/desired", {"model": "m", "version": 3}, 409, "not published"),
        ("PUT", "/api/v1/devices/gw1/desired", {"model": "m", "version": 1}, 422, "device classes"),
        (
            "PUT",
            "/api/v1/devices/d1/desired",
            {"model": "m", "version": 1, "shadow": {"model": "m", "version": 3}},
            409,
            "shadow",
        ),
        ("POST", "/api/v1/deployments", {"target": {}, "model": "m", "version": 1}, 422, "target"),
        (
            "POST",
            "/api/v1/deployments",
            {"target": {"device": "d1", "group": "g"}, "model": "m", "version": 1},
            422,
            "exactly one",
        ),
        ("PUT", "/api/v1/groups/a%2Fb/desired", {"model": "m", "version": 1}, 404, ""),
        ("PUT", "/api/v1/groups/g/desired", {"model": "m", "version": 1, "x": 1}, 422, "x"),
        ("DELETE", "/api/v1/groups/never/desired", None, 404, "no desired state"),
    ],
)
def test_assignment_refusals_change_nothing(
    api: Api, method: str, path: str, body: Any, status: int, needle: str
) -> None:
    _publish(api, "m", 1, device_classes="cam")
    # version 3 stays awaiting signatures (offline signing): not assignable
    upload(api, "m", onnx_model(seed=3), version=3, signing="offline")
    run_jobs(api)
    _enroll(api, "d1")
    _enroll(api, "gw1", klass="gateway")
    before = api.get("/api/v1/deployments").json()["total"]
    r = api.client.request(method, path, headers=api.headers("operator"), json=body)
    assert r.status_code == status, r.text
    assert needle in r.text
    assert api.get("/api/v1/deployments").json()["total"] == before


def test_no_director_key_is_503(tmp_path: Path, db_url: str, keys: Keys, engine: Any) -> None:
    settings = make_settings(tmp_path, db_url, keys, director_keys=[])
    api = make_api(settings, engine)
    with api.client:
        _publish(api, "m", 1)
        _enroll(api, "d1")
        r = api.client.put(
            "/api/v1/devices/d1/desired",
            headers=api.headers("operator"),
            json={"model": "m", "version": 1},
        )
        assert r.status_code == 503 and "director key" in r.json()["detail"]


def test_wrong_director_key_is_refused_before_storing(
    tmp_path: Path, db_url: str, keys: Keys, engine: Any
) -> None:
    settings = make_settings(tmp_path, db_url, keys, director_keys=keys.release)
    api = make_api(settings, engine)
    with api.client:
        _publish(api, "m", 1)
        _enroll(api, "d1")
        r = api.client.put(
            "/api/v1/devices/d1/desired",
            headers=api.headers("operator"),
            json={"model": "m", "version": 1},
        )
        assert r.status_code == 503 and "director role" in r.json()["detail"]
        assert api.get("/api/v1/deployments").json()["total"] == 0


def test_concurrent_assignments_get_distinct_increasing_versions(api: Api) -> None:
    _publish(api, "m", 1)
    errors: list[BaseException] = []
    versions: list[int] = []

    def replica() -> None:
        try:
            for _ in range(4):
                with api.sessions() as s:
                    row = desired.assign(
                        s, api.settings, desired.Target("group", "all"), model="m", version=1,
                        actor="test",
                    )  # fmt: skip
                    versions.append(row.version)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=replica) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(versions) == list(range(1, 13))


def test_cli_deploy_ls_and_device_desired(
    tmp_path: Path, db_url: str, keys: Keys, engine: Any, capsys: Any
) -> None:
    from tests.server.test_cli import _live, run

    for live in _live(tmp_path, db_url, keys, engine):
        _publish(live.api, "m", 1)
        _enroll(live.api, "d1", ["west"])
        code, out = run(capsys, live, "deploy", "m", "1", "--group", "west", role="operator")
        assert code == 0 and out["version"] == 1 and out["target"] == {"group": "west"}
        code, out = run(
            capsys, live, "deploy", "m", "1", "--device", "d1", "--shadow", "m:1",
            "--rollout-id", "canary-1", role="operator",
        )  # fmt: skip
        assert code == 0 and out["shadow"]["model"] == "m" and out["rollout_id"] == "canary-1"
        code, out = run(capsys, live, "deployments", "ls", "--device", "d1", role="viewer")
        assert code == 0 and out["total"] == 1
        code, out = run(capsys, live, "devices", "desired", "d1", role="viewer")
        assert code == 0 and out["effective"]["target"] == {"device": "d1"}
        code, text = run(capsys, live, "deployments", "ls", role="viewer", as_json=False)
        assert code == 0 and "west" in text and "d1" in text
        code, out = run(capsys, live, "deploy", "m", "7", "--device", "d1", role="operator")
        assert code == 1 and "version 7" in out["message"]
        code, out = run(capsys, live, "deploy", "m", "1", "--device", "d1", role="viewer")
        assert code == 1 and out["status"] == 403


def test_replicas_reissuing_at_once_make_one_new_version(api: Api) -> None:
    _publish(api, "m", 1)
    with api.sessions() as s:
        desired.assign(s, api.settings, desired.Target("group", "g"), model="m", version=1,
                       expires_days=1, actor="test")  # fmt: skip
    made: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def replica() -> None:
        try:
            barrier.wait()
            with api.sessions() as s:
                made.extend(r.version for r in desired.reissue_due(s, api.settings))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=replica) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and made == [2]
    listing = api.get("/api/v1/deployments", params={"group": "g"}).json()
    assert [d["action"] for d in listing["deployments"]] == ["reissue", "assign"]


def test_an_expired_bundle_is_not_assigned(api: Api) -> None:
    """Devices refuse an expired bundle: the assignment is refused, nothing stored."""
    from datetime import timedelta

    from server.errors import ConflictError

    _publish(api, "m", 1, expires_days=1)
    _enroll(api, "d1")
    later = datetime.now(timezone.utc) + timedelta(days=2)
    with api.sessions() as s, pytest.raises(ConflictError, match="expired"):
        desired.assign(s, api.settings, desired.Target("device", "d1"), model="m", version=1,
                       actor="test", now=later)  # fmt: skip
    assert api.get("/api/v1/deployments").json()["total"] == 0
    with api.sessions() as s:  # still within its lifetime today
        desired.assign(s, api.settings, desired.Target("device", "d1"), model="m", version=1,
                       actor="test")  # fmt: skip


def test_a_lost_race_on_a_unique_row_is_409_not_500(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two enrollments of one id at once: the service's check passes in both (PostgreSQL)."""
    from sqlalchemy.orm import Session

    from server.models import Device

    _enroll(api, "d1")
    audit_before = api.get("/api/v1/audit/verify", role="admin").json()["entries"]
    real_get = Session.get

    def racing_get(self: Session, entity: Any, ident: Any, **kw: Any) -> Any:
        if entity is Device and ident == "d1":
            return None  # as if the other request had not committed yet
        return real_get(self, entity, ident, **kw)

    monkeypatch.setattr(Session, "get", racing_get)
    r = api.post(
        "/api/v1/devices", role="operator", json={"device_id": "d1", "device_class": "cam"}
    )
    monkeypatch.undo()
    assert r.status_code == 409 and "concurrent request" in r.json()["detail"], r.text
    devices = api.get("/api/v1/devices").json()["devices"]
    assert [d["id"] for d in devices] == ["d1"]
    assert api.get("/api/v1/audit/verify", role="admin").json()["entries"] == audit_before
