"""``/api/v1/devices``: enrollment, listing, groups/tags, decommissioning."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from edgefleet.topics import NAME_PATTERN
from server.api import present, schemas
from server.api.deps import Operator, Reader, SessionDep, SettingsDep
from server.services import broker, fleet

router = APIRouter(prefix="/devices", tags=["devices"])

DeviceId = Annotated[str, Path(pattern=NAME_PATTERN)]


def _broker(sync: broker.BrokerSync) -> schemas.BrokerPublic:
    return schemas.BrokerPublic(written=sync.written, reloaded=sync.reloaded, detail=sync.detail)


@router.post("", response_model=schemas.DeviceEnrolled, status_code=201)
def enroll(
    request: Request,
    body: schemas.DeviceCreate,
    session: SessionDep,
    settings: SettingsDep,
    principal: Operator,
) -> schemas.DeviceEnrolled:
    """Enroll a device: id, broker credentials (password shown once), trust root."""
    result = fleet.enroll(
        session,
        settings,
        device_class=body.device_class,
        device_id=body.device_id,
        groups=body.groups,
        tags=body.tags,
        actor=principal.actor,
    )
    sync = broker.reload_broker(settings)
    root = request.app.state.trust_roots.get()
    return schemas.DeviceEnrolled(
        device=present.device(result.device),
        mqtt_username=result.mqtt_username,
        mqtt_password=result.mqtt_password,
        mqtt_url=settings.effective_device_mqtt_url,
        trust_root=root.to_dict() if root is not None else None,
        broker=_broker(sync),
    )


@router.get("", response_model=schemas.DeviceList)
def list_devices(
    session: SessionDep,
    _: Reader,
    group: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=64)] = None,
    tag: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=64)] = None,
    device_class: Annotated[str | None, Query(pattern=NAME_PATTERN, max_length=64)] = None,
    online: Annotated[bool | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> schemas.DeviceList:
    """Devices matching every given filter, by id."""
    rows, total = fleet.list_devices(
        session,
        group=group,
        tag=tag,
        device_class=device_class,
        online=online,
        limit=limit,
        offset=offset,
    )
    return schemas.DeviceList(devices=[present.device(d) for d in rows], total=total)


@router.get("/{device_id}", response_model=schemas.DevicePublic)
def get_device(device_id: DeviceId, session: SessionDep, _: Reader) -> schemas.DevicePublic:
    """One device: facts, status, groups, tags."""
    return present.device(fleet.get_device(session, device_id))


@router.patch("/{device_id}", response_model=schemas.DevicePublic)
def update_device(
    device_id: DeviceId,
    body: schemas.DeviceUpdate,
    session: SessionDep,
    settings: SettingsDep,
    principal: Operator,
) -> schemas.DevicePublic:
    """Change class, groups or tags (a group change rewrites the broker ACL)."""
    device = fleet.update_device(
        session,
        settings,
        device_id,
        device_class=body.device_class,
        groups=body.groups,
        tags=body.tags,
        actor=principal.actor,
    )
    if body.groups is not None:
        broker.reload_broker(settings)
    return present.device(device)


@router.delete("/{device_id}", response_model=schemas.DeviceRemoved)
def remove_device(
    device_id: DeviceId, session: SessionDep, settings: SettingsDep, principal: Operator
) -> schemas.DeviceRemoved:
    """Decommission a device: its broker credentials stop working."""
    fleet.remove_device(session, settings, device_id, actor=principal.actor)
    return schemas.DeviceRemoved(id=device_id, broker=_broker(broker.reload_broker(settings)))
