"""``/api/v1/audit``: the audit log and its verification (admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from server.api import present, schemas
from server.api.deps import Admin, SessionDep
from server.services import audit

router = APIRouter(prefix="/audit", tags=["audit"])


@router.get("", response_model=schemas.AuditList)
def list_audit(
    session: SessionDep,
    _: Admin,
    after: Annotated[int, Query(ge=0, le=2**62)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> schemas.AuditList:
    """Entries after ``seq = after``, oldest first."""
    rows, total = audit.list_entries(session, after=after, limit=limit)
    return schemas.AuditList(entries=[present.audit_entry(e) for e in rows], total=total)


@router.get("/verify", response_model=schemas.AuditVerification)
def verify_audit(session: SessionDep, _: Admin) -> schemas.AuditVerification:
    """Walk the hash chain; list every edited, deleted or reordered entry."""
    report = audit.verify(session)
    return schemas.AuditVerification(
        ok=report.ok,
        entries=report.entries,
        head_seq=report.head_seq,
        head_hash=report.head_hash,
        problems=[
            schemas.AuditProblemPublic(seq=p.seq, kind=p.kind, message=p.message)
            for p in report.problems
        ],
    )
