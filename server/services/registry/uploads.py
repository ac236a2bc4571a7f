"""Registry uploads: ``submit_version`` validates and stores a new model version.

Flow::

    submit_version  (validate name/options/files -> copy the upload under
                     uploads_dir with size limits -> rows: version "queued" + job)

The build itself is the job worker's (``builds.run_build``).

Invariants: bad input is refused before any row or file is touched (or the
upload directory is removed again); a (name, version) is immutable: once it
exists and has not failed, a new upload of it answers 409. Every file is
copied with a size limit (``PayloadTooLargeError``) and a model file must be
``*.onnx`` or ``*.pt2``; health check / drift reference metadata must fit
the model's own inputs and outputs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from edgefleet.errors import MalformedBundleError
from edgefleet.manifest import Targets, TensorSpec, validate_model_name
from server.errors import (
    ConflictError,
    InvalidInputError,
    PayloadTooLargeError,
    UnavailableError,
)
from server.models import Job, Model, ModelVersion
from server.services import audit
from server.services.registry.catalog import (
    MAX_MODEL_CARD_BYTES,
    MAX_VERSION,
    STATUS_FAILED,
    STATUS_QUEUED,
    VersionOptions,
    _now,
)
from server.settings import Settings


def _copy_limited(src: IO[bytes], dest: Path, limit: int, what: str) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(dest, "wb") as out:
        while True:
            chunk = src.read(1 << 20)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(f"{what} is larger than the limit of {limit} bytes")
            digest.update(chunk)
            out.write(chunk)
    if size == 0:
        raise InvalidInputError(f"{what} is empty")
    return size, digest.hexdigest()


def _source_format(filename: str) -> str:
    if "\x00" in filename or len(filename) > 256:
        raise InvalidInputError("model file name must be at most 256 characters, without NUL")
    lower = filename.lower()
    if lower.endswith(".onnx"):
        return "onnx"
    if lower.endswith(".pt2"):
        return "pt2"
    raise InvalidInputError(
        f"model file {filename!r}: name it *.onnx (ONNX) or *.pt2 (torch.export archive)"
    )


def _check_options(name: str, options: VersionOptions) -> None:
    try:
        validate_model_name(name)
    except MalformedBundleError as exc:
        raise InvalidInputError(str(exc).removeprefix("manifest: ")) from None
    if options.signing not in ("online", "offline"):
        raise InvalidInputError("signing must be 'online' or 'offline'")
    try:
        Targets.from_dict(
            {
                "device_classes": list(options.device_classes),
                "archs": list(options.archs),
                "min_agent_version": options.min_agent_version,
                "min_onnxruntime_version": options.min_onnxruntime_version or "1.0.0",
                "opset": 17,
            }
        )
    except MalformedBundleError as exc:
        raise InvalidInputError(str(exc).removeprefix("manifest: ")) from None
    if options.expires_days is not None and not 1 <= options.expires_days <= 3650:
        raise InvalidInputError("expires_days must be in [1, 3650]")
    if not 0.0 <= options.max_drop <= 1000.0:
        raise InvalidInputError("max_drop must be in [0, 1000]")
    if len(options.description) > 4096 or "\x00" in options.description:
        raise InvalidInputError("description must be at most 4096 characters, without NUL")
    for text, what in (
        (options.min_agent_version, "min_agent_version"),
        (options.min_onnxruntime_version or "", "min_onnxruntime_version"),
    ):
        if "\x00" in text:
            raise InvalidInputError(f"{what} must not contain NUL")
    if not isinstance(options.model_card, Mapping):
        raise InvalidInputError("model_card must be a JSON object")
    try:
        # UTF-8 (ensure_ascii=False): a lone surrogate escape fails here, not after commit.
        card = json.dumps(dict(options.model_card), allow_nan=False, ensure_ascii=False)
        card_bytes = card.encode("utf-8")
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise InvalidInputError(f"model_card is not plain JSON: {exc}") from None
    if len(card_bytes) > MAX_MODEL_CARD_BYTES:
        raise InvalidInputError(f"model_card is larger than {MAX_MODEL_CARD_BYTES} bytes")
    if _depth(options.model_card) > MAX_MODEL_CARD_DEPTH:
        raise InvalidInputError(
            f"model_card nests deeper than {MAX_MODEL_CARD_DEPTH} levels of objects and lists"
        )


MAX_MODEL_CARD_DEPTH = 32  # levels; the API's response serializer stops far short of 1000


def _depth(value: Any) -> int:
    """Nesting depth of JSON-like data (a scalar is 0), iteratively (no recursion limit)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, Mapping):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, level + 1) for v in item)
        else:
            deepest = max(deepest, level)
            continue
        deepest = max(deepest, level + 1)
    return deepest


