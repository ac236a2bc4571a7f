"""Rollouts: start, list, show, and the operators' commands (``/rollouts``)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query

from server.api import schemas
from server.api.deps import Operator, Reader, SessionDep
from server.services import rollouts

router = APIRouter(tags=["rollouts"])

RolloutId = Annotated[str, Path(pattern="^[0-9a-f]{32}$")]


@router.post("/rollouts", response_model=schemas.RolloutPublic, status_code=201)
def start(
    body: schemas.RolloutCreate, session: SessionDep, principal: Operator
) -> schemas.RolloutPublic:
    """Start a rollout; the controller takes its first wave on its next pass; audited."""
    fields = body.model_dump()
    if body.previous is None:
        del fields["previous"]  # the group's current version
    r = rollouts.create(session, fields, actor=principal.actor, now=datetime.now(timezone.utc))
    session.commit()
    return schemas.RolloutPublic.model_validate(rollouts.present(session, r))


@router.get("/rollouts", response_model=schemas.RolloutList)
def list_rollouts(
    session: SessionDep, _: Reader, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> schemas.RolloutList:
    """Rollouts, newest first."""
    rows = rollouts.list_rollouts(session, limit=limit)
    return schemas.RolloutList(
        rollouts=[schemas.RolloutPublic.model_validate(rollouts.present(session, r, events=0))
                  for r in rows]
    )  # fmt: skip


@router.get("/rollouts/{rollout_id}", response_model=schemas.RolloutPublic)
def show(rollout_id: RolloutId, session: SessionDep, _: Reader) -> schemas.RolloutPublic:
    """A rollout: waves, per-device states, the latest gate evaluation and decisions."""
    r = rollouts.get_rollout(session, rollout_id)
    return schemas.RolloutPublic.model_validate(rollouts.present(session, r))


@router.post("/rollouts/{rollout_id}/{command}", response_model=schemas.RolloutPublic)
def command(
    rollout_id: RolloutId,
    command: Literal["pause", "resume", "abort", "promote"],
    session: SessionDep,
    principal: Operator,
) -> schemas.RolloutPublic:
    """Queue pause, resume, abort or promote for the controller's next pass; audited."""
    r = rollouts.request_command(
        session, rollout_id, command, actor=principal.actor, now=datetime.now(timezone.utc)
    )
    session.commit()
    return schemas.RolloutPublic.model_validate(rollouts.present(session, r))
