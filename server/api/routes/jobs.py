"""``/api/v1/jobs``: build-job progress."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query

from server.api import present, schemas
from server.api.deps import Reader, SessionDep
from server.models import Job, ModelVersion
from server.services import jobs

router = APIRouter(prefix="/jobs", tags=["jobs"])


def _public(session: SessionDep, job: Job) -> schemas.JobPublic:
    version = session.get(ModelVersion, job.version_id) if job.version_id is not None else None
    return present.job(
        job, version.model.name if version else None, version.version if version else None
    )


@router.get("", response_model=schemas.JobList)
def list_jobs(
    session: SessionDep,
    _: Reader,
    status: Annotated[Literal["queued", "running", "succeeded", "failed"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> schemas.JobList:
    """Newest jobs first."""
    return schemas.JobList(
        jobs=[_public(session, j) for j in jobs.list_jobs(session, status=status, limit=limit)]
    )


@router.get("/{job_id}", response_model=schemas.JobPublic)
def get_job(
    job_id: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")], session: SessionDep, _: Reader
) -> schemas.JobPublic:
    """One job: status, stage, progress (0..1), message, error."""
    return _public(session, jobs.get_job(session, job_id))
