"""Retraining: a model's policy (``/models/{name}/retrain-policy``) and the requests it fired."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

from fastapi import APIRouter, Path, Query

from server.api import schemas
from server.api.deps import Operator, Reader, SessionDep, SettingsDep
from server.api.routes.models import MODEL_NAME_PATTERN
from server.errors import NotFoundError
from server.services import retrain

router = APIRouter(tags=["retraining"])

ModelName = Annotated[str, Path(pattern=MODEL_NAME_PATTERN, max_length=64)]


@router.get("/models/{name}/retrain-policy", response_model=schemas.RetrainPolicyBody)
def get_policy(
    name: ModelName, session: SessionDep, settings: SettingsDep, _: Reader
) -> schemas.RetrainPolicyBody:
    """The model's retraining policy: set through the API, else from the server config (404)."""
    policy = retrain.get_policy(session, name, settings.retrain_policies)
    if policy is None:
        raise NotFoundError(f"model {name!r} has no retraining policy")
    return schemas.RetrainPolicyBody.model_validate(policy.to_dict())


@router.put("/models/{name}/retrain-policy", response_model=schemas.RetrainPolicyBody)
def put_policy(
    name: ModelName, body: schemas.RetrainPolicyBody, session: SessionDep, principal: Operator
) -> schemas.RetrainPolicyBody:
    """Set (replace) the model's retraining policy; audited."""
    policy = retrain.set_policy(
        session, name, body.model_dump(), principal.actor, datetime.now(timezone.utc)
    )
    session.commit()
    return schemas.RetrainPolicyBody.model_validate(policy.to_dict())


@router.get("/retrain-requests", response_model=schemas.RetrainRequestList)
def list_requests(
    session: SessionDep,
    _: Reader,
    model: Annotated[str | None, Query(pattern=MODEL_NAME_PATTERN, max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> schemas.RetrainRequestList:
    """Retraining requests, newest first."""
    rows = retrain.list_requests(session, model=model, limit=limit)
    return schemas.RetrainRequestList(
        requests=[schemas.RetrainRequestPublic.model_validate(retrain.present(r)) for r in rows]
    )


@router.get("/retrain-requests/{request_id}", response_model=schemas.RetrainRequestPublic)
def get_request(
    request_id: Annotated[str, Path(pattern="^[0-9a-f]{32}$")], session: SessionDep, _: Reader
) -> schemas.RetrainRequestPublic:
    """One request: its reason, evidence, dataset export and hook attempts."""
    return schemas.RetrainRequestPublic.model_validate(
        retrain.present(retrain.get_request(session, request_id))
    )