def _check_npz(path: Path, what: str) -> None:
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            raise InvalidInputError(f"{what} must be a NumPy .npz archive (numpy.savez)")


_METADATA_MAX_BYTES = 16 << 20  # bytes of one uploaded health_check / drift_reference JSON


def _store_metadata(
    upload_dir: Path,
    source: Path,
    health_check: IO[bytes] | None,
    drift_reference: IO[bytes] | None,
) -> None:
    """Validate the uploaded health check / drift reference and keep them for the build.

    They must fit the manifest schema and name the model's own inputs and
    outputs, so a mismatch is refused now rather than by the build job.

    Raises:
        InvalidInputError: naming the file and the problem.
        PayloadTooLargeError: a file is larger than 16 MiB.
    """
    from edgefleet.build import ModelFileError, check_metadata_fits, describe_model
    from edgefleet.errors import MalformedBundleError
    from edgefleet.manifest import validate_drift_reference, validate_health_check

    found: dict[str, Any] = {}
    for key, upload, validate in (
        ("health_check", health_check, validate_health_check),
        ("drift_reference", drift_reference, validate_drift_reference),
    ):
        if upload is None:
            continue
        path = upload_dir / f"{key}.json"
        _copy_limited(upload, path, _METADATA_MAX_BYTES, key)
        try:
            value = json.loads(path.read_bytes())
            if not isinstance(value, dict):
                raise ValueError("must be a JSON object")
            found[key] = validate(value)
        except (ValueError, RecursionError, MalformedBundleError) as exc:  # ValueError: not JSON
            raise InvalidInputError(f"{key}: {exc}") from None
    if found:
        try:
            check_metadata_fits(
                describe_model(source.read_bytes()),
                found.get("health_check") or {},
                found.get("drift_reference"),
            )
        except ModelFileError as exc:
            raise InvalidInputError(str(exc)) from None


