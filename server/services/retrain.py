"""The retraining loop: policies, requests, the dataset export and the hook.

Flow (the drift worker, after each alert evaluation; docs/drift.md):

1. ``evaluate_policies`` reads every model's policy. For its newest published
   version it gathers the fleet alert levels of the version's manifest digest
   and the accuracy of the feedback labels of the last ``retrain_window_hours``,
   and asks ``server.analysis.retrain.decide``.
2. On ``fire`` it stores a ``retrain_requests`` row (the reason, the evidence,
   the window, the model and profile digests) and exports the window's
   sampled inputs with their feedback labels as a content-hashed ``.npz``
   plus a JSON manifest under ``<storage>/retrain/<id>/``. All of this is in
   the worker's transaction and audited (``retrain.request``).
3. ``run_hook`` then runs the configured command, outside any transaction
   (it may take minutes): argv is ``retrain_hook`` plus the manifest path,
   with ``EDGEFLEET_RETRAIN_*`` in the environment, under a timeout, up to
   ``retrain_hook_attempts`` times. Each attempt's exit status and output
   tail is recorded and audited (``retrain.hook``).

Invariants: a request is never fired twice within the policy's cooldown;
the export is written (atomically) before the row that names it commits; a
hook failure is recorded, never raised into the worker.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import uuid
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgefleet import canonical
from edgefleet.errors import ConfigError
from edgefleet.fsutil import atomic_write_bytes
from edgefleet.manifest import Manifest
from server.analysis.quality import (
    Accuracy,
    effective_sample_size,
    estimate_accuracy,
    tally,
)
from server.analysis.retrain import Policy, decide
from server.analysis.verdict import Status
from server.errors import InvalidInputError, NotFoundError
from server.models import DriftAlert, RetrainPolicy, RetrainRequest, TelemetryRow
from server.services import audit
from server.services.drift import calibration_of, latest_published, record_confidence
from server.services.registry.catalog import get_model
from server.settings import Settings

__all__ = [
    "evaluate_policies",
    "get_policy",
    "get_request",
    "list_requests",
    "present",
    "run_hook",
    "set_policy",
]

OUTPUT_TAIL = 4000  # characters of a hook's output kept per attempt


def set_policy(
    session: Session, model: str, policy: Mapping[str, Any], actor: str, now: datetime
) -> Policy:
    """Store ``model``'s retraining policy (replacing any); the caller commits.

    Raises:
        NotFoundError: no such model.
        InvalidInputError: the policy is out of bounds (the message names the field).
    """
    get_model(session, model)
    try:
        parsed = Policy.from_dict(policy)
    except (ConfigError, TypeError, ValueError) as exc:
        raise InvalidInputError(str(exc)) from exc
    row = session.get(RetrainPolicy, model)
    if row is None:
        row = RetrainPolicy(model_name=model, policy={}, updated_at=now, updated_by=actor)
        session.add(row)
    row.policy, row.updated_at, row.updated_by = parsed.to_dict(), now, actor
    audit.record(session, actor, "retrain.policy", f"model/{model}", parsed.to_dict(), now=now)
    return parsed


def get_policy(
    session: Session, model: str, configured: Mapping[str, Mapping[str, Any]] | None = None
) -> Policy | None:
    """The model's policy: set through the API, else ``configured`` (the server config), else None.

    Raises:
        NotFoundError: no such model.
    """
    get_model(session, model)
    row = session.get(RetrainPolicy, model)
    if row is not None:
        return Policy.from_dict(row.policy)
    if configured and model in configured:
        return Policy.from_dict(configured[model])
    return None


def _fleet_levels(session: Session, digest: str) -> tuple[dict[str, Status], dict[str, Any]]:
    levels: dict[str, Status] = {}
    psi: dict[str, Any] = {}
    for a in session.scalars(
        select(DriftAlert).where(DriftAlert.manifest_sha256 == digest, DriftAlert.scope == "fleet")
    ):
        levels[a.subject] = Status(a.level)
        psi[a.subject] = (a.state or {}).get("last_psi")
    return levels, psi


def _window_rows(
    session: Session, model: str, version: int, start: datetime, end: datetime
) -> Iterable[tuple[str, dict[str, Any]]]:
    yield from session.execute(
        select(TelemetryRow.device_id, TelemetryRow.record)
        .where(
            TelemetryRow.model_name == model,
            TelemetryRow.model_version == version,
            TelemetryRow.received_at >= start,
            TelemetryRow.received_at < end,
        )
        .order_by(TelemetryRow.id)
        .execution_options(yield_per=500)
    )


def evaluate_policies(session: Session, settings: Settings, now: datetime) -> list[str]:
    """Decide every policy; store and export the requests that fire. Returns their ids."""
    fired = []
    window = timedelta(hours=settings.retrain_window_hours)
    # the server configuration's policies, overridden per model by those set through the API
    policies = {name: Policy.from_dict(p) for name, p in settings.retrain_policies.items()}
    for row in session.scalars(select(RetrainPolicy)).all():
        policies[row.model_name] = Policy.from_dict(row.policy)
    for model_name, policy in sorted(policies.items()):
        try:
            version = latest_published(session, model_name)
        except NotFoundError:
            continue
        if version.manifest is None or version.manifest_sha256 is None:
            continue
        levels, psi = _fleet_levels(session, version.manifest_sha256)
        start = now - window
        records = list(_window_rows(session, model_name, version.version, start, now))
        quality = Accuracy(0, 0)
        calibration = calibration_of(version)
        confidence: list[int] | None = None
        for _, record in records:
            quality = quality + tally(record.get("feedback") or [])
            if calibration is not None:
                hist = record_confidence(record, int(calibration["output"]))
                if hist is not None and len(hist) == len(calibration["bins"]):
                    confidence = hist if confidence is None else [
                        a + b for a, b in zip(confidence, hist, strict=True)
                    ]  # fmt: skip
        estimate = None
        if calibration is not None:
            counts = confidence or [0] * len(calibration["bins"])
            estimate = estimate_accuracy(calibration, counts)
        last = session.scalar(
            select(func.max(RetrainRequest.created_at)).where(
                RetrainRequest.model_name == model_name
            )
        )
        decision = decide(
            policy, levels, quality, None if last is None else last.timestamp(), now.timestamp(),
            psi=psi, estimate=estimate,
        )  # fmt: skip
        if not decision.fire:
            continue
        fired.append(
            _create(session, settings, version, policy, decision.reason, decision.trigger,
                    quality, records, start, now)
        )  # fmt: skip
    return fired


def _profile_digest(manifest_bytes: bytes) -> str:
    profile = Manifest.from_bytes(manifest_bytes).drift_reference
    return hashlib.sha256(canonical.encode(profile)).hexdigest()


def _create(
    session: Session,
    settings: Settings,
    version: Any,
    policy: Policy,
    reason: str,
    trigger: dict[str, Any],
    quality: Accuracy,
    records: list[tuple[str, dict[str, Any]]],
    start: datetime,
    now: datetime,
) -> str:
    request_id = uuid.uuid4().hex
    directory = settings.effective_storage_dir / "retrain" / request_id
    arrays, stats = export_arrays(records)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    dataset = directory / f"dataset-{digest[:16]}.npz"
    atomic_write_bytes(dataset, data, mode=0o640)
    profile_sha = _profile_digest(version.manifest)
    manifest = {
        "format": "edgefleet.retrain.dataset/1",
        "request": request_id,
        "model": version.model.name,
        "version": version.version,
        "manifest_sha256": version.manifest_sha256,
        "profile_sha256": profile_sha,
        "reason": reason,
        "trigger": trigger,
        "window": {"start": start.isoformat(), "end": now.isoformat()},
        "dataset": {"file": dataset.name, "sha256": digest, "bytes": len(data), **stats},
        "quality": quality.to_dict(),
        "policy": policy.to_dict(),
    }
    manifest_path = directory / "manifest.json"
    atomic_write_bytes(manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())
    session.add(
        RetrainRequest(
            id=request_id,
            model_name=version.model.name,
            model_version=version.version,
            manifest_sha256=version.manifest_sha256,
            profile_sha256=profile_sha,
            reason=reason,
            evidence={
                "trigger": trigger,
                "quality": quality.to_dict(),
                "records": len(records),
                "manifest": str(manifest_path),
            },
            window_start=start,
            window_end=now,
            status="exported" if settings.retrain_hook else "no_hook",
            dataset_path=str(dataset),
            dataset_sha256=digest,
            dataset_rows=stats["rows"],
            labelled_rows=stats["labelled_rows"],
            hook={"command": settings.retrain_hook, "attempts": []},
            created_at=now,
            updated_at=now,
        )
    )
    audit.record(
        session, "server:retrain", "retrain.request", f"retrain/{request_id}",
        {"model": version.model.name, "version": version.version, "reason": reason,
         "dataset_sha256": digest, "rows": stats["rows"]},
        now=now,
    )  # fmt: skip
    return request_id


def _decode(sample: Mapping[str, Any]) -> np.ndarray:
    dtype = np.dtype(str(sample["dtype"])).newbyteorder("<")
    raw = base64.b64decode(sample["data_b64"])
    return np.frombuffer(raw, dtype=dtype).reshape([int(d) for d in sample["shape"]])


def export_arrays(
    records: Iterable[tuple[str, Mapping[str, Any]]],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The window's sampled inputs joined with their feedback labels, as ``.npz`` arrays.

    One row per sampled input row: ``input__NAME`` (stacked when every
    sample of that input has one dtype and trailing shape; the samples that
    do not fit are counted in ``skipped``), ``device_id``, ``prediction_id``,
    ``label`` (text; empty when none arrived), ``labelled`` (bool),
    ``inclusion_probability`` (the device's probability of taking this
    prediction into its samples; NaN from devices that do not report it) and
    ``exploration`` (sampled regardless of the model's output). Weighting
    rows by ``1 / inclusion_probability`` undoes the sampling; the stats
    give Kish's effective sample size of those weights.
    """
    records = list(records)
    labels: dict[tuple[str, int], Any] = {}
    for device, record in records:
        for f in record.get("feedback") or []:
            labels[(device, int(f["prediction_id"]))] = f.get("label")
    columns: dict[str, list[np.ndarray]] = {}
    devices: list[str] = []
    pids: list[int] = []
    row_labels: list[str] = []
    labelled: list[bool] = []
    chances: list[float] = []
    explored: list[bool] = []
    per_sample: list[float | None] = []
    skipped = 0
    shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
    for device, record in records:
        for s in record.get("samples") or []:
            try:
                decoded = {name: _decode(a) for name, a in (s.get("inputs") or {}).items()}
            except (KeyError, TypeError, ValueError):
                skipped += 1
                continue
            if not decoded:
                continue
            first = next(iter(decoded.values()))
            n = int(first.shape[0]) if first.ndim else 1
            fits = all(a.ndim and a.shape[0] == n for a in decoded.values())
            for name, a in decoded.items():
                key = (a.dtype.str, tuple(a.shape[1:]))
                if shapes.setdefault(name, key) != key:
                    fits = False
            if not fits or set(decoded) != set(shapes):
                skipped += 1
                continue
            for name, a in decoded.items():
                columns.setdefault(name, []).append(a)
            pid = int(s["prediction_id"])
            label = labels.get((device, pid))
            chance = s.get("inclusion_probability")
            per_sample.append(chance)
            chances += [float("nan") if chance is None else float(chance)] * n
            explored += [s.get("exploration") is True] * n
            devices += [device] * n
            pids += [pid] * n
            row_labels += ["" if label is None else str(label)] * n
            labelled += [label is not None] * n
    arrays: dict[str, Any] = {
        f"input__{name}": np.concatenate(parts) for name, parts in columns.items()
    }
    rows = len(devices)
    arrays.update(
        device_id=np.asarray(devices, dtype=str),
        prediction_id=np.asarray(pids, dtype=np.int64),
        label=np.asarray(row_labels, dtype=str),
        labelled=np.asarray(labelled, dtype=bool),
        inclusion_probability=np.asarray(chances, dtype=np.float64),
        exploration=np.asarray(explored, dtype=bool),
    )
    ess = effective_sample_size(per_sample)
    stats = {
        "rows": rows,
        "labelled_rows": int(sum(labelled)),
        "skipped_samples": skipped,
        "inputs": sorted(columns),
        "exploration_rows": int(sum(explored)),
        # over the exported samples (a sample may hold several rows of a batch)
        "effective_sample_size": ess["effective_sample_size"],
        "samples_without_probability": ess["rows_without_probability"],
    }
    return arrays, stats


