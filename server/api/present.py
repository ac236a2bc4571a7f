"""Turn database rows into the API's ``*Public`` schemas (no hashes, no paths)."""

from __future__ import annotations

import json

from server.api import schemas
from server.models import AuditEntry, DesiredStateRow, Device, Job, ModelVersion, TelemetryRow
from server.services import registry
from server.trustcache import TrustRootCache

__all__ = ["audit_entry", "deployment", "device", "job", "telemetry", "version"]


def device(d: Device) -> schemas.DevicePublic:
    return schemas.DevicePublic(
        id=d.id,
        device_class=d.device_class,
        groups=[g.group for g in d.groups],
        tags=[t.tag for t in d.tags],
        online=d.online,
        last_seen=d.last_seen,
        model=d.model_name,
        model_version=d.model_version,
        desired_version=d.desired_version,
        last_update=d.last_update,
        facts=schemas.DeviceFactsPublic(
            arch=d.arch,
            ram_bytes=d.ram_bytes,
            cpu_count=d.cpu_count,
            onnxruntime_version=d.onnxruntime_version,
            agent_version=d.agent_version,
            max_opset=d.max_opset,
            python_version=d.python_version,
            os=d.os,
            reported_at=d.facts_at,
        ),
        enrolled_at=d.enrolled_at,
        enrolled_by=d.enrolled_by,
    )


def job(j: Job, name: str | None = None, version: int | None = None) -> schemas.JobPublic:
    return schemas.JobPublic(
        id=j.id,
        kind=j.kind,
        status=j.status,
        stage=j.stage,
        progress=j.progress,
        message=j.message,
        error=j.error,
        attempts=j.attempts,
        model=name,
        version=version,
        created_at=j.created_at,
        updated_at=j.updated_at,
        finished_at=j.finished_at,
    )


def version(v: ModelVersion, roots: TrustRootCache, job_id: str | None) -> schemas.VersionPublic:
    name = v.model.name
    bundle = None
    if v.status == registry.STATUS_PUBLISHED and v.bundle_sha256 and v.bundle_size:
        bundle = schemas.BundlePublic(
            id=registry.bundle_id(name, v.version),
            sha256=v.bundle_sha256,
            size=v.bundle_size,
            url=f"/api/v1/models/{name}/versions/{v.version}/bundle",
        )
    keyids, threshold = registry.signature_status(v, roots.get())
    options = {k: val for k, val in v.options.items() if k != "upload_dir"}
    return schemas.VersionPublic(
        name=name,
        version=v.version,
        status=v.status,
        signing=v.signing,
        compress=v.compress,
        source_format=v.source_format,
        source_filename=v.source_filename,
        source_sha256=v.source_sha256,
        source_bytes=v.source_bytes,
        options=options,
        report=v.report,
        model_card=v.model_card,
        lineage=v.lineage,
        manifest_sha256=v.manifest_sha256,
        bundle=bundle,
        signatures=schemas.SignaturesPublic(keyids=keyids, threshold=threshold),
        job_id=job_id,
        error=v.error,
        created_at=v.created_at,
        created_by=v.created_by,
        published_at=v.published_at,
    )


def telemetry(t: TelemetryRow) -> schemas.TelemetryPublic:
    return schemas.TelemetryPublic(
        device_id=t.device_id,
        seq=t.seq,
        window_start=t.window_start,
        window_end=t.window_end,
        model=t.model_name,
        model_version=t.model_version,
        predictions=t.predictions,
        errors=t.errors,
        received_at=t.received_at,
        record=t.record,
    )


def audit_entry(e: AuditEntry) -> schemas.AuditEntryPublic:
    return schemas.AuditEntryPublic(
        seq=e.seq,
        at=e.at,
        actor=e.actor,
        action=e.action,
        target=e.target,
        detail=_detail(e.detail),
        prev_hash=e.prev_hash,
        hash=e.hash,
    )


def _detail(text: str) -> dict[str, object]:
    # An edited row may hold anything; show it rather than fail the listing.
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return {"unparseable": text[:1000]}
    return value if isinstance(value, dict) else {"value": value}


def deployment(row: DesiredStateRow) -> schemas.DeploymentPublic:
    from server.services.desired import Target

    shadow = None
    if row.shadow_model_name is not None:
        shadow = {
            "model": row.shadow_model_name,
            "version": row.shadow_model_version,
            "bundle_id": row.shadow_bundle_id,
        }
    target = Target.of(row)
    return schemas.DeploymentPublic(
        id=row.id,
        target={target.kind: target.name},
        version=row.version,
        action=row.action,
        model=row.model_name,
        model_version=row.model_version,
        bundle_id=row.bundle_id,
        shadow=shadow,
        rollout_id=row.rollout_id,
        issued=row.issued,
        expires=row.expires,
        payload_sha256=row.payload_sha256,
        created_at=row.created_at,
        created_by=row.created_by,
        published_at=row.published_at,
        topic=target.topic,
    )
