"""SQLAlchemy 2 tables of the server (the Alembic migrations create exactly these).

Data model:

* ``api_tokens``: role-carrying API tokens; only the sha256 of a token is kept.
* ``auth_failures``: one row per rejected token, by client IP (rate limiting
  shared by all replicas).
* ``audit_log`` + ``audit_head``: the append-only, hash-chained audit log and
  the (seq, hash) of its newest entry.
* ``models`` -> ``model_versions`` -> ``version_signatures``: the registry. A
  version's ``status`` moves ``queued -> building -> (awaiting_signatures ->)
  published`` or to ``failed``; a published version never changes again.
* ``jobs``: background build jobs; a running job is held under the lease
  ``job:<id>``, so a replica that dies loses nothing (another replica
  requeues the job when the lease runs out).
* ``drift_alerts``: one row per (model digest, scope, subject) drift alert,
  its level and the persisted state of ``server.analysis.alerts``.
* ``retrain_policies`` (one per model) and ``retrain_requests``: when a model
  is due for retraining, and each request with its evidence, dataset export
  and hook run.
* ``leases``: one row per named lease (``server.workers.lease``): its holder,
  expiry and an ``epoch`` that grows on every change of holder and fences
  the holder's writes.
* ``devices`` (+ ``device_groups``, ``device_tags``): enrolled devices, their
  broker credentials (PBKDF2 hash only), facts and online status.
* ``telemetry``: one row per telemetry record, unique by (device_id, seq).
* ``desired_states``: every signed desired state ever issued, per target
  (``device``/``group`` + name) with a strictly increasing ``version``; the
  newest row of a target is what its retained topic must carry.

Invariants: every timestamp is aware UTC (``UTCDateTime``); JSON columns hold
only JSON-native values; names and ids are bounded strings validated before
they reach the database.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from server.db import UTCDateTime

__all__ = [
    "ApiToken",
    "AuditEntry",
    "AuditHead",
    "AuthFailure",
    "Base",
    "DesiredStateRow",
    "Device",
    "DeviceGroup",
    "DeviceTag",
    "DriftAlert",
    "Job",
    "Lease",
    "Model",
    "ModelVersion",
    "RetrainPolicy",
    "RetrainRequest",
    "TelemetryRow",
    "VersionSignature",
]

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets a bigint.
BigIntPK = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSON(),
    }


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    created_by: Mapped[str | None] = mapped_column(String(128))
    revoked_at: Mapped[datetime | None]


class AuthFailure(Base):
    __tablename__ = "auth_failures"
    __table_args__ = (Index("ix_auth_failures_client_at", "client", "at"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    client: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime]


class AuditEntry(Base):
    __tablename__ = "audit_log"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    at: Mapped[str] = mapped_column(String(32))  # ISO text: hashed exactly as stored
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256))
    detail: Mapped[str] = mapped_column(Text)  # sorted-key compact JSON text
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(128))

    versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="model", order_by="ModelVersion.version"
    )


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version", name="uq_model_version"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(24))
    signing: Mapped[str] = mapped_column(String(8))  # online | offline
    compress: Mapped[bool] = mapped_column(Boolean)
    source_format: Mapped[str] = mapped_column(String(8))  # onnx | pt2
    source_filename: Mapped[str] = mapped_column(String(256))
    source_sha256: Mapped[str] = mapped_column(String(64))
    source_bytes: Mapped[int] = mapped_column(BigInteger)
    options: Mapped[dict[str, Any]]  # build options (targets, expiry, max_drop)
    report: Mapped[dict[str, Any] | None]
    model_card: Mapped[dict[str, Any]]
    lineage: Mapped[dict[str, Any]]
    manifest: Mapped[bytes | None] = mapped_column(LargeBinary)
    manifest_sha256: Mapped[str | None] = mapped_column(String(64))
    bundle_file: Mapped[str | None] = mapped_column(String(512))
    bundle_sha256: Mapped[str | None] = mapped_column(String(64))
    bundle_size: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(128))
    published_at: Mapped[datetime | None]

    model: Mapped[Model] = relationship(back_populates="versions")
    signatures: Mapped[list[VersionSignature]] = relationship(
        back_populates="version", order_by="VersionSignature.keyid", cascade="all, delete-orphan"
    )


class VersionSignature(Base):
    __tablename__ = "version_signatures"
    __table_args__ = (UniqueConstraint("version_id", "keyid", name="uq_version_signature"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    keyid: Mapped[str] = mapped_column(String(64))
    sig: Mapped[str] = mapped_column(String(128))  # base64 Ed25519 signature
    added_by: Mapped[str] = mapped_column(String(128))
    added_at: Mapped[datetime]

    version: Mapped[ModelVersion] = relationship(back_populates="signatures")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_created", "status", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL")
    )
    status: Mapped[str] = mapped_column(String(16))  # queued | running | succeeded | failed
    stage: Mapped[str] = mapped_column(String(32))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # claims so far
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]


class DriftAlert(Base):
    __tablename__ = "drift_alerts"
    __table_args__ = (
        UniqueConstraint("manifest_sha256", "scope", "subject", name="uq_drift_alert"),
        Index("ix_drift_alerts_model_level", "model_name", "level"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[int] = mapped_column(BigInteger)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(80))  # fleet | device:ID
    subject: Mapped[str] = mapped_column(String(300))  # feature:NAME
    level: Mapped[str] = mapped_column(String(16))  # ok | warn | alarm | insufficient
    state: Mapped[dict[str, Any]]  # server.analysis.alerts.AlertState.to_dict()
    pending_since: Mapped[datetime]  # start of the window being pooled
    last_judged: Mapped[datetime | None]
    last_reason: Mapped[str] = mapped_column(Text, default="")
    since: Mapped[datetime | None]  # when the current level was entered
    updated_at: Mapped[datetime]


class RetrainPolicy(Base):
    __tablename__ = "retrain_policies"

    model_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    policy: Mapped[dict[str, Any]]  # server.analysis.retrain.Policy.to_dict()
    updated_at: Mapped[datetime]
    updated_by: Mapped[str] = mapped_column(String(128))


class RetrainRequest(Base):
    __tablename__ = "retrain_requests"
    __table_args__ = (Index("ix_retrain_requests_model_created", "model_name", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[int] = mapped_column(BigInteger)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    profile_sha256: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(Text)
    evidence: Mapped[dict[str, Any]]  # the trigger, every reason, the window
    window_start: Mapped[datetime]
    window_end: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(16))  # exported | hooked | hook_failed | no_hook
    dataset_path: Mapped[str | None] = mapped_column(String(512))
    dataset_sha256: Mapped[str | None] = mapped_column(String(64))
    dataset_rows: Mapped[int] = mapped_column(BigInteger, default=0)
    labelled_rows: Mapped[int] = mapped_column(BigInteger, default=0)
    hook: Mapped[dict[str, Any]]  # {"command", "attempts": [{"exit", "output_tail", ...}]}
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Lease(Base):
    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(128))
    epoch: Mapped[int] = mapped_column(BigInteger, default=0)
    expires_at: Mapped[datetime | None]
    acquired_at: Mapped[datetime | None]


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_class: Mapped[str] = mapped_column(String(64))
    password_hash: Mapped[str] = mapped_column(String(256))
    enrolled_at: Mapped[datetime]
    enrolled_by: Mapped[str] = mapped_column(String(128))
    arch: Mapped[str | None] = mapped_column(String(64))
    ram_bytes: Mapped[int | None] = mapped_column(BigInteger)
    cpu_count: Mapped[int | None] = mapped_column(Integer)
    onnxruntime_version: Mapped[str | None] = mapped_column(String(32))
    agent_version: Mapped[str | None] = mapped_column(String(32))
    max_opset: Mapped[int | None] = mapped_column(Integer)
    python_version: Mapped[str | None] = mapped_column(String(32))
    os: Mapped[str | None] = mapped_column(String(128))
    facts_at: Mapped[datetime | None]
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    status_at: Mapped[datetime | None]  # device clock of the newest status applied
    last_seen: Mapped[datetime | None]  # server clock
    model_name: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[int | None] = mapped_column(BigInteger)
    desired_version: Mapped[int | None] = mapped_column(BigInteger)
    last_update: Mapped[dict[str, Any] | None]

    groups: Mapped[list[DeviceGroup]] = relationship(
        cascade="all, delete-orphan", order_by="DeviceGroup.group", lazy="selectin"
    )
    tags: Mapped[list[DeviceTag]] = relationship(
        cascade="all, delete-orphan", order_by="DeviceTag.tag", lazy="selectin"
    )


class DeviceGroup(Base):
    __tablename__ = "device_groups"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    group: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class DeviceTag(Base):
    __tablename__ = "device_tags"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    tag: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)


class TelemetryRow(Base):
    __tablename__ = "telemetry"
    __table_args__ = (
        UniqueConstraint("device_id", "seq", name="uq_telemetry_device_seq"),
        Index("ix_telemetry_model_window", "model_name", "model_version", "window_end"),
        Index("ix_telemetry_window_end", "window_end"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(BigInteger)
    window_start: Mapped[datetime]
    window_end: Mapped[datetime]
    model_name: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[int | None] = mapped_column(BigInteger)
    predictions: Mapped[int] = mapped_column(BigInteger)
    errors: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime]
    record: Mapped[dict[str, Any]]


class DesiredStateRow(Base):
    __tablename__ = "desired_states"
    __table_args__ = (
        UniqueConstraint("target_kind", "target_name", "version", name="uq_desired_target_version"),
        Index("ix_desired_states_published", "published_at"),
    )

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    target_kind: Mapped[str] = mapped_column(String(8))  # device | group
    target_name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(BigInteger)
    action: Mapped[str] = mapped_column(String(16))  # assign | reissue | clear
    model_name: Mapped[str | None] = mapped_column(String(64))
    model_version: Mapped[int | None] = mapped_column(BigInteger)
    bundle_id: Mapped[str | None] = mapped_column(String(128))
    shadow_model_name: Mapped[str | None] = mapped_column(String(64))
    shadow_model_version: Mapped[int | None] = mapped_column(BigInteger)
    shadow_bundle_id: Mapped[str | None] = mapped_column(String(128))
    rollout_id: Mapped[str | None] = mapped_column(String(128))
    issued: Mapped[datetime]
    expires: Mapped[datetime | None]
    payload: Mapped[bytes] = mapped_column(LargeBinary)  # signed wire bytes; b"" clears
    payload_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(128))
    published_at: Mapped[datetime | None]


class Rollout(Base):
    """A rollout: its spec and the decision core's persisted state (server.rollouts)."""

    __tablename__ = "rollouts"
    __table_args__ = (Index("ix_rollouts_status", "status"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[int] = mapped_column(BigInteger)
    group_name: Mapped[str] = mapped_column(String(128))
    spec: Mapped[dict[str, Any]]  # server.rollouts.spec.RolloutSpec.to_dict()
    state: Mapped[dict[str, Any]]  # server.rollouts.policy.RolloutState.to_dict()
    status: Mapped[str] = mapped_column(String(24))  # state["status"], for queries
    command: Mapped[dict[str, Any] | None]  # {"command", "actor"}: taken by the next pass
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class RolloutEvent(Base):
    """A decision or gate evaluation of a rollout, with its evidence."""

    __tablename__ = "rollout_events"
    __table_args__ = (Index("ix_rollout_events_rollout", "rollout_id", "id"),)

    id: Mapped[int] = mapped_column(BigIntPK, primary_key=True, autoincrement=True)
    rollout_id: Mapped[str] = mapped_column(String(32), ForeignKey("rollouts.id"))
    kind: Mapped[str] = mapped_column(String(16))  # "decision" | "gates"
    detail: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]
