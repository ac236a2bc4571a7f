"""Desired state: which model version each device or group should run, signed and versioned.

Flow: an operator assigns a published model version (and optionally a shadow
candidate) to a device or a group (``assign``; REST ``POST /deployments``,
``PUT /devices/{id}/desired``, ``PUT /groups/{group}/desired``). The service
allocates the target's next ``version``, builds the protocol's
``DesiredState`` (docs/protocol.md section 3), signs it with the director
key(s), checks the signatures against the trust root's director role, and
stores the exact wire bytes in ``desired_states`` with ``published_at`` unset,
in the same transaction as the audit entry. The MQTT publisher
(``server.workers.desired``) publishes the newest row of every target
retained, marks it published, re-publishes everything on every broker
connect (so a wiped broker gets every retained state back), and calls
``reissue_due`` so that no state expires under a device: a state close to its
``expires`` is re-signed under a new version with the same content. ``clear``
stores an empty payload, which clears the retained topic (devices keep what
they run).

Invariants:

* Per target (``device:ID`` / ``group:NAME``) versions strictly increase and
  are never reused: allocation runs under a cross-replica lock (PostgreSQL
  advisory lock; SQLite's ``BEGIN IMMEDIATE``) and the unique constraint
  ``(target_kind, target_name, version)`` backs it up. Rows are never deleted,
  so a device removed and enrolled again still sees higher versions.
* Only published model versions can be assigned, and only with a bundle
  whose sha256 and size are recorded; nothing is stored unless the signatures
  meet the trust root's director threshold.
* ``allowed_bundles(device)`` is what the chunk service may serve that
  device: the primary and shadow bundles of the current states of the device
  and of its groups.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Literal

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session

from edgefleet import canonical
from edgefleet.errors import VerificationError
from edgefleet.ids import ID_PATTERN, ID_RE
from edgefleet.keys import KeyFileError, SigningKey, load_signing_key
from edgefleet.manifest import Manifest
from edgefleet.topics import TopicError, validate_device_id, validate_group
from edgefleet.wire import BundleRef, DesiredState, DesiredTarget, ModelRef, ShadowSpec
from server.db import transaction_lock
from server.errors import ConflictError, InvalidInputError, NotFoundError, UnavailableError
from server.models import DesiredStateRow, Device, DeviceGroup, ModelVersion
from server.services import audit, registry
from server.settings import Settings

__all__ = [
    "LOCK_DESIRED",
    "Target",
    "allowed_bundles",
    "assign",
    "clear",
    "current",
    "current_all",
    "effective_for_device",
    "history",
    "load_director_keys",
    "mark_published",
    "reissue_due",
    "unpublished",
]

LOCK_DESIRED = 0x6566_0004  # PostgreSQL advisory lock key (see server.db)
ROLLOUT_PATTERN = ID_PATTERN


@dataclass(frozen=True)
class Target:
    """A device or a group, the unit a desired state is addressed to."""

    kind: Literal["device", "group"]
    name: str

    def __post_init__(self) -> None:
        if self.kind not in ("device", "group"):
            raise InvalidInputError("a target is a device or a group")
        try:
            (validate_device_id if self.kind == "device" else validate_group)(self.name)
        except TopicError as exc:
            raise InvalidInputError(str(exc)) from None

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}"

    def desired_target(self) -> DesiredTarget:
        if self.kind == "device":
            return DesiredTarget(device=self.name)
        return DesiredTarget(group=self.name)

    @property
    def topic(self) -> str:
        return str(self.desired_target().topic)

    @classmethod
    def of(cls, row: DesiredStateRow) -> Target:
        return cls(row.target_kind, row.target_name)  # type: ignore[arg-type]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def load_director_keys(settings: Settings) -> list[SigningKey]:
    """The director keys that sign desired states.

    Raises:
        UnavailableError: none configured, or one cannot be loaded.
    """
    if not settings.director_keys:
        raise UnavailableError(
            "this server has no director key (EDGEFLEET_DIRECTOR_KEYS): it cannot sign "
            "desired states"
        )
    try:
        return [load_signing_key(path) for path in settings.director_keys]
    except KeyFileError as exc:
        raise UnavailableError(str(exc)) from exc


def _published(session: Session, name: str, version: int, what: str) -> ModelVersion:
    row = registry.get_version(session, name, version)
    if row.status != registry.STATUS_PUBLISHED or not row.bundle_sha256 or not row.bundle_size:
        raise ConflictError(f"{what} {name} version {version} is {row.status}, not published")
    return row


def _check_not_expired(row: ModelVersion, now: datetime) -> None:
    """Devices refuse an expired bundle (``ExpiredError``): do not assign one.

    Raises:
        ConflictError: the bundle's manifest has expired.
    """
    assert row.manifest is not None  # published versions have one
    expires = Manifest.from_bytes(bytes(row.manifest)).expires
    if expires <= now:
        raise ConflictError(
            f"{row.model.name} version {row.version}'s bundle expired at "
            f"{expires.isoformat()}: devices refuse it; publish a new version"
        )


def _bundle(row: ModelVersion) -> BundleRef:
    assert row.bundle_sha256 is not None and row.bundle_size is not None
    bundle = registry.bundle_id(row.model.name, row.version)
    return BundleRef(bundle, row.bundle_sha256, row.bundle_size)


def _latest_subquery():  # type: ignore[no-untyped-def]
    return (
        select(
            DesiredStateRow.target_kind,
            DesiredStateRow.target_name,
            func.max(DesiredStateRow.version).label("version"),
        )
        .group_by(DesiredStateRow.target_kind, DesiredStateRow.target_name)
        .subquery()
    )


def current(session: Session, target: Target) -> DesiredStateRow | None:
    """The newest desired state of ``target`` (a ``clear`` row included), or None."""
    return session.scalar(
        select(DesiredStateRow)
        .where(
            DesiredStateRow.target_kind == target.kind,
            DesiredStateRow.target_name == target.name,
        )
        .order_by(DesiredStateRow.version.desc())
        .limit(1)
    )


def current_all(session: Session) -> list[DesiredStateRow]:
    """The newest row of every target, by target."""
    latest = _latest_subquery()
    return list(
        session.scalars(
            select(DesiredStateRow)
            .join(
                latest,
                and_(
                    DesiredStateRow.target_kind == latest.c.target_kind,
                    DesiredStateRow.target_name == latest.c.target_name,
                    DesiredStateRow.version == latest.c.version,
                ),
            )
            .order_by(DesiredStateRow.target_kind, DesiredStateRow.target_name)
        ).all()
    )


def unpublished(session: Session) -> list[DesiredStateRow]:
    """Newest rows that no replica has published yet (older ones are superseded)."""
    return [row for row in current_all(session) if row.published_at is None]


def mark_published(session: Session, ids: Sequence[int], *, now: datetime | None = None) -> None:
    """Record that these rows reached the broker (the caller commits)."""
    if ids:
        session.execute(
            update(DesiredStateRow)
            .where(DesiredStateRow.id.in_(list(ids)), DesiredStateRow.published_at.is_(None))
            .values(published_at=now or _now())
        )


def history(
    session: Session, *, target: Target | None = None, limit: int = 100, offset: int = 0
) -> tuple[list[DesiredStateRow], int]:
    """Every desired state issued (newest first), optionally of one target."""
    q = select(DesiredStateRow)
    if target is not None:
        q = q.where(
            DesiredStateRow.target_kind == target.kind,
            DesiredStateRow.target_name == target.name,
        )
    total = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = session.scalars(
        q.order_by(DesiredStateRow.created_at.desc(), DesiredStateRow.id.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    return list(rows), int(total)


def _next_version(session: Session, target: Target) -> int:
    transaction_lock(session, LOCK_DESIRED)
    top = session.scalar(
        select(func.max(DesiredStateRow.version)).where(
            DesiredStateRow.target_kind == target.kind,
            DesiredStateRow.target_name == target.name,
        )
    )
    return int(top or 0) + 1


def _sign(settings: Settings, state: DesiredState) -> bytes:
    keys = load_director_keys(settings)
    signed = state.sign(keys)
    root = registry.load_trust_root(settings)
    body = signed.to_dict()
    try:
        root.verify_role_signatures(
            "director", canonical.encode(body["signed"]), list(signed.signatures)
        )
    except VerificationError as exc:
        raise UnavailableError(
            f"the configured director key(s) do not meet trust root v{root.version}'s "
            f"director role: {exc}"
        ) from exc
    return signed.to_bytes()


def _store(
    session: Session,
    settings: Settings,
    target: Target,
    *,
    action: str,
    model: ModelVersion,
    shadow: ModelVersion | None,
    rollout_id: str | None,
    lifetime: timedelta,
    actor: str,
    now: datetime,
) -> DesiredStateRow:
    version = _next_version(session, target)
    state = DesiredState(
        target=target.desired_target(),
        version=version,
        model=ModelRef(model.model.name, model.version),
        bundle=_bundle(model),
        issued=now,
        expires=now + lifetime,
        shadow=None
        if shadow is None
        else ShadowSpec(ModelRef(shadow.model.name, shadow.version), _bundle(shadow)),
        rollout_id=rollout_id,
    )
    payload = _sign(settings, state)
    row = DesiredStateRow(
        target_kind=target.kind,
        target_name=target.name,
        version=version,
        action=action,
        model_name=model.model.name,
        model_version=model.version,
        bundle_id=state.bundle.id,
        shadow_model_name=shadow.model.name if shadow else None,
        shadow_model_version=shadow.version if shadow else None,
        shadow_bundle_id=state.shadow.bundle.id if state.shadow else None,
        rollout_id=rollout_id,
        issued=now,
        expires=state.expires,
        payload=payload,
        payload_sha256=hashlib.sha256(payload).hexdigest(),
        created_at=now,
        created_by=actor,
        published_at=None,
    )
    session.add(row)
    audit.record(
        session,
        actor,
        f"desired.{action}",
        target.key.replace(":", "/"),
        {
            "version": version,
            "model": f"{model.model.name}:{model.version}",
            "shadow": f"{shadow.model.name}:{shadow.version}" if shadow else None,
            "rollout_id": rollout_id,
            "payload_sha256": row.payload_sha256,
            "expires": state.expires.isoformat(),
        },
        now=now,
    )
    return row


def assign(
    session: Session,
    settings: Settings,
    target: Target,
    *,
    model: str,
    version: int,
    shadow: tuple[str, int] | None = None,
    rollout_id: str | None = None,
    expires_days: int | None = None,
    actor: str,
    now: datetime | None = None,
    commit: bool = True,
) -> DesiredStateRow:
    """Sign and store the target's next desired state, and commit (unless ``commit=False``).

    Args:
        session: a fresh session (committed here), or the caller's transaction
            with ``commit=False`` (the rollout controller: the change and the
            rollout's new state in one fenced transaction).
        settings: for the director keys, trust root and default lifetime.
        target: a device (must be enrolled) or a group (any valid name).
        model: model name; ``version`` its published version.
        shadow: an optional published ``(name, version)`` to run in shadow.
        rollout_id: an operator label carried in the signed message.
        expires_days: lifetime (default ``desired_expires_days``); the
            publisher re-signs it before it runs out.
        actor: who asked (audit log).

    Raises:
        NotFoundError: no such device, model or version.
        ConflictError: a version is not published, or its bundle has expired.
        InvalidInputError: a bad rollout id, lifetime, or a device class the
            bundle does not target.
        UnavailableError: no director key or trust root, or the keys do not
            meet the director threshold.
    """
    now = now or _now()
    if rollout_id is not None and not ID_RE.match(rollout_id):
        raise InvalidInputError("rollout_id must be 1-128 ASCII letters, digits, '.', '_' or '-'")
    days = expires_days if expires_days is not None else settings.desired_expires_days
    if not 1 <= days <= 365:
        raise InvalidInputError("expires_days must be in [1, 365]")
    primary = _published(session, model, version, "model")
    candidate = _published(session, shadow[0], shadow[1], "shadow") if shadow else None
    for row in (primary, candidate):
        if row is not None:
            _check_not_expired(row, now)
    if target.kind == "device":
        device = session.get(Device, target.name)
        if device is None:
            raise NotFoundError(f"no device {target.name!r}")
        for row in (primary, candidate):
            classes = (row.options or {}).get("device_classes") if row is not None else None
            if row is not None and classes and device.device_class not in classes:
                raise InvalidInputError(
                    f"{row.model.name} version {row.version} targets device classes "
                    f"{sorted(classes)}, not {device.device_class!r} (device {target.name})"
                )
    stored = _store(
        session,
        settings,
        target,
        action="assign",
        model=primary,
        shadow=candidate,
        rollout_id=rollout_id,
        lifetime=timedelta(days=days),
        actor=actor,
        now=now,
    )
    if commit:
        session.commit()
    return stored


def clear(session: Session, target: Target, *, actor: str) -> DesiredStateRow:
    """Clear the target's retained desired state (devices keep what they run); commit.

    Raises:
        NotFoundError: the target never had a desired state.
    """
    now = _now()
    latest = current(session, target)
    if latest is None:
        raise NotFoundError(f"{target.kind} {target.name!r} has no desired state")
    version = _next_version(session, target)
    row = DesiredStateRow(
        target_kind=target.kind,
        target_name=target.name,
        version=version,
        action="clear",
        issued=now,
        expires=None,
        payload=b"",
        payload_sha256=hashlib.sha256(b"").hexdigest(),
        created_at=now,
        created_by=actor,
        published_at=None,
    )
    session.add(row)
    audit.record(
        session, actor, "desired.clear", target.key.replace(":", "/"), {"version": version}
    )
    session.commit()
    return row


def reissue_due(
    session: Session, settings: Settings, *, now: datetime | None = None
) -> list[DesiredStateRow]:
    """Re-sign, under a new version, every current state about to expire; commit.

    A state is due when less than ``desired_reissue_hours`` remain. The new
    state carries the same model, shadow and rollout id and the original
    lifetime (at least twice the notice), so devices already running it do
    nothing (``serving``).

    Returns:
        The new rows (unpublished).
    """
    now = now or _now()
    horizon = now + timedelta(hours=settings.desired_reissue_hours)
    due = [
        row
        for row in current_all(session)
        if row.action != "clear" and row.expires is not None and row.expires <= horizon
    ]
    made: list[DesiredStateRow] = []
    if due:
        transaction_lock(session, LOCK_DESIRED)  # replicas check at the same time
    for old in due:
        latest = current(session, Target.of(old))
        if latest is None or latest.id != old.id:
            continue  # another replica (or an operator) issued a newer one meanwhile
        assert old.model_name is not None and old.model_version is not None
        try:
            primary = _published(session, old.model_name, old.model_version, "model")
            candidate = (
                _published(session, old.shadow_model_name, old.shadow_model_version, "shadow")
                if old.shadow_model_name and old.shadow_model_version
                else None
            )
        except (NotFoundError, ConflictError):
            continue  # the version vanished: an operator must decide what to run
        # At least twice the notice, so a re-signed state is not due again at once.
        lifetime = max(
            old.expires - old.issued if old.expires else timedelta(0),
            timedelta(hours=2 * settings.desired_reissue_hours),
        )
        made.append(
            _store(
                session,
                settings,
                Target.of(old),
                action="reissue",
                model=primary,
                shadow=candidate,
                rollout_id=old.rollout_id,
                lifetime=lifetime,
                actor="server:reissue",
                now=now,
            )
        )
    session.commit()
    return made


def effective_for_device(session: Session, device_id: str) -> list[DesiredStateRow]:
    """Current states that apply to a device: its own, then each of its groups'."""
    device = session.get(Device, device_id)
    if device is None:
        return []
    targets = [Target("device", device_id)] + [Target("group", g.group) for g in device.groups]
    rows = []
    for target in targets:
        row = current(session, target)
        if row is not None and row.action != "clear":
            rows.append(row)
    return rows


def allowed_bundles(session: Session, device_id: str) -> frozenset[str]:
    """Bundle ids the chunk service may serve to ``device_id``.

    The primary and shadow bundles of the current desired states of the
    device itself and of every group it belongs to (a device may be told to
    follow any of them).
    """
    groups = select(DeviceGroup.group).where(DeviceGroup.device_id == device_id)
    latest = _latest_subquery()
    rows = session.execute(
        select(DesiredStateRow.bundle_id, DesiredStateRow.shadow_bundle_id)
        .join(
            latest,
            and_(
                DesiredStateRow.target_kind == latest.c.target_kind,
                DesiredStateRow.target_name == latest.c.target_name,
                DesiredStateRow.version == latest.c.version,
            ),
        )
        .where(
            ((DesiredStateRow.target_kind == "device") & (DesiredStateRow.target_name == device_id))
            | ((DesiredStateRow.target_kind == "group") & DesiredStateRow.target_name.in_(groups))
        )
    ).all()
    return frozenset(b for pair in rows for b in pair if b)
