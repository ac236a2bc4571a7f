"""Model registry: uploads, build jobs' work, offline signing and publishing.

Flow::

    submit_version  (validate, store upload, rows: version "queued" + job)
      -> run_build  (worker: compress if asked -> build_bundle -> manifest stored)
         -> signing "online":  signed with the server's release key; published
            at once when that meets the trust root's release threshold
         -> signing "offline" (or threshold > 1): "awaiting_signatures";
            clients fetch ``manifest_bytes``, ``add_signature`` verifies each
            signature against the trust root's release role, ``publish``
            writes the final bundle once the threshold is met.

Invariants: a (name, version) is immutable: once it exists (and has not
failed) any new upload of it answers 409, and a published version's bundle,
manifest and signatures never change (``publish`` twice answers 409). The
bundle file is written atomically at its final path before the row says
"published", and its signatures verify against the trust root (checked
again on the written file). Bad input is refused before any row or file is
touched. Compression runs only through ``compression.compress``; when that
package is missing the job fails with a message saying so.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from edgefleet.errors import EdgefleetError, MalformedBundleError, VerificationError
from edgefleet.keys import KeyFileError, SigningKey, load_signing_key
from edgefleet.manifest import Manifest, Targets, TensorSpec, validate_model_name
from edgefleet.release import attach_signatures
from edgefleet.trust import Signature, TrustRoot, read_header
from server.errors import (
    ConflictError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    UnavailableError,
)
from server.models import Job, Model, ModelVersion, VersionSignature
from server.services import audit
from server.settings import Settings

__all__ = [
    "BuildError",
    "VersionOptions",
    "add_signature",
    "bundle_id",
    "bundle_path",
    "get_model",
    "get_version",
    "list_models",
    "load_release_key",
    "load_trust_root",
    "manifest_bytes",
    "publish",
    "run_build",
    "signature_status",
    "submit_version",
]

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


# ------------------------------------------------------------------ keys


def load_trust_root(settings: Settings) -> TrustRoot:
    """The trust root devices pin (its release role decides who may sign).

    Raises:
        UnavailableError: not configured, unreadable or malformed.
    """
    if settings.trust_root is None:
        raise UnavailableError("this server has no trust root configured (EDGEFLEET_TRUST_ROOT)")
    try:
        return TrustRoot.from_bytes(settings.trust_root.read_bytes())
    except (OSError, VerificationError) as exc:
        raise UnavailableError(f"cannot load trust root {settings.trust_root}: {exc}") from exc


def load_release_key(settings: Settings) -> SigningKey | None:
    """The online release key, or None when the server signs offline only.

    Raises:
        UnavailableError: configured but unreadable.
    """
    if settings.release_key is None:
        return None
    try:
        return load_signing_key(settings.release_key)
    except KeyFileError as exc:
        raise UnavailableError(str(exc)) from exc


# ------------------------------------------------------------ look-ups


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


# --------------------------------------------------------------- submit


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


# ---------------------------------------------------------------- build


@dataclass(frozen=True)
class _BuildInput:
    version_id: int
    name: str
    version: int
    signing: str
    compress: bool
    source_format: str
    source_filename: str
    source_sha256: str
    options: dict[str, Any]
    model_card: dict[str, Any]
    description: str
    created_by: str
    previous: int | None


def _compress(
    inp: _BuildInput, upload: Path, out: Path, progress: Progress
) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    try:
        from compression import CompressConfig, CompressionError, compress
    except ImportError as exc:
        raise BuildError(
            "compression is not available on this server (pip install 'edgefleet[compression]'); "
            f"upload an ONNX model with compress=false instead ({exc})"
        ) from exc
    progress("compressing", 0.1, "pruning, quantizing and gating candidates")
    try:
        result = compress(
            upload / f"source.{inp.source_format}",
            upload / "calib.npz",
            upload / "eval.npz",
            out,
            config=CompressConfig(
                max_drop=float(inp.options.get("max_drop", 0.01)), show_progress=False
            ),
        )
    except CompressionError as exc:
        raise BuildError(f"compression failed: {exc}") from exc
    from edgefleet.build import load_compression_outputs

    return result.model_path.read_bytes(), dict(result.report), load_compression_outputs(out)


def _card(inp: _BuildInput, report: Mapping[str, Any] | None) -> dict[str, Any]:
    card: dict[str, Any] = dict(inp.model_card)
    card.setdefault("name", inp.name)
    card.setdefault("version", inp.version)
    if inp.description:
        card.setdefault("description", inp.description)
    if report is not None:
        card["compression"] = {
            k: report.get(k)
            for k in (
                "metric_name",
                "metric_fp32",
                "metric",
                "metric_drop",
                "max_drop",
                "fp32_bytes",
                "bytes",
                "wire_bytes",
                "size_ratio",
                "wire_ratio",
                "latency_p50_ms_fp32",
                "latency_p50_ms",
            )
        }
        card["compression"]["config"] = (report.get("config") or {}).get("name")
    return card


def _lineage(inp: _BuildInput, job_id: str, extras: Mapping[str, Any]) -> dict[str, str | None]:
    return {
        "source_format": inp.source_format,
        "source_filename": inp.source_filename,
        "source_sha256": inp.source_sha256,
        "compressed": "true" if inp.compress else "false",
        "compression_report_sha256": extras.get("report_sha256"),
        "previous_version": None if inp.previous is None else str(inp.previous),
        "uploaded_by": inp.created_by,
        "build_job": job_id,
        "builder": "edgefleet-server",
    }


def _load_input(session: Session, job: Job) -> _BuildInput:
    if job.version_id is None:
        raise BuildError("the job's version was deleted")
    row = session.get(ModelVersion, job.version_id)
    if row is None:
        raise BuildError("the job's version was deleted")
    if row.status not in (STATUS_QUEUED, STATUS_BUILDING):
        raise BuildError(f"version is {row.status}, not buildable")
    previous = session.scalar(
        select(func.max(ModelVersion.version)).where(
            ModelVersion.model_id == row.model_id,
            ModelVersion.status == STATUS_PUBLISHED,
            ModelVersion.version < row.version,
        )
    )
    row.status = STATUS_BUILDING
    return _BuildInput(
        row.id,
        row.model.name,
        row.version,
        row.signing,
        row.compress,
        row.source_format,
        row.source_filename,
        row.source_sha256,
        dict(row.options),
        dict(row.model_card),
        row.model.description,
        row.created_by,
        previous,
    )


def _preflight(model: bytes, manifest: Manifest) -> None:
    """Run the health check devices run on install, here, before anything is signed.

    The latency budget is not enforced (this is not the device's CPU); outputs,
    shapes, finiteness and the golden comparison are. A bundle that fails here
    would be rolled back by every device.

    Raises:
        BuildError: naming the device's error.
    """
    from agent.errors import HealthCheckError
    from agent.health import run_health_check
    from agent.runtime import make_session

    try:
        run_health_check(make_session(model, 1), manifest, runs=1, latency_factor=math.inf)
    except HealthCheckError as exc:
        raise BuildError(
            f"the bundle's health check fails on the server ({type(exc).__name__}: {exc}); "
            "every device would roll it back"
        ) from exc


def run_build(
    session_factory: Callable[[], Session],
    settings: Settings,
    job_id: str,
    progress: Progress,
) -> str:
    """Build (and when possible publish) the version of a claimed job.

    Returns:
        The version's resulting status (``published`` or ``awaiting_signatures``).

    Raises:
        BuildError: with the message the user sees (the caller marks the job
            and the version failed).
    """
    from edgefleet.build import (
        BuildOptions,
        ModelFileError,
        build_bundle,
        load_compression_outputs,
    )

    with session_factory() as session, session.begin():
        job = session.get(Job, job_id)
        if job is None:
            raise BuildError(f"job {job_id} vanished")
        inp = _load_input(session, job)
    upload = Path(inp.options["upload_dir"])
    release_key = load_release_key(settings) if inp.signing == "online" else None
    root = load_trust_root(settings)
    if release_key is not None and release_key.keyid not in root.role("release").keyids:
        raise BuildError(
            f"the server's release key {release_key.keyid[:12]} is not a release key of "
            f"trust root v{root.version}"
        )
    work_root = settings.effective_storage_dir / "work"
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_root) as tmp:
        report: dict[str, Any] | None = None
        extras: dict[str, Any] = {}
        if inp.compress:
            model_bytes, report, extras = _compress(inp, upload, Path(tmp) / "out", progress)
        else:
            try:
                model_bytes = (upload / "source.onnx").read_bytes()
                # health_check.json / drift_reference.json uploaded with it (validated then)
                extras = {
                    k: v
                    for k, v in load_compression_outputs(upload).items()
                    if k in ("health_check", "drift_reference")
                }
            except OSError as exc:
                raise BuildError(f"the uploaded files are gone from storage: {exc}") from exc
        progress("building", 0.8, "writing the bundle")
        card = _card(inp, report)
        lineage = _lineage(inp, job_id, extras)
        opts = inp.options
        expires = opts.get("expires_days") or settings.bundle_expires_days
        try:
            build_opts = BuildOptions(
                name=inp.name,
                version=inp.version,
                expires_in=timedelta(days=int(expires)),
                device_classes=tuple(opts.get("device_classes", ())),
                archs=tuple(opts.get("archs", ())),
                min_agent_version=opts.get("min_agent_version", "0.1.0"),
                min_onnxruntime_version=opts.get("min_onnxruntime_version"),
                health_check=extras.get("health_check", {}),
                drift_reference=extras.get("drift_reference"),
                lineage=lineage,
                model_card=card,
            )
            unsigned = Path(tmp) / "bundle.efb"
            manifest = build_bundle(
                model_bytes, build_opts, [release_key] if release_key else [], unsigned
            )
        except (ModelFileError, EdgefleetError, ValueError) as exc:
            raise BuildError(f"bundle build failed: {exc}") from exc
        progress("building", 0.85, "running the devices' health check")
        _preflight(model_bytes, manifest)
        try:
            header = read_header(unsigned.read_bytes())
        except EdgefleetError as exc:  # build_bundle checks the limits; defence in depth
            raise BuildError(f"the built bundle does not read back: {exc}") from exc
        staged = bundle_path(settings, inp.name, inp.version, signed=False)
        staged.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(unsigned), staged)
    progress("signing", 0.9, "recording the manifest and signatures")
    with session_factory() as session, session.begin():
        row = session.get(ModelVersion, inp.version_id)
        if row is None:
            raise BuildError("the version was deleted during the build")
        row.manifest = header.manifest_bytes
        row.manifest_sha256 = header.manifest_sha256
        row.report = report
        row.model_card = card
        row.lineage = lineage
        row.status = STATUS_AWAITING
        for sig in header.signatures:
            session.add(
                VersionSignature(
                    version_id=row.id,
                    keyid=sig.keyid,
                    sig=base64.b64encode(sig.sig).decode(),
                    added_by="server:online-release-key",
                    added_at=_now(),
                )
            )
        audit.record(
            session,
            "server:build",
            "version.build",
            f"model/{inp.name}/{inp.version}",
            {
                "job": job_id,
                "manifest_sha256": header.manifest_sha256,
                "model_sha256": manifest.model_entry.uncompressed_sha256,
                "signed_by": [s.keyid for s in header.signatures],
            },
        )
        session.flush()
        session.refresh(row)
        if _threshold_met(row, root):
            _publish_locked(session, settings, row, root, "server:build")
        return row.status


# -------------------------------------------------------- offline signing


def manifest_bytes(session: Session, name: str, version: int) -> bytes:
    """The exact canonical manifest bytes release keys sign.

    Raises:
        NotFoundError: no such version.
        ConflictError: the version has no manifest yet (still building or failed).
    """
    row = get_version(session, name, version)
    if row.manifest is None:
        raise ConflictError(f"{name} version {version} has no manifest yet (status {row.status})")
    return bytes(row.manifest)


def _signatures(row: ModelVersion) -> list[Signature]:
    return [Signature(s.keyid, base64.b64decode(s.sig)) for s in row.signatures]


def _threshold_met(row: ModelVersion, root: TrustRoot) -> bool:
    if row.manifest is None:
        return False
    try:
        root.verify_role_signatures("release", bytes(row.manifest), _signatures(row))
    except VerificationError:
        return False
    return True


def add_signature(
    session: Session,
    settings: Settings,
    name: str,
    version: int,
    *,
    keyid: str,
    sig: str,
    actor: str,
) -> ModelVersion:
    """Verify and store one release signature over the version's manifest; commit.

    Raises:
        NotFoundError: no such version.
        ConflictError: the version is not awaiting signatures.
        InvalidInputError: the key is not a release key of the trust root, the
            signature is not base64, or it does not verify.
        UnavailableError: no trust root configured.
    """
    root = load_trust_root(settings)
    row = get_version(session, name, version)
    if row.status != STATUS_AWAITING:
        raise ConflictError(
            f"{name} version {version} is {row.status}; signatures are accepted only while "
            "awaiting_signatures"
        )
    assert row.manifest is not None
    if keyid not in root.role("release").keyids or keyid not in root.keys:
        raise InvalidInputError(
            f"key {keyid[:12]} is not a release key of trust root v{root.version}"
        )
    try:
        raw = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError("sig must be the base64 Ed25519 signature") from None
    if len(raw) != 64 or not root.keys[keyid].verify(raw, bytes(row.manifest)):
        raise InvalidInputError(
            f"the signature by {keyid[:12]} does not verify over this version's manifest "
            f"(sha256 {row.manifest_sha256})"
        )
    canonical_sig = base64.b64encode(raw).decode()
    existing = next((s for s in row.signatures if s.keyid == keyid), None)
    if existing is None:
        row.signatures.append(
            VersionSignature(keyid=keyid, sig=canonical_sig, added_by=actor, added_at=_now())
        )
    else:
        existing.sig, existing.added_by, existing.added_at = canonical_sig, actor, _now()
    audit.record(session, actor, "version.sign", f"model/{name}/{version}", {"keyid": keyid})
    session.commit()
    return row


def _publish_locked(
    session: Session, settings: Settings, row: ModelVersion, root: TrustRoot, actor: str
) -> None:
    name, version = row.model.name, row.version
    claimed = session.execute(
        update(ModelVersion)
        .where(ModelVersion.id == row.id, ModelVersion.status == STATUS_AWAITING)
        .values(status=STATUS_PUBLISHED, published_at=_now())
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        raise ConflictError(f"{name} version {version} is already published or not ready")
    assert row.manifest is not None
    Manifest.from_bytes(bytes(row.manifest))  # refuse a corrupt stored manifest early
    signatures = _signatures(row)
    signed_by = root.verify_role_signatures("release", bytes(row.manifest), signatures)
    staged = bundle_path(settings, name, version, signed=False)
    final = bundle_path(settings, name, version)
    try:
        with open(staged, "rb") as fh:
            if read_header(fh).manifest_bytes != bytes(row.manifest):
                raise BuildError("the staged bundle does not carry the recorded manifest")
        attach_signatures(staged, signatures, final)
    except (OSError, EdgefleetError, BuildError) as exc:
        raise UnavailableError(
            f"cannot write the bundle of {name} version {version}: {exc}"
        ) from exc
    digest = hashlib.sha256()
    with open(final, "rb") as fh:
        check = read_header(fh)
        fh.seek(0)
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    size = final.stat().st_size
    root.verify_role_signatures("release", check.manifest_bytes, check.signatures)
    session.refresh(row)
    row.bundle_file = str(final.relative_to(settings.bundles_dir))
    row.bundle_sha256 = digest.hexdigest()
    row.bundle_size = size
    audit.record(
        session,
        actor,
        "version.publish",
        f"model/{name}/{version}",
        {"bundle_sha256": row.bundle_sha256, "size": size, "signed_by": sorted(signed_by)},
    )
    staged.unlink(missing_ok=True)


def publish(
    session: Session, settings: Settings, name: str, version: int, *, actor: str
) -> ModelVersion:
    """Write the signed bundle once the release threshold is met, and commit.

    Raises:
        NotFoundError: no such version.
        ConflictError: already published (immutable), not built yet, failed,
            or fewer valid release signatures than the threshold.
        UnavailableError: no trust root, or the bundle could not be written.
    """
    root = load_trust_root(settings)
    row = get_version(session, name, version)
    if row.status == STATUS_PUBLISHED:
        raise ConflictError(
            f"{name} version {version} is already published; versions are immutable"
        )
    if row.status != STATUS_AWAITING:
        raise ConflictError(f"{name} version {version} is {row.status}, not awaiting_signatures")
    if not _threshold_met(row, root):
        have = len(row.signatures)
        raise ConflictError(
            f"{name} version {version} has {have} valid release signature(s); trust root "
            f"v{root.version} needs {root.role('release').threshold}"
        )
    _publish_locked(session, settings, row, root, actor)
    session.commit()
    return row
