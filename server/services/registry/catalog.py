"""Registry vocabulary and read-only look-ups shared by the other registry modules.

Flow: nothing here writes. The version status constants name the life cycle
``queued -> building -> awaiting_signatures -> published`` (or ``failed`` from
any step before ``published``); ``VersionOptions`` carries the release choices
made at upload time; the look-ups (``list_models``, ``get_model``,
``get_version``, ``signature_status``) read rows for the API and the chunk
service; ``bundle_id`` / ``bundle_path`` name a bundle on the wire and on disk.

Invariants: a bundle's id is ``<name>-<version>`` and its signed file lives at
``bundles_dir/<name>/<id>.efb`` (the staged, unsigned one at
``<id>.unsigned.efb``); look-ups raise ``NotFoundError`` rather than return None.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload

from edgefleet.trust import TrustRoot
from server.errors import (
    NotFoundError,
)
from server.models import Model, ModelVersion
from server.settings import Settings

MAX_MODEL_CARD_BYTES = 64 << 10  # bytes of the user's model card JSON
MAX_VERSION = 2**53 - 1
STATUS_QUEUED = "queued"
STATUS_BUILDING = "building"
STATUS_AWAITING = "awaiting_signatures"
STATUS_PUBLISHED = "published"
STATUS_FAILED = "failed"

Progress = Callable[[str, float, str], None]


class BuildError(Exception):
    """A build job cannot finish; the message is shown to the user as the job's error."""


@dataclass(frozen=True)
class VersionOptions:
    """Release choices made at upload time."""

    compress: bool = False
    signing: str = "online"  # online | offline
    device_classes: tuple[str, ...] = ()
    archs: tuple[str, ...] = ()
    min_agent_version: str = "0.1.0"
    min_onnxruntime_version: str | None = None
    expires_days: int | None = None
    max_drop: float = 0.01
    description: str = ""
    model_card: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "compress": self.compress,
            "signing": self.signing,
            "device_classes": list(self.device_classes),
            "archs": list(self.archs),
            "min_agent_version": self.min_agent_version,
            "min_onnxruntime_version": self.min_onnxruntime_version,
            "expires_days": self.expires_days,
            "max_drop": self.max_drop,
        }


def _now() -> datetime:
    return datetime.now(timezone.utc)


def bundle_id(name: str, version: int) -> str:
    """The chunk service's id of a published bundle (fits ``BundleRef.id``)."""
    return f"{name}-{version}"


def bundle_path(settings: Settings, name: str, version: int, *, signed: bool = True) -> Path:
    suffix = ".efb" if signed else ".unsigned.efb"
    return settings.bundles_dir / name / f"{bundle_id(name, version)}{suffix}"


def list_models(session: Session) -> list[tuple[Model, int, int | None]]:
    """Every model with its number of versions and newest published version."""
    published = (
        select(ModelVersion.model_id, func.max(ModelVersion.version).label("latest"))
        .where(ModelVersion.status == STATUS_PUBLISHED)
        .group_by(ModelVersion.model_id)
        .subquery()
    )
    counts = (
        select(ModelVersion.model_id, func.count().label("n"))
        .group_by(ModelVersion.model_id)
        .subquery()
    )
    rows = session.execute(
        select(Model, func.coalesce(counts.c.n, 0), published.c.latest)
        .outerjoin(counts, counts.c.model_id == Model.id)
        .outerjoin(published, published.c.model_id == Model.id)
        .order_by(Model.name)
    ).all()
    return [(m, int(n), latest) for m, n, latest in rows]


def get_model(session: Session, name: str) -> Model:
    """Raises NotFoundError."""
    model = session.scalar(
        select(Model).where(Model.name == name).options(selectinload(Model.versions))
    )
    if model is None:
        raise NotFoundError(f"no model named {name!r}")
    return model


def get_version(session: Session, name: str, version: int) -> ModelVersion:
    """Raises NotFoundError."""
    row = session.scalar(
        select(ModelVersion)
        .join(Model)
        .where(Model.name == name, ModelVersion.version == version)
        .options(selectinload(ModelVersion.signatures))
    )
    if row is None:
        raise NotFoundError(f"no version {version} of model {name!r}")
    return row


def signature_status(version: ModelVersion, root: TrustRoot | None) -> tuple[list[str], int | None]:
    """Key ids that signed, and the release threshold (None without a trust root)."""
    keyids = sorted(s.keyid for s in version.signatures)
    return keyids, (root.role("release").threshold if root is not None else None)
