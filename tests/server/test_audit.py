"""Audit chain: every mutation is logged; edits, deletions and reorders are detected."""

from __future__ import annotations

from sqlalchemy import delete, select, update

from server.models import AuditEntry
from server.services import audit
from tests.server.conftest import Api, onnx_model, upload


def _populate(sessions, n: int = 6) -> None:
    with sessions() as s:
        for i in range(n):
            audit.record(s, "tester", "thing.do", f"thing/{i}", {"i": i})
        s.commit()


def _verify(sessions) -> audit.AuditReport:
    with sessions() as s:
        return audit.verify(s)


def test_intact_chain_verifies(sessions) -> None:
    _populate(sessions)
    report = _verify(sessions)
    assert report.ok and report.entries == 6 and report.head_seq == 6


def test_empty_log_verifies(sessions) -> None:
    assert _verify(sessions).ok


def test_audit_edited_entry_detected(sessions) -> None:
    _populate(sessions)
    with sessions() as s:
        s.execute(update(AuditEntry).where(AuditEntry.seq == 3).values(actor="someone-else"))
        s.commit()
    report = _verify(sessions)
    assert [(p.seq, p.kind) for p in report.problems] == [(3, "edited")]
    assert "entry 3" in report.problems[0].message


def test_audit_edited_and_rehashed_entry_detected(sessions) -> None:
    _populate(sessions)
    with sessions() as s:
        e = s.get(AuditEntry, 2)
        e.detail = '{"i":99}'
        e.hash = audit.entry_hash(e.seq, e.at, e.actor, e.action, e.target, e.detail, e.prev_hash)
        s.commit()
    report = _verify(sessions)
    assert (3, "reordered") in [(p.seq, p.kind) for p in report.problems]


def test_audit_deleted_entry_detected(sessions) -> None:
    _populate(sessions)
    with sessions() as s:
        s.execute(delete(AuditEntry).where(AuditEntry.seq == 4))
        s.commit()
    report = _verify(sessions)
    assert not report.ok
    assert report.problems[0].seq == 4 and report.problems[0].kind == "deleted"


def test_audit_deleted_newest_entry_detected(sessions) -> None:
    _populate(sessions)
    with sessions() as s:
        s.execute(delete(AuditEntry).where(AuditEntry.seq == 6))
        s.commit()
    report = _verify(sessions)
    assert [(p.seq, p.kind) for p in report.problems] == [(6, "truncated")]


def test_audit_reordered_entries_detected(sessions) -> None:
    _populate(sessions)
    with sessions() as s:
        a, b = s.get(AuditEntry, 2), s.get(AuditEntry, 5)
        fields = ("at", "actor", "action", "target", "detail", "prev_hash", "hash")
        va, vb = ({f: getattr(x, f) for f in fields} for x in (a, b))
        for f in fields:
            setattr(a, f, vb[f])
            setattr(b, f, va[f])
        s.commit()
    report = _verify(sessions)
    kinds = {(p.seq, p.kind) for p in report.problems}
    assert {(2, "reordered"), (5, "reordered")} <= kinds
    assert "written as entry 5" in next(p.message for p in report.problems if p.seq == 2)


def test_every_mutation_is_audited(api: Api) -> None:
    upload(api, "m", onnx_model())
    api.post("/api/v1/tokens", json={"name": "x", "role": "viewer"})
    api.post("/api/v1/devices", role="operator", json={"device_class": "cam", "device_id": "d1"})
    api.patch("/api/v1/devices/d1", role="operator", json={"tags": ["a"]})
    api.delete("/api/v1/devices/d1", role="operator")
    with api.sessions() as s:
        actions = [e.action for e in s.scalars(select(AuditEntry).order_by(AuditEntry.seq))]
    # the first four are the fixture's token creations
    assert actions[4:] == [
        "model.create",
        "version.submit",
        "token.create",
        "device.enroll",
        "device.update",
        "device.remove",
    ]
    r = api.get("/api/v1/audit/verify")
    assert r.json()["ok"] is True and r.json()["entries"] == len(actions)


def test_audit_verify_endpoint_reports_tampering(api: Api) -> None:
    api.post("/api/v1/tokens", json={"name": "x", "role": "viewer"})
    with api.sessions() as s:
        s.execute(update(AuditEntry).where(AuditEntry.seq == 5).values(target="token/forged"))
        s.commit()
    body = api.get("/api/v1/audit/verify").json()
    assert body["ok"] is False
    assert body["problems"][0]["seq"] == 5 and body["problems"][0]["kind"] == "edited"
    listing = api.get("/api/v1/audit", params={"after": 4}).json()
    assert listing["entries"][0]["target"] == "token/forged"


def test_concurrent_appends_never_fork_the_chain(sessions) -> None:
    import threading

    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(10):
                with sessions() as s:
                    audit.record(s, f"replica-{n}", "thing.do", f"thing/{n}/{i}")
                    s.commit()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    report = _verify(sessions)
    assert report.ok and report.entries == 40 and report.head_seq == 40