def submit_version(
    session: Session,
    settings: Settings,
    *,
    name: str,
    version: int | None,
    model: IO[bytes],
    filename: str,
    calib: IO[bytes] | None,
    eval_data: IO[bytes] | None,
    options: VersionOptions,
    actor: str,
    health_check: IO[bytes] | None = None,
    drift_reference: IO[bytes] | None = None,
) -> tuple[ModelVersion, Job]:
    """Validate and store an upload, create the version and its build job, commit.

    ``health_check`` and ``drift_reference`` are the JSON files ``edgefleet
    compress`` writes beside a model; they go into the bundle of a model
    uploaded with ``compress=false`` (a compression job makes its own).

    Raises:
        InvalidInputError: bad name, options, model file, data files, health
            check or drift reference (or one of those with ``compress=true``).
        ConflictError: the version exists (versions are immutable).
        PayloadTooLargeError: a file is larger than ``max_upload_bytes``.
        UnavailableError: online signing asked for but no release key is set.
    """
    _check_options(name, options)
    fmt = _source_format(filename)
    if fmt == "pt2" and not options.compress:
        raise InvalidInputError(
            "a .pt2 model must go through compression (it is exported to ONNX there): "
            "upload with compress=true, CALIB and EVAL"
        )
    if options.compress and (calib is None or eval_data is None):
        raise InvalidInputError("compress=true needs both CALIB (calib) and EVAL (eval) .npz files")
    if options.compress and (health_check is not None or drift_reference is not None):
        raise InvalidInputError(
            "health_check and drift_reference come from the compression job with "
            "compress=true; upload them only with compress=false"
        )
    if options.signing == "online" and settings.release_key is None:
        raise UnavailableError(
            "this server holds no online release key (EDGEFLEET_RELEASE_KEY): upload with "
            "signing=offline and sign the manifest with your release key"
        )
    if version is not None and not 1 <= version <= MAX_VERSION:
        raise InvalidInputError(f"version must be an integer in [1, {MAX_VERSION}]")

    model_row = session.scalar(select(Model).where(Model.name == name))
    if model_row is not None and version is not None:
        existing = session.scalar(
            select(ModelVersion).where(
                ModelVersion.model_id == model_row.id, ModelVersion.version == version
            )
        )
        if existing is not None and existing.status != STATUS_FAILED:
            raise ConflictError(
                f"{name} version {version} already exists ({existing.status}); versions are "
                "immutable: upload a new version number"
            )
    upload_dir = settings.uploads_dir / name / uuid.uuid4().hex
    upload_dir.mkdir(parents=True, exist_ok=True)
    try:
        source = upload_dir / f"source.{fmt}"
        size, sha = _copy_limited(model, source, settings.max_upload_bytes, "the model file")
        if fmt == "onnx" and not options.compress:
            from edgefleet.build import ModelFileError, describe_model

            try:
                desc = describe_model(source.read_bytes())
                # What the manifest will say about it must be valid too (names, opset).
                for spec in (*desc.inputs, *desc.outputs):
                    TensorSpec.from_dict(spec.to_dict(), f"io {spec.name[:64]!r}")
                Targets.from_dict({"device_classes": [], "archs": [], "opset": desc.opset,
                                   "min_agent_version": "0.1.0",
                                   "min_onnxruntime_version": "1.0.0"})  # fmt: skip
            except (ModelFileError, MalformedBundleError) as exc:
                reason = str(exc).removeprefix("manifest: ")
                raise InvalidInputError(f"model file {filename!r}: {reason}") from None
        if calib is not None:
            _copy_limited(calib, upload_dir / "calib.npz", settings.max_upload_bytes, "CALIB")
            _check_npz(upload_dir / "calib.npz", "CALIB")
        if eval_data is not None:
            _copy_limited(eval_data, upload_dir / "eval.npz", settings.max_upload_bytes, "EVAL")
            _check_npz(upload_dir / "eval.npz", "EVAL")
        _store_metadata(upload_dir, source, health_check, drift_reference)
        now = _now()
        if model_row is None:
            model_row = Model(
                name=name, description=options.description, created_at=now, created_by=actor
            )
            session.add(model_row)
            session.flush()
            audit.record(session, actor, "model.create", f"model/{name}", {})
        if version is None:
            latest = session.scalar(
                select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model_row.id)
            )
            version = (latest or 0) + 1
        else:
            failed = session.scalar(
                select(ModelVersion).where(
                    ModelVersion.model_id == model_row.id,
                    ModelVersion.version == version,
                    ModelVersion.status == STATUS_FAILED,
                )
            )
            if failed is not None:
                audit.record(
                    session,
                    actor,
                    "version.replace_failed",
                    f"model/{name}/{version}",
                    {"error": (failed.error or "")[:200]},
                )
                session.delete(failed)
                session.flush()
        row = ModelVersion(
            model_id=model_row.id,
            version=version,
            status=STATUS_QUEUED,
            signing=options.signing,
            compress=options.compress,
            source_format=fmt,
            source_filename=Path(filename).name[:256],
            source_sha256=sha,
            source_bytes=size,
            options={**options.to_json(), "upload_dir": str(upload_dir)},
            report=None,
            model_card=dict(options.model_card),
            lineage={},
            created_at=now,
            created_by=actor,
        )
        session.add(row)
        session.flush()
        job = Job(
            id=uuid.uuid4().hex,
            kind="build",
            version_id=row.id,
            status="queued",
            stage="queued",
            progress=0.0,
            message="waiting for a worker",
            attempts=0,
            created_at=now,
            updated_at=now,
        )
        session.add(job)
        audit.record(
            session,
            actor,
            "version.submit",
            f"model/{name}/{version}",
            {"job": job.id, "source_sha256": sha, **options.to_json()},
        )
        session.commit()
    except IntegrityError:
        session.rollback()
        shutil.rmtree(upload_dir, ignore_errors=True)
        raise ConflictError(
            f"{name} version {version} was created concurrently; versions are immutable"
        ) from None
    except BaseException:
        session.rollback()
        shutil.rmtree(upload_dir, ignore_errors=True)
        raise
    return row, job
