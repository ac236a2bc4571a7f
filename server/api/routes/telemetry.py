"""``/api/v1/telemetry``: stored telemetry records by device, model version and window."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

from fastapi import APIRouter, Query

from edgefleet.ids import MAX_VERSION
from edgefleet.topics import NAME_PATTERN
from server.api import present, schemas
from server.api.deps import Reader, SessionDep
from server.api.routes.models import MODEL_NAME_PATTERN
from server.errors import InvalidInputError
from server.services import telemetry

router = APIRouter(prefix="/telemetry", tags=["telemetry"])


def aware_utc(value: datetime | None, what: str) -> datetime | None:
    """A time filter in UTC; a naive or unrepresentable one is refused naming the parameter."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise InvalidInputError(f"{what} needs a timezone (e.g. 2025-01-01T00:00:00Z)")
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise InvalidInputError(f"{what} is outside the years 1-9999 in UTC") from None


@router.get("", response_model=schemas.TelemetryList)
def query_telemetry(
    session: SessionDep,
    _: Reader,
    device_id: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=64)] = None,
    model: Annotated[str | None, Query(pattern=MODEL_NAME_PATTERN, max_length=64)] = None,
    version: Annotated[int | None, Query(ge=1, le=MAX_VERSION)] = None,
    since: Annotated[datetime | None, Query(description="window_end >= since")] = None,
    until: Annotated[datetime | None, Query(description="window_end < until")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> schemas.TelemetryList:
    """Records matching every filter, newest window first."""
    since, until = aware_utc(since, "since"), aware_utc(until, "until")
    rows, total = telemetry.query(
        session,
        device_id=device_id,
        model_name=model,
        model_version=version,
        since=since,
        until=until,
        limit=limit,
        offset=offset,
    )
    return schemas.TelemetryList(records=[present.telemetry(r) for r in rows], total=total)
