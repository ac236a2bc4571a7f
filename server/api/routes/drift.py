"""``/api/v1/drift``: drift of a model version's telemetry, and the persisted drift alerts."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query

from edgefleet.ids import MAX_VERSION
from edgefleet.topics import NAME_PATTERN
from server.api import schemas
from server.api.deps import Reader, SessionDep
from server.api.routes.models import MODEL_NAME_PATTERN
from server.api.routes.telemetry import aware_utc
from server.services import alerts, drift

router = APIRouter(prefix="/drift", tags=["drift"])


@router.get("", response_model=schemas.DriftReport)
def drift_report(
    session: SessionDep,
    _: Reader,
    model: Annotated[str, Query(pattern=MODEL_NAME_PATTERN, max_length=64)],
    version: Annotated[int | None, Query(ge=1, le=MAX_VERSION)] = None,
    group: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=64)] = None,
    device_id: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=64)] = None,
    since: Annotated[datetime | None, Query(description="window_end >= since")] = None,
    until: Annotated[datetime | None, Query(description="window_end < until")] = None,
    min_n: Annotated[int, Query(ge=1, le=10_000_000)] = 500,
) -> schemas.DriftReport:
    """Statistics and verdicts per feature, for the scope and per device (docs/drift.md).

    ``version`` defaults to the newest published one. Read-only.
    """
    from server.analysis.verdict import Thresholds

    result = drift.report(
        session,
        model,
        version,
        group=group,
        device=device_id,
        since=aware_utc(since, "since"),
        until=aware_utc(until, "until"),
        thresholds=Thresholds(min_n=min_n),
    )
    return schemas.DriftReport.model_validate(result)


@router.get("/alerts", response_model=schemas.DriftAlertList)
def drift_alerts(
    session: SessionDep,
    _: Reader,
    model: Annotated[str | None, Query(pattern=MODEL_NAME_PATTERN, max_length=64)] = None,
    level: Annotated[str | None, Query(pattern="^(ok|warn|alarm|insufficient)$")] = None,
    scope: Annotated[
        str | None, Query(max_length=80, pattern=r"^(fleet|(device|group):[A-Za-z0-9._-]+)$")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> schemas.DriftAlertList:
    """Drift alerts, most severe first (the drift worker keeps them; docs/drift.md)."""
    rows, total, fleet = alerts.list_alerts(
        session, model=model, level=level, scope=scope, limit=limit
    )
    return schemas.DriftAlertList(
        alerts=[schemas.DriftAlertPublic.model_validate(alerts.present(a, fleet)) for a in rows],
        total=total,
    )


@router.get("/feedback", response_model=dict[str, Any])
def feedback_audit(
    session: SessionDep,
    _: Reader,
    model: Annotated[str, Query(pattern=MODEL_NAME_PATTERN, max_length=64)],
    version: Annotated[int | None, Query(ge=1, le=MAX_VERSION)] = None,
    since: Annotated[datetime | None, Query(description="window_end >= since")] = None,
    until: Annotated[datetime | None, Query(description="window_end < until")] = None,
) -> dict[str, Any]:
    """Label coverage and accuracy by predicted class: the hidden feedback loop (docs/drift.md)."""
    return drift.feedback_report(
        session, model, version, since=aware_utc(since, "since"), until=aware_utc(until, "until")
    )
