"""``/api/v1/models``: registry uploads, versions, offline signing, bundles."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Path, Request, UploadFile
from fastapi.responses import FileResponse, Response
from sqlalchemy import select

from edgefleet.ids import MAX_VERSION, MODEL_NAME_PATTERN
from server.api import present, schemas
from server.api.deps import Publisher, Reader, SessionDep, SettingsDep
from server.errors import InvalidInputError, NotFoundError
from server.models import Job
from server.services import registry

router = APIRouter(prefix="/models", tags=["models"])

ModelName = Annotated[str, Path(pattern=MODEL_NAME_PATTERN, description="model name")]
VersionNo = Annotated[int, Path(ge=1, le=MAX_VERSION, description="integer version")]


def _latest_job(session: SessionDep, version_id: int) -> str | None:
    return session.scalar(
        select(Job.id).where(Job.version_id == version_id).order_by(Job.created_at.desc()).limit(1)
    )


def _csv(value: str, what: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if len(items) > 64:
        raise InvalidInputError(f"at most 64 {what}")
    return items


@router.get("", response_model=schemas.ModelList)
def list_models(session: SessionDep, _: Reader) -> schemas.ModelList:
    """Every model with its version count and newest published version."""
    return schemas.ModelList(
        models=[
            schemas.ModelPublic(
                name=m.name,
                description=m.description,
                created_at=m.created_at,
                created_by=m.created_by,
                versions=n,
                latest_published=latest,
            )
            for m, n, latest in registry.list_models(session)
        ]
    )


@router.get("/{name}", response_model=schemas.ModelDetail)
def get_model(name: ModelName, session: SessionDep, _: Reader) -> schemas.ModelDetail:
    """One model and the status of each of its versions."""
    model = registry.get_model(session, name)
    published = [v.version for v in model.versions if v.status == registry.STATUS_PUBLISHED]
    return schemas.ModelDetail(
        name=model.name,
        description=model.description,
        created_at=model.created_at,
        created_by=model.created_by,
        versions=len(model.versions),
        latest_published=max(published) if published else None,
        version_list=[
            schemas.VersionSummary(
                version=v.version,
                status=v.status,
                created_at=v.created_at,
                published_at=v.published_at,
            )
            for v in model.versions
        ],
    )


@router.post("/{name}/versions", response_model=schemas.SubmitResult, status_code=202)
def submit_version(
    request: Request,
    name: ModelName,
    session: SessionDep,
    settings: SettingsDep,
    principal: Publisher,
    model: Annotated[UploadFile, File(description="*.onnx or *.pt2")],
    calib: Annotated[UploadFile | None, File(description="CALIB .npz")] = None,
    eval: Annotated[UploadFile | None, File(description="EVAL .npz (may hold labels)")] = None,
    health_check: Annotated[
        UploadFile | None,
        File(description="health_check.json from 'edgefleet compress' (compress=false only)"),
    ] = None,
    drift_reference: Annotated[
        UploadFile | None,
        File(description="drift_reference.json from 'edgefleet compress' (compress=false only)"),
    ] = None,
    version: Annotated[int | None, Form(ge=1, le=MAX_VERSION)] = None,
    compress: Annotated[bool, Form()] = False,
    signing: Annotated[Literal["online", "offline"], Form()] = "online",
    device_classes: Annotated[str, Form(max_length=4096, description="comma-separated")] = "",
    archs: Annotated[str, Form(max_length=4096, description="comma-separated")] = "",
    min_agent_version: Annotated[str, Form(max_length=32)] = "0.1.0",
    min_onnxruntime_version: Annotated[str | None, Form(max_length=32)] = None,
    expires_days: Annotated[int | None, Form(ge=1, le=3650)] = None,
    max_drop: Annotated[float, Form(ge=0, le=1000)] = 0.01,
    description: Annotated[str, Form(max_length=4096)] = "",
    model_card: Annotated[str, Form(max_length=65536, description="JSON object")] = "{}",
) -> schemas.SubmitResult:
    """Upload a model (and CALIB/EVAL) and queue its build; poll the returned job."""
    try:
        card = json.loads(model_card or "{}")
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise InvalidInputError(f"model_card is not JSON: {exc}") from None
    if not isinstance(card, dict):
        raise InvalidInputError("model_card must be a JSON object")
    options = registry.VersionOptions(
        compress=compress,
        signing=signing,
        device_classes=_csv(device_classes, "device classes"),
        archs=_csv(archs, "archs"),
        min_agent_version=min_agent_version,
        min_onnxruntime_version=min_onnxruntime_version or None,
        expires_days=expires_days,
        max_drop=max_drop,
        description=description,
        model_card=card,
    )
    row, job = registry.submit_version(
        session,
        settings,
        name=name,
        version=version,
        model=model.file,
        filename=model.filename or "",
        calib=calib.file if calib else None,
        eval_data=eval.file if eval else None,
        health_check=health_check.file if health_check else None,
        drift_reference=drift_reference.file if drift_reference else None,
        options=options,
        actor=principal.actor,
    )
    roots = request.app.state.trust_roots
    return schemas.SubmitResult(
        version=present.version(row, roots, job.id), job=present.job(job, name, row.version)
    )


@router.get("/{name}/versions/{version}", response_model=schemas.VersionPublic)
def get_version(
    request: Request, name: ModelName, version: VersionNo, session: SessionDep, _: Reader
) -> schemas.VersionPublic:
    """A version: status, compression report, model card, lineage, bundle."""
    row = registry.get_version(session, name, version)
    return present.version(row, request.app.state.trust_roots, _latest_job(session, row.id))


@router.get(
    "/{name}/versions/{version}/manifest",
    response_class=Response,
    responses={200: {"content": {"application/json": {}}, "description": "manifest bytes"}},
)
def get_manifest(name: ModelName, version: VersionNo, session: SessionDep, _: Reader) -> Response:
    """The exact canonical manifest bytes to sign offline (Ed25519 over these bytes)."""
    data = registry.manifest_bytes(session, name, version)
    return Response(content=data, media_type="application/json")


@router.post("/{name}/versions/{version}/signatures", response_model=schemas.VersionPublic)
def add_signature(
    request: Request,
    name: ModelName,
    version: VersionNo,
    body: schemas.SignatureCreate,
    session: SessionDep,
    settings: SettingsDep,
    principal: Publisher,
) -> schemas.VersionPublic:
    """Add one release signature (verified against the trust root's release role)."""
    row = registry.add_signature(
        session, settings, name, version, keyid=body.keyid, sig=body.sig, actor=principal.actor
    )
    return present.version(row, request.app.state.trust_roots, _latest_job(session, row.id))


@router.post("/{name}/versions/{version}/publish", response_model=schemas.VersionPublic)
def publish(
    request: Request,
    name: ModelName,
    version: VersionNo,
    session: SessionDep,
    settings: SettingsDep,
    principal: Publisher,
) -> schemas.VersionPublic:
    """Write the signed bundle once the release threshold is met (409 if published)."""
    row = registry.publish(session, settings, name, version, actor=principal.actor)
    return present.version(row, request.app.state.trust_roots, _latest_job(session, row.id))


@router.get(
    "/{name}/versions/{version}/bundle",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "bundle"}},
)
def get_bundle(
    name: ModelName, version: VersionNo, session: SessionDep, settings: SettingsDep, _: Reader
) -> FileResponse:
    """The published, signed bundle file."""
    row = registry.get_version(session, name, version)
    if row.status != registry.STATUS_PUBLISHED or not row.bundle_file:
        raise NotFoundError(f"{name} version {version} has no published bundle ({row.status})")
    path = settings.bundles_dir / row.bundle_file
    if not path.is_file():
        raise NotFoundError(f"the bundle file of {name} version {version} is missing from storage")
    return FileResponse(
        path,
        media_type="application/octet-stream",
        filename=f"{registry.bundle_id(name, version)}.efb",
    )
