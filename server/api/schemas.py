"""Request and response bodies of the REST API (pydantic 2).

Each resource has separate ``*Create`` / ``*Update`` (what a client may send)
and ``*Public`` (what the server returns) schemas, so internal columns
(password and token hashes, storage paths) can never leak into a response.
Field bounds here mirror the service-layer checks, so most bad input is
refused by validation with a 422 naming the field.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgefleet.ids import HEX64_PATTERN, ID_PATTERN, MAX_VERSION, MODEL_NAME_PATTERN
from edgefleet.topics import NAME_PATTERN

NAME = Field(pattern=NAME_PATTERN, min_length=1, max_length=64)


class Problem(BaseModel):
    """Every error response: what went wrong, in one sentence."""

    detail: Any


# ----------------------------------------------------------------- tokens


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    role: Literal["admin", "publisher", "operator", "viewer"]


class TokenPublic(BaseModel):
    id: str
    name: str
    role: str
    prefix: str
    created_at: datetime
    created_by: str | None
    revoked_at: datetime | None


class TokenCreated(TokenPublic):
    token: str = Field(description="the bearer token; shown only in this response")


class WhoAmI(BaseModel):
    token_id: str
    name: str
    role: str


# --------------------------------------------------------------- registry


class BundlePublic(BaseModel):
    id: str
    sha256: str
    size: int
    url: str


class SignaturesPublic(BaseModel):
    keyids: list[str]
    threshold: int | None


class VersionPublic(BaseModel):
    name: str
    version: int
    status: str
    signing: str
    compress: bool
    source_format: str
    source_filename: str
    source_sha256: str
    source_bytes: int
    options: dict[str, Any]
    report: dict[str, Any] | None
    model_card: dict[str, Any]
    lineage: dict[str, Any]
    manifest_sha256: str | None
    bundle: BundlePublic | None
    signatures: SignaturesPublic
    job_id: str | None
    error: str | None
    created_at: datetime
    created_by: str
    published_at: datetime | None


class VersionSummary(BaseModel):
    version: int
    status: str
    created_at: datetime
    published_at: datetime | None


class ModelPublic(BaseModel):
    name: str
    description: str
    created_at: datetime
    created_by: str
    versions: int
    latest_published: int | None


class ModelDetail(ModelPublic):
    version_list: list[VersionSummary]


class ModelList(BaseModel):
    models: list[ModelPublic]


class SignatureCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keyid: str = Field(pattern=HEX64_PATTERN, description="release key id (hex sha256)")
    sig: str = Field(
        min_length=1, max_length=128, description="base64 Ed25519 signature over the manifest"
    )


class JobPublic(BaseModel):
    id: str
    kind: str
    status: str
    stage: str
    progress: float
    message: str
    error: str | None
    attempts: int
    model: str | None
    version: int | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class SubmitResult(BaseModel):
    version: VersionPublic
    job: JobPublic


class JobList(BaseModel):
    jobs: list[JobPublic]


# ------------------------------------------------------------------ fleet


class DeviceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_id: str | None = Field(
        None, pattern=NAME_PATTERN, max_length=64, description="default: generated"
    )
    device_class: str = Field(pattern=NAME_PATTERN, max_length=64)
    groups: list[str] = Field(default_factory=list, max_length=32)
    tags: list[str] = Field(default_factory=list, max_length=32)


class DeviceUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_class: str | None = Field(None, pattern=NAME_PATTERN, max_length=64)
    groups: list[str] | None = Field(None, max_length=32)
    tags: list[str] | None = Field(None, max_length=32)


class DeviceFactsPublic(BaseModel):
    arch: str | None
    ram_bytes: int | None
    cpu_count: int | None
    onnxruntime_version: str | None
    agent_version: str | None
    max_opset: int | None
    python_version: str | None
    os: str | None
    reported_at: datetime | None


class DevicePublic(BaseModel):
    id: str
    device_class: str
    groups: list[str]
    tags: list[str]
    online: bool
    last_seen: datetime | None
    model: str | None
    model_version: int | None
    desired_version: int | None
    last_update: dict[str, Any] | None
    facts: DeviceFactsPublic
    enrolled_at: datetime
    enrolled_by: str


class DeviceList(BaseModel):
    devices: list[DevicePublic]
    total: int


class BrokerPublic(BaseModel):
    written: bool
    reloaded: bool
    detail: str


class DeviceEnrolled(BaseModel):
    device: DevicePublic
    mqtt_username: str
    mqtt_password: str = Field(description="shown only in this response")
    mqtt_url: str | None
    trust_root: dict[str, Any] | None
    broker: BrokerPublic


class DeviceRemoved(BaseModel):
    id: str
    broker: BrokerPublic


# -------------------------------------------------------------- telemetry


class TelemetryPublic(BaseModel):
    device_id: str
    seq: int
    window_start: datetime
    window_end: datetime
    model: str | None
    model_version: int | None
    predictions: int
    errors: int
    received_at: datetime
    record: dict[str, Any]


class TelemetryList(BaseModel):
    records: list[TelemetryPublic]
    total: int


# ------------------------------------------------------------------ drift

DriftStatus = Literal["ok", "warn", "alarm", "insufficient"]


class FeatureDrift(BaseModel):
    """One feature's statistics and verdict (docs/drift.md)."""

    name: str
    index: int
    n: int
    nonfinite: int
    psi: float | None
    js: float | None
    ks: float | None
    chi2_p: float | None
    warn_at: float
    alarm_at: float
    status: DriftStatus
    reason: str
    fdr_passed: bool | None


