"""Desired state: ``/api/v1/deployments`` and the per-target ``.../desired`` resources.

Shaped like hawkBit's assignments and Mender's deployments: a deployment
assigns one published model version (and optionally a shadow candidate) to a
device or a group; the newest one per target is its *desired state*, signed
by the director key and kept retained on the target's topic by the MQTT
publisher. The routes only call ``server.services.desired`` and poke this
replica's publisher (``app.state.mqtt``) so the message leaves at once; a
replica without an MQTT service leaves it to the one that has.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from edgefleet.topics import NAME_PATTERN
from server.api import present, schemas
from server.api.deps import Operator, Reader, SessionDep, SettingsDep
from server.errors import InvalidInputError, NotFoundError
from server.models import DesiredStateRow
from server.services import desired, fleet

router = APIRouter(tags=["deployments"])

Name = Annotated[str, Path(pattern=NAME_PATTERN, max_length=64)]
PUBLISH_WAIT_S = 3.0  # seconds an assignment waits for the broker's PUBACK before answering


def _publish(request: Request, row: DesiredStateRow) -> schemas.DeploymentPublic:
    """Poke this replica's publisher and wait briefly for the retained copy to land."""
    mqtt = getattr(request.app.state, "mqtt", None)
    if mqtt is not None:
        mqtt.poke()
        if mqtt.publisher.wait_published(row.id, PUBLISH_WAIT_S):
            with request.app.state.session_factory() as session:
                fresh = session.get(DesiredStateRow, row.id)
                if fresh is not None:
                    row = fresh
    return present.deployment(row)


def _assign(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    target: desired.Target,
    body: schemas.DesiredSet,
    actor: str,
) -> schemas.DeploymentPublic:
    row = desired.assign(
        session,
        settings,
        target,
        model=body.model,
        version=body.version,
        shadow=(body.shadow.model, body.shadow.version) if body.shadow else None,
        rollout_id=body.rollout_id,
        expires_days=body.expires_days,
        actor=actor,
    )
    return _publish(request, row)


@router.post("/deployments", response_model=schemas.DeploymentPublic, status_code=201)
def create_deployment(
    request: Request,
    body: schemas.DeploymentCreate,
    session: SessionDep,
    settings: SettingsDep,
    principal: Operator,
) -> schemas.DeploymentPublic:
    """Assign a published model version to a device or a group (signed, retained)."""
    t = body.target
    if (t.device is None) == (t.group is None):
        raise InvalidInputError('target must be exactly one of {"device": ID} or {"group": NAME}')
    target = (
        desired.Target("device", t.device)
        if t.device is not None
        else desired.Target("group", t.group or "")
    )
    return _assign(request, session, settings, target, body, principal.actor)


@router.get("/deployments", response_model=schemas.DeploymentList)
def list_deployments(
    session: SessionDep,
    _: Reader,
    device: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=64)] = None,
    group: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> schemas.DeploymentList:
    """Every desired state issued, newest first (``device`` or ``group`` narrows it)."""
    if device is not None and group is not None:
        raise InvalidInputError("filter by device or by group, not both")
    target = None
    if device is not None:
        target = desired.Target("device", device)
    elif group is not None:
        target = desired.Target("group", group)
    rows, total = desired.history(session, target=target, limit=limit, offset=offset)
    return schemas.DeploymentList(deployments=[present.deployment(r) for r in rows], total=total)


# ------------------------------------------------------------------ devices


@router.put("/devices/{device_id}/desired", response_model=schemas.DeploymentPublic)
def set_device_desired(
    request: Request,
    device_id: Name,
    body: schemas.DesiredSet,
    session: SessionDep,
    settings: SettingsDep,
    principal: Operator,
) -> schemas.DeploymentPublic:
    """Set what one device runs (overrides its groups' desired states)."""
    return _assign(
        request, session, settings, desired.Target("device", device_id), body, principal.actor
    )


@router.get("/devices/{device_id}/desired", response_model=schemas.DeviceDesired)
def get_device_desired(device_id: Name, session: SessionDep, _: Reader) -> schemas.DeviceDesired:
    """The device's own desired state, its groups' (priority order), and the one it follows."""
    device = fleet.get_device(session, device_id)
    own = desired.current(session, desired.Target("device", device_id))
    groups = [desired.current(session, desired.Target("group", g.group)) for g in device.groups]
    active = [r for r in [own, *groups] if r is not None and r.action != "clear"]
    return schemas.DeviceDesired(
        device_id=device_id,
        own=present.deployment(own) if own is not None else None,
        groups=[present.deployment(g) for g in groups if g is not None],
        effective=present.deployment(active[0]) if active else None,
    )


@router.delete("/devices/{device_id}/desired", response_model=schemas.DeploymentPublic)
def clear_device_desired(
    request: Request, device_id: Name, session: SessionDep, principal: Operator
) -> schemas.DeploymentPublic:
    """Clear the device's own desired state (it keeps what it runs, or follows its groups)."""
    row = desired.clear(session, desired.Target("device", device_id), actor=principal.actor)
    return _publish(request, row)


# ------------------------------------------------------------------- groups


@router.put("/groups/{group}/desired", response_model=schemas.DeploymentPublic)
def set_group_desired(
    request: Request,
    group: Name,
    body: schemas.DesiredSet,
    session: SessionDep,
    settings: SettingsDep,
    principal: Operator,
) -> schemas.DeploymentPublic:
    """Set what every device of a group runs (unless a device has its own)."""
    return _assign(
        request, session, settings, desired.Target("group", group), body, principal.actor
    )


@router.get("/groups/{group}/desired", response_model=schemas.DeploymentPublic)
def get_group_desired(group: Name, session: SessionDep, _: Reader) -> schemas.DeploymentPublic:
    """The group's current desired state."""
    row = desired.current(session, desired.Target("group", group))
    if row is None:
        raise NotFoundError(f"group {group!r} has no desired state")
    return present.deployment(row)


@router.delete("/groups/{group}/desired", response_model=schemas.DeploymentPublic)
def clear_group_desired(
    request: Request, group: Name, session: SessionDep, principal: Operator
) -> schemas.DeploymentPublic:
    """Clear the group's desired state (its devices keep what they run)."""
    row = desired.clear(session, desired.Target("group", group), actor=principal.actor)
    return _publish(request, row)
