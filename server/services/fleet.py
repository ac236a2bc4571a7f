"""Fleet: enrollment, groups and tags, device facts and online status.

Flow: ``enroll`` creates a device with a fresh broker password (returned once,
stored only as a ``$7$`` hash), rewrites the broker's password and ACL files
and commits; the caller then calls ``broker.reload_broker``. ``update_device``
and ``remove_device`` do the same for changes. The MQTT ingester calls
``record_status`` for every status message (including the broker's
``offline`` last will) and ``record_facts`` for every facts message.

Invariants: a device id is also its broker username and a topic level, so it
must pass ``edgefleet.topics.validate_device_id`` (no wildcards, ``/`` or
``$``); group names pass ``validate_group``; tags use the same alphabet.
Status messages are applied only if newer (by the device's ``ts``) than the
last one applied, so a late, out-of-order ``offline`` cannot hide a newer
``online``. Messages for unknown devices change nothing.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgefleet.topics import TopicError, validate_device_id, validate_group
from edgefleet.wire import DeviceFactsMessage, StatusMessage
from server import metrics
from server.errors import ConflictError, InvalidInputError, NotFoundError, UnavailableError
from server.models import Device, DeviceGroup, DeviceTag
from server.services import audit, broker
from server.settings import Settings

__all__ = [
    "Enrollment",
    "enroll",
    "get_device",
    "list_devices",
    "record_facts",
    "record_status",
    "remove_device",
    "update_device",
]

MAX_GROUPS = 32
MAX_TAGS = 32


@dataclass(frozen=True)
class Enrollment:
    """A new device and the credentials it needs (the password is shown only here)."""

    device: Device
    mqtt_username: str
    mqtt_password: str


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _names(values: Sequence[str], what: str, limit: int) -> list[str]:
    if len(values) > limit:
        raise InvalidInputError(f"at most {limit} {what}s per device")
    out = []
    for value in values:
        try:
            out.append(validate_group(value))
        except TopicError as exc:
            raise InvalidInputError(str(exc).replace("group name", what)) from None
    return sorted(set(out))


def _device_class(value: str) -> str:
    try:
        return validate_device_id(value)
    except TopicError as exc:
        raise InvalidInputError(str(exc).replace("device id", "device class")) from None


def _require_broker(settings: Settings) -> None:
    if not broker.broker_files_configured(settings):
        raise UnavailableError(
            "enrollment needs EDGEFLEET_MOSQUITTO_PASSWORD_FILE and EDGEFLEET_MOSQUITTO_ACL_FILE "
            "(the broker files this server manages)"
        )


def enroll(
    session: Session,
    settings: Settings,
    *,
    device_class: str,
    device_id: str | None = None,
    groups: Sequence[str] = (),
    tags: Sequence[str] = (),
    actor: str,
) -> Enrollment:
    """Create a device with broker credentials and commit (files written under lock).

    Raises:
        InvalidInputError: a bad device id, class, group or tag.
        ConflictError: the id is taken (or is the server's own broker username).
        UnavailableError: this server does not manage broker files.
        OSError: the broker files could not be written (nothing was committed).
    """
    _require_broker(settings)
    if device_id is None:
        device_id = f"dev-{secrets.token_hex(6)}"
    try:
        validate_device_id(device_id)
    except TopicError as exc:
        raise InvalidInputError(str(exc)) from None
    klass = _device_class(device_class)
    group_names = _names(groups, "group", MAX_GROUPS)
    tag_names = _names(tags, "tag", MAX_TAGS)
    if settings.is_reserved_device_id(device_id):
        raise ConflictError(
            f"device id {device_id!r} is in the server's broker namespace "
            f"({settings.mqtt_username!r} and '{settings.mqtt_username}-*' are reserved for "
            "the replicas' logins and client ids)"
        )
    if session.get(Device, device_id) is not None:
        raise ConflictError(f"device {device_id!r} is already enrolled")
    password = secrets.token_urlsafe(24)
    device = Device(
        id=device_id,
        device_class=klass,
        password_hash=broker.hash_password(password),
        enrolled_at=_now(),
        enrolled_by=actor,
        online=False,
        groups=[DeviceGroup(group=g) for g in group_names],
        tags=[DeviceTag(tag=t) for t in tag_names],
    )
    session.add(device)
    audit.record(
        session,
        actor,
        "device.enroll",
        f"device/{device_id}",
        {"device_class": klass, "groups": group_names, "tags": tag_names},
    )
    with broker.sync_broker_files(session, settings):
        session.commit()
    return Enrollment(device, device_id, password)


def get_device(session: Session, device_id: str) -> Device:
    """Raises NotFoundError when the device is not enrolled."""
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"no device {device_id!r}")
    return device


def list_devices(
    session: Session,
    *,
    group: str | None = None,
    tag: str | None = None,
    device_class: str | None = None,
    online: bool | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[Device], int]:
    """Devices matching every given filter, by id, and the number matching."""
    query = select(Device)
    if group is not None:
        query = query.where(Device.groups.any(DeviceGroup.group == group))
    if tag is not None:
        query = query.where(Device.tags.any(DeviceTag.tag == tag))
    if device_class is not None:
        query = query.where(Device.device_class == device_class)
    if online is not None:
        query = query.where(Device.online.is_(online))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.scalars(query.order_by(Device.id).limit(limit).offset(offset)).all()
    return list(rows), int(total)


def update_device(
    session: Session,
    settings: Settings,
    device_id: str,
    *,
    device_class: str | None = None,
    groups: Sequence[str] | None = None,
    tags: Sequence[str] | None = None,
    actor: str,
) -> Device:
    """Change a device's class, groups or tags and commit (broker ACL rewritten).

    Raises:
        NotFoundError: no such device.
        InvalidInputError: a bad class, group or tag (nothing changes).
        OSError: the broker files could not be written (nothing was committed).
    """
    device = get_device(session, device_id)
    klass = _device_class(device_class) if device_class is not None else None
    group_names = _names(groups, "group", MAX_GROUPS) if groups is not None else None
    tag_names = _names(tags, "tag", MAX_TAGS) if tags is not None else None
    changes: dict[str, object] = {}
    if klass is not None and klass != device.device_class:
        changes["device_class"] = klass
        device.device_class = klass
    if group_names is not None and group_names != [g.group for g in device.groups]:
        changes["groups"] = group_names
        device.groups = [DeviceGroup(group=g) for g in group_names]
    if tag_names is not None and tag_names != [t.tag for t in device.tags]:
        changes["tags"] = tag_names
        device.tags = [DeviceTag(tag=t) for t in tag_names]
    if not changes:
        return device
    audit.record(session, actor, "device.update", f"device/{device_id}", changes)
    if "groups" in changes and broker.broker_files_configured(settings):
        with broker.sync_broker_files(session, settings):
            session.commit()
    else:
        session.commit()
    return device


def remove_device(session: Session, settings: Settings, device_id: str, *, actor: str) -> None:
    """Decommission a device: its broker credentials stop working after the reload.

    Telemetry rows are kept (they age out with the retention policy).

    Raises:
        NotFoundError: no such device.
        OSError: the broker files could not be written (nothing was committed).
    """
    device = get_device(session, device_id)
    session.delete(device)
    audit.record(session, actor, "device.remove", f"device/{device_id}", {})
    with broker.sync_broker_files(session, settings):
        session.commit()


def record_status(session: Session, message: StatusMessage, *, now: datetime | None = None) -> bool:
    """Apply a status message (online/offline, running model, last update step).

    Called by the MQTT ingester for ``devices/{id}/status`` (retained, and the
    broker's last will). The caller commits.

    Returns:
        True if the device exists and the message was newer than the last one applied.
    """
    device = session.get(Device, message.device_id, with_for_update=True)
    if device is None:
        return False
    ts = datetime.fromtimestamp(message.ts, timezone.utc)
    if device.status_at is not None and ts <= device.status_at:
        return False
    device.status_at = ts
    device.last_seen = now or _now()
    device.online = message.state == "online"
    if message.agent_version is not None:
        device.agent_version = message.agent_version
    if message.model is not None:
        device.model_name, device.model_version = message.model.name, message.model.version
    if message.desired_version is not None:
        device.desired_version = message.desired_version
    if message.update is not None:
        previous = device.last_update or {}
        if previous.get("ts") != message.update.ts or previous.get("kind") != message.update.kind:
            metrics.observe_update(message.update.kind)
        device.last_update = message.update.to_dict()
    return True


def record_facts(
    session: Session, message: DeviceFactsMessage, *, now: datetime | None = None
) -> bool:
    """Store a device's hardware and software facts (arch, RAM, runtime versions).

    Called by the MQTT ingester for ``devices/{id}/facts``. The caller commits.
    The device class stays what the operator enrolled it as: a device cannot
    move itself into another class's rollouts.

    Returns:
        True if the device exists.
    """
    device = session.get(Device, message.device_id, with_for_update=True)
    if device is None:
        return False
    device.arch = message.arch
    device.ram_bytes = message.ram_bytes
    device.cpu_count = message.cpu_count
    device.onnxruntime_version = message.onnxruntime_version
    device.agent_version = message.agent_version
    device.max_opset = message.max_opset
    device.python_version = message.python_version
    device.os = message.os
    device.facts_at = now or _now()
    return True