def run_hook(
    session_factory: Callable[[], Session],
    settings: Settings,
    request_id: str,
    *,
    fence: Callable[[Session], None] | None = None,
) -> str:
    """Run the configured hook for a request; record every attempt. Returns the final status."""
    command = settings.retrain_hook
    with session_factory() as s:
        req = s.get(RetrainRequest, request_id)
        if req is None:
            raise NotFoundError(f"no retraining request {request_id!r}")
        manifest = str((req.evidence or {}).get("manifest", ""))
    if not command:
        return "no_hook"
    env = {
        **os.environ,
        "EDGEFLEET_RETRAIN_REQUEST": request_id,
        "EDGEFLEET_RETRAIN_MANIFEST": manifest,
        "EDGEFLEET_RETRAIN_DATASET": str(Path(manifest).parent),
    }
    attempts = []
    status = "hook_failed"
    for attempt in range(1, settings.retrain_hook_attempts + 1):
        started = datetime.now(timezone.utc)
        try:
            done = subprocess.run(
                [*command, manifest], capture_output=True, text=True, env=env,
                timeout=settings.retrain_hook_timeout_seconds, check=False,
            )  # fmt: skip
            code: int | None = done.returncode
            output = (done.stdout + done.stderr)[-OUTPUT_TAIL:]
        except subprocess.TimeoutExpired as exc:
            code = None
            out = exc.stdout or b""
            text = out.decode(errors="replace") if isinstance(out, bytes) else out
            output = (text + f"\n[timed out after {settings.retrain_hook_timeout_seconds} s]")[
                -OUTPUT_TAIL:
            ]
        except OSError as exc:
            code, output = None, f"cannot run {command[0]!r}: {exc}"
        attempts.append({"attempt": attempt, "exit": code, "output_tail": output,
                         "started": started.isoformat(),
                         "finished": datetime.now(timezone.utc).isoformat()})  # fmt: skip
        if code == 0:
            status = "hooked"
            break
    with session_factory() as s, s.begin():
        if fence is not None:
            fence(s)
        req = s.get(RetrainRequest, request_id)
        if req is not None:
            req.hook = {"command": command, "attempts": attempts}
            req.status = status
            req.updated_at = datetime.now(timezone.utc)
            audit.record(
                s, "server:retrain", "retrain.hook", f"retrain/{request_id}",
                {"status": status, "attempts": len(attempts), "exit": attempts[-1]["exit"]},
            )  # fmt: skip
    return status