class Quality(BaseModel):
    """Accuracy from feedback labels (label vs the class the model predicted)."""

    labelled: int
    correct: int
    unscored: int = Field(description="labels that are not class ids, or without a prediction")
    accuracy: float | None
    wilson_low: float | None = Field(description="95% Wilson interval")
    wilson_high: float | None


class DeviceDrift(BaseModel):
    status: DriftStatus
    features: list[FeatureDrift]
    channels: list[FeatureDrift] = Field(description="image inputs: one histogram per channel")
    outputs: list[FeatureDrift] = Field(description="classifier outputs: predicted classes")
    quality: Quality
    outliers: list[str] = Field(description="features where it differs from the fleet")
    suppressed: list[str] = Field(description="its alerts that a scope-wide alert covers")


class DriftThresholds(BaseModel):
    psi_warn: float
    psi_alarm: float
    min_n: int
    null_quantile: float
    fdr_q: float


class DriftAlertPublic(BaseModel):
    id: int
    model: str
    version: int
    manifest_sha256: str
    scope: str = Field(description="fleet, group:NAME or device:ID")
    subject: str = Field(description="feature:NAME, channel:INPUT[C] or output:NAME")
    level: DriftStatus
    since: str | None = Field(description="when the current level was entered")
    last_judged: str | None
    pending_since: str = Field(description="start of the window being pooled")
    last_psi: float | None
    recent: list[DriftStatus] = Field(description="the last judged windows, oldest first")
    reason: str
    suppressed: bool = Field(description="a fleet alert at least as severe covers it")


class DriftAlertList(BaseModel):
    alerts: list[DriftAlertPublic]
    total: int


class RetrainPolicyBody(BaseModel):
    """When a model is due for retraining (docs/drift.md)."""

    model_config = ConfigDict(extra="forbid")

    key_features: list[str] = Field(
        default_factory=list, max_length=256, description="a PSI alarm on any of these fires"
    )
    on_outputs: bool = Field(True, description="an output drift alarm fires")
    min_accuracy: float | None = Field(
        None, ge=0.0, le=1.0, description="labelled accuracy below this fires"
    )
    min_labels: int = Field(200, ge=1, le=10_000_000, description="labels needed to judge it")
    cooldown_s: float = Field(
        86_400.0, ge=60, le=31_536_000, description="seconds between requests"
    )
    enabled: bool = True
    max_estimated_drop: float | None = Field(
        None, gt=0.0, le=1.0,
        description="an estimated (label-free) accuracy drop above this fires",
    )  # fmt: skip
    min_estimate_n: int = Field(
        500, ge=1, le=10_000_000, description="rows with a confidence needed to judge it"
    )


class RetrainRequestPublic(BaseModel):
    id: str
    model: str
    version: int
    manifest_sha256: str
    profile_sha256: str
    reason: str
    evidence: dict[str, Any]
    window: dict[str, str]
    status: Literal["exported", "hooked", "hook_failed", "no_hook"]
    dataset: dict[str, Any]
    hook: dict[str, Any]
    created_at: str
    updated_at: str


class RetrainRequestList(BaseModel):
    requests: list[RetrainRequestPublic]


