"""Drift reports: stored telemetry histograms -> the analysis core -> a JSON-ready report.

Flow of ``report``: the model version's verified manifest gives the drift
reference (``server.analysis.drift.references_from_profile``) and the
manifest digest -> the telemetry rows of that version in the time range (and
group or device) are read and their per-feature counts summed per device
(histograms on identical edges add up) -> every (device, feature) is judged
and one Benjamini-Hochberg step runs across all of them; the pooled scope
(fleet, group or one device) is judged per feature with its own step; each
device is compared with the rest of the fleet (``outliers``) -> the report.

Invariants: read-only (nothing is written; alerts are the worker's job);
records whose counts are not on the reference's bins (another profile) are
skipped and counted, never summed in; the statistics are those of
``server.analysis`` only.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.errors import EdgefleetError
from edgefleet.manifest import Manifest
from server.analysis.drift import (
    FeatureVerdict,
    Observed,
    ReferenceHistogram,
    judge,
    judge_family,
    outliers,
    pool,
    references_from_profile,
)
from server.analysis.verdict import Status, Thresholds, worst
from server.errors import InvalidInputError, NotFoundError
from server.models import DeviceGroup, Model, ModelVersion, TelemetryRow
from server.services.registry.catalog import STATUS_PUBLISHED, get_version

__all__ = ["latest_published", "reference_of", "report"]

FeatureKey = tuple[str, int]  # (input, column index)


def latest_published(session: Session, model: str) -> ModelVersion:
    """The newest published version of ``model``.

    Raises:
        NotFoundError: the model has no published version.
    """
    row = session.scalar(
        select(ModelVersion)
        .join(Model)
        .where(Model.name == model, ModelVersion.status == STATUS_PUBLISHED)
        .order_by(ModelVersion.version.desc())
        .limit(1)
    )
    if row is None:
        raise NotFoundError(f"model {model!r} has no published version")
    return row


def reference_of(
    version: ModelVersion, thresholds: Thresholds
) -> tuple[str, dict[FeatureKey, ReferenceHistogram]]:
    """The manifest digest and the reference histograms of a published version.

    Raises:
        InvalidInputError: the version has no manifest or no drift reference.
    """
    if version.manifest is None or version.manifest_sha256 is None:
        raise InvalidInputError(f"version {version.version} has no manifest yet")
    try:
        manifest = Manifest.from_bytes(version.manifest)
    except EdgefleetError as exc:  # stored after verification: defence in depth
        raise InvalidInputError(f"the stored manifest does not parse: {exc}") from exc
    profile = manifest.drift_reference
    if not profile or not profile.get("features"):
        raise InvalidInputError(
            f"{manifest.name} v{manifest.version} carries no drift reference features "
            "(build it from calibration data: edgefleet compress, or edgefleet drift profile)"
        )
    refs = references_from_profile(profile, thresholds)
    keys = [(str(f["input"]), int(f["index"])) for f in profile["features"]]
    return version.manifest_sha256, dict(zip(keys, refs, strict=True))


def _rows(
    session: Session,
    model: str,
    version: int,
    *,
    group: str | None,
    device: str | None,
    since: datetime | None,
    until: datetime | None,
) -> Iterator[TelemetryRow]:
    q = select(TelemetryRow).where(
        TelemetryRow.model_name == model, TelemetryRow.model_version == version
    )
    if device is not None:
        q = q.where(TelemetryRow.device_id == device)
    if group is not None:
        members = select(DeviceGroup.device_id).where(DeviceGroup.group == group)
        q = q.where(TelemetryRow.device_id.in_(members))
    if since is not None:
        q = q.where(TelemetryRow.window_end >= since)
    if until is not None:
        q = q.where(TelemetryRow.window_end < until)
    yield from session.scalars(q.order_by(TelemetryRow.id).execution_options(yield_per=500))


def device_histograms(
    rows: Iterator[TelemetryRow], refs: dict[FeatureKey, ReferenceHistogram]
) -> tuple[dict[str, dict[FeatureKey, Observed]], int, int]:
    """Per device and feature, the summed counts; and (records read, histograms skipped)."""
    sums: dict[str, dict[FeatureKey, list[int]]] = {}
    records = skipped = 0
    for row in rows:
        records += 1
        per = sums.setdefault(row.device_id, {})
        for f in row.record.get("features") or []:
            key = (str(f.get("input")), int(f.get("index", -1)))
            ref = refs.get(key)
            counts = f.get("counts") or []
            if ref is None or len(counts) != ref.bins:
                skipped += 1
                continue
            acc = per.setdefault(key, [0] * (ref.bins + 1))
            for i, c in enumerate(counts):
                acc[i] += int(c)
            acc[-1] += int(f.get("nonfinite", 0))
    out = {
        device: {k: Observed(tuple(v[:-1]), v[-1]) for k, v in per.items()}
        for device, per in sums.items()
    }
    return out, records, skipped


def report(
    session: Session,
    model: str,
    version: int | None = None,
    *,
    group: str | None = None,
    device: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    thresholds: Thresholds | None = None,
) -> dict[str, Any]:
    """The drift of one model version's telemetry, per device and for the scope.

    Raises:
        NotFoundError: no such model or version.
        InvalidInputError: both a group and a device, or a version without a drift reference.
    """
    t = thresholds or Thresholds()
    if group is not None and device is not None:
        raise InvalidInputError("give a group or a device, not both")
    row = (
        latest_published(session, model)
        if version is None
        else get_version(session, model, version)
    )
    digest, refs = reference_of(row, t)
    per_device, records, skipped = device_histograms(
        _rows(session, model, row.version, group=group, device=device, since=since, until=until),
        refs,
    )
    empty = Observed((0,) * next(iter(refs.values())).bins)
    keys = list(refs)
    devices = sorted(per_device)
    # Every (device, feature) of this evaluation is one BH family.
    cells = [(d, k, judge(refs[k], per_device[d].get(k, empty), t)) for d in devices for k in keys]
    judged = judge_family([v for _, _, v in cells], t.fdr_q)
    by_device: dict[str, list[FeatureVerdict]] = {d: [] for d in devices}
    for (d, _, _), v in zip(cells, judged, strict=True):
        by_device[d].append(v)
    pooled = judge_family(
        [
            judge(
                refs[k],
                pool([per_device[d].get(k, empty) for d in devices]) if devices else empty,
                t,
            )
            for k in keys
        ],
        t.fdr_q,
    )
    outlying: dict[str, list[str]] = {d: [] for d in devices}
    if device is None:
        for k in keys:
            for d, v in outliers(
                refs[k], {d: per_device[d].get(k, empty) for d in devices}, t
            ).items():
                if v.status in (Status.WARN, Status.ALARM):
                    outlying[d].append(refs[k].name)
    scope = f"device:{device}" if device else f"group:{group}" if group else "fleet"
    fleet_status = worst([v.status for v in pooled])
    return {
        "model": model,
        "version": row.version,
        "manifest_sha256": digest,
        "scope": scope,
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
        "records": records,
        "skipped_histograms": skipped,
        "status": fleet_status.value,
        "features": [v.to_dict() for v in pooled],
        "devices": {
            d: {
                "status": worst([v.status for v in by_device[d]]).value,
                "features": [v.to_dict() for v in by_device[d]],
                "outlier_features": outlying[d],
                # a device alert under a fleet alert on the same feature is not news
                "suppressed": [
                    v.name
                    for v, f in zip(by_device[d], pooled, strict=True)
                    if v.status in (Status.WARN, Status.ALARM)
                    and f.status.severity >= v.status.severity
                ],
            }
            for d in devices
        },
        "thresholds": {
            "psi_warn": t.psi_warn,
            "psi_alarm": t.psi_alarm,
            "min_n": t.min_n,
            "null_quantile": t.null_quantile,
            "fdr_q": t.fdr_q,
        },
    }