def list_requests(
    session: Session, *, model: str | None = None, limit: int = 100
) -> list[RetrainRequest]:
    """Newest requests first."""
    q = select(RetrainRequest)
    if model is not None:
        q = q.where(RetrainRequest.model_name == model)
    return list(session.scalars(q.order_by(RetrainRequest.created_at.desc()).limit(limit)))


def get_request(session: Session, request_id: str) -> RetrainRequest:
    """Raises NotFoundError."""
    row = session.get(RetrainRequest, request_id)
    if row is None:
        raise NotFoundError(f"no retraining request {request_id!r}")
    return row


def present(r: RetrainRequest) -> dict[str, Any]:
    """The JSON form of a request."""
    return {
        "id": r.id,
        "model": r.model_name,
        "version": r.model_version,
        "manifest_sha256": r.manifest_sha256,
        "profile_sha256": r.profile_sha256,
        "reason": r.reason,
        "evidence": r.evidence,
        "window": {"start": r.window_start.isoformat(), "end": r.window_end.isoformat()},
        "status": r.status,
        "dataset": {
            "path": r.dataset_path,
            "sha256": r.dataset_sha256,
            "rows": r.dataset_rows,
            "labelled_rows": r.labelled_rows,
        },
        "hook": r.hook,
        "created_at": r.created_at.isoformat(),
        "updated_at": r.updated_at.isoformat(),
    }