class DriftReport(BaseModel):
    model: str
    version: int
    manifest_sha256: str
    scope: str = Field(description="fleet, group:NAME or device:ID")
    since: str | None
    until: str | None
    records: int = Field(description="telemetry records read")
    skipped_histograms: int = Field(description="histograms not on the reference's bins")
    status: DriftStatus
    features: list[FeatureDrift]
    channels: list[FeatureDrift]
    outputs: list[FeatureDrift] = Field(description="predicted-class drift per classifier output")
    quality: Quality
    devices: dict[str, DeviceDrift]
    thresholds: DriftThresholds


# ------------------------------------------------------------ deployments


class ModelVersionRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(pattern=MODEL_NAME_PATTERN, description="model name")
    version: int = Field(ge=1, le=MAX_VERSION)


class DesiredTargetBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: str | None = Field(None, pattern=NAME_PATTERN, max_length=64)
    group: str | None = Field(None, pattern=NAME_PATTERN, max_length=64)


class DesiredSet(BaseModel):
    """What a device or group should run (``PUT .../desired``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(pattern=MODEL_NAME_PATTERN, description="model name")
    version: int = Field(ge=1, le=MAX_VERSION, description="a published version")
    shadow: ModelVersionRef | None = Field(None, description="candidate run beside it")
    rollout_id: str | None = Field(None, pattern=ID_PATTERN, description="a label for your books")
    expires_days: int | None = Field(
        None, ge=1, le=365, description="signed lifetime (re-signed before it ends)"
    )


class DeploymentCreate(DesiredSet):
    """``POST /deployments``: a target and what it should run."""

    target: DesiredTargetBody


class DeploymentPublic(BaseModel):
    id: int
    target: dict[str, str]
    version: int = Field(description="the target's desired-state version (strictly increasing)")
    action: str = Field(description="assign, reissue or clear")
    model: str | None
    model_version: int | None
    bundle_id: str | None
    shadow: dict[str, Any] | None
    rollout_id: str | None
    issued: datetime
    expires: datetime | None
    payload_sha256: str
    created_at: datetime
    created_by: str
    published_at: datetime | None
    topic: str


class DeploymentList(BaseModel):
    deployments: list[DeploymentPublic]
    total: int


class DeviceDesired(BaseModel):
    """A device's own desired state, its groups', and which one applies."""

    device_id: str
    own: DeploymentPublic | None
    groups: list[DeploymentPublic]
    effective: DeploymentPublic | None


# ------------------------------------------------------------------ audit


class AuditEntryPublic(BaseModel):
    seq: int
    at: str
    actor: str
    action: str
    target: str
    detail: dict[str, Any]
    prev_hash: str
    hash: str


class AuditList(BaseModel):
    entries: list[AuditEntryPublic]
    total: int


class AuditProblemPublic(BaseModel):
    seq: int
    kind: str
    message: str


class AuditVerification(BaseModel):
    ok: bool
    entries: int
    head_seq: int
    head_hash: str
    problems: list[AuditProblemPublic]


class Liveness(BaseModel):
    """``GET /healthz``: the replica is up (not the model health check, not device vitals)."""

    status: Literal["ok"]
    schema_revision: str


class RolloutCreate(BaseModel):
    """A rollout to start (docs/rollouts.md); bounds are checked again by the core's spec."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    version: int = Field(ge=1, le=2**53)
    group: str = Field(min_length=1, max_length=128)
    strategy: Literal["canary", "all-at-once"] = "canary"
    waves: list[float] = Field(default_factory=lambda: [5.0, 25.0, 100.0], max_length=20)
    previous: int | None = Field(
        None, ge=1, description="the version to return to (default: the group's current one)"
    )
    revert_to: int | None = Field(
        None, ge=1, description="the previous payload re-released above the candidate"
    )
    soak_s: float = Field(600.0, ge=0, le=2_592_000, description="seconds of own telemetry")
    device_timeout_s: float = Field(1800.0, ge=10, le=2_592_000, description="seconds")
    decision_deadline_s: float = Field(3600.0, ge=10, le=2_592_000, description="seconds")
    gates: dict[str, float | int | bool] = Field(default_factory=dict, max_length=32)


class RolloutPublic(BaseModel):
    id: str
    model: str
    version: int
    group: str
    status: str
    wave: int
    phase: str
    reason: str
    deadline: float | None
    pending_command: dict[str, Any] | None
    spec: dict[str, Any]
    device_counts: dict[str, int]
    devices: dict[str, dict[str, Any]]
    gates: list[dict[str, Any]]
    events: list[dict[str, Any]]
    created_by: str
    created_at: str
    updated_at: str


class RolloutList(BaseModel):
    rollouts: list[RolloutPublic]
