"""Registry builds: ``run_build`` is a build job's work, run by a job worker.

Flow::

    run_build  (load the claimed job's version -> "building"
                -> compress if asked (only through ``compression.compress``)
                -> build_bundle -> pre-signing health check
                -> staged unsigned bundle + manifest stored -> "awaiting_signatures"
                -> signing "online": signed with the server's release key and
                   published at once when that meets the release threshold)

Invariants: nothing is signed before the bundle passes the health check
devices run on install (``preflight``); when compression is missing the job
fails with a message saying so; every failure is a ``BuildError`` whose
message the user sees (the caller marks the job and the version failed).
"""

from __future__ import annotations

import base64
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgefleet.errors import EdgefleetError
from edgefleet.trust import read_header
from server.models import Job, ModelVersion, VersionSignature
from server.services import audit
from server.services.registry.catalog import (
    STATUS_AWAITING,
    STATUS_BUILDING,
    STATUS_PUBLISHED,
    STATUS_QUEUED,
    BuildError,
    Progress,
    _now,
    bundle_path,
)
from server.services.registry.keyring import load_release_key, load_trust_root
from server.services.registry.signing import _publish_locked, _threshold_met
from server.settings import Settings


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

    # Imported here: the preflight module is the one allowed to import the agent
    # (pyproject.toml [tool.importlinter]), and the agent loads onnxruntime.
    from server.services.registry.preflight import preflight

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
        preflight(model_bytes, manifest)
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
