"""Drift reports: stored telemetry histograms -> the analysis core -> a JSON-ready report.

Flow of ``report``: the model version's verified manifest gives the drift
reference (``server.analysis.drift.references_from_profile``) and the
manifest digest -> the telemetry rows of that version in the time range (and
group or device) are read and their per-feature counts summed per device
(histograms on identical edges add up) -> every (device, feature) is judged
and one Benjamini-Hochberg step runs across all of them; the pooled scope
(fleet, group or one device) is judged per feature with its own step; each
device is compared with the rest of the fleet (``outliers``); feedback
labels give the accuracy (``server.analysis.quality``) -> the report.

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
    Observed,
    ReferenceHistogram,
    SubjectKey,
    add_histogram,
    observed_of,
    pool,
    profile_references,
    record_histograms,
    subject_of,
)
from server.analysis.judge import (
    FeatureVerdict,
    judge,
    judge_family,
    judge_many,
    outliers,
)
from server.analysis.quality import (
    Accuracy,
    effective_sample_size,
    estimate_accuracy,
    feedback_audit,
    label_delays,
    scored_pairs,
    split_by_exploration,
    tally,
)
from server.analysis.verdict import Status, Thresholds, worst
from server.errors import InvalidInputError, NotFoundError
from server.models import DeviceGroup, Model, ModelVersion, TelemetryRow
from server.services.registry.catalog import STATUS_PUBLISHED, get_version

__all__ = ["feedback_report", "latest_published", "reference_of", "report"]


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
) -> tuple[str, dict[SubjectKey, ReferenceHistogram]]:
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
    refs = profile_references(profile, thresholds) if profile else {}
    if not refs:
        raise InvalidInputError(
            f"{manifest.name} v{manifest.version} carries no drift reference "
            "(build it from calibration data: edgefleet compress, or edgefleet drift profile)"
        )
    return version.manifest_sha256, refs


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


def calibration_of(version: ModelVersion) -> dict[str, Any] | None:
    """The calibration table of a version's drift reference (None without one)."""
    if version.manifest is None:
        return None
    try:
        profile = Manifest.from_bytes(version.manifest).drift_reference
    except EdgefleetError:
        return None
    table = (profile or {}).get("calibration")
    return dict(table) if table else None


def record_confidence(record: dict[str, Any], output: int) -> list[int] | None:
    """The ``confidence`` histogram of output ``output`` in one telemetry record, if sent."""
    for o in record.get("outputs") or []:
        if o.get("index") == output and o.get("confidence"):
            return [int(c) for c in o["confidence"]]
    return None


def device_histograms(
    rows: Iterator[TelemetryRow],
    refs: dict[SubjectKey, ReferenceHistogram],
    quality: dict[str, Accuracy] | None = None,
    confidence: tuple[int, dict[str, list[int]]] | None = None,
) -> tuple[dict[str, dict[SubjectKey, Observed]], int, int]:
    """Per device and subject, the summed counts; and (records read, histograms skipped).

    When ``quality`` is given, each device's feedback labels are scored into
    it; when ``confidence`` is ``(output, sums)``, each device's confidence
    histograms of that output are summed into ``sums``.
    """
    sums: dict[str, dict[SubjectKey, list[int]]] = {}
    records = skipped = 0
    for row in rows:
        records += 1
        per = sums.setdefault(row.device_id, {})
        if quality is not None:
            scored = tally(row.record.get("feedback") or [])
            quality[row.device_id] = quality.get(row.device_id, Accuracy(0, 0)) + scored
        if confidence is not None:
            hist = record_confidence(row.record, confidence[0])
            if hist is not None:
                acc = confidence[1].setdefault(row.device_id, [0] * len(hist))
                if len(acc) == len(hist):
                    confidence[1][row.device_id] = [a + b for a, b in zip(acc, hist, strict=True)]
        for key, counts, nonfinite in record_histograms(row.record):
            ref = refs.get(key)
            if ref is None or len(counts) != ref.bins:
                skipped += 1
                continue
            add_histogram(per, key, counts, nonfinite)
    out = {device: {k: observed_of(v) for k, v in per.items()} for device, per in sums.items()}
    return out, records, skipped


KINDS = (("feature", "features"), ("channel", "channels"), ("output", "outputs"))


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
    quality: dict[str, Accuracy] = {}
    calibration = calibration_of(row)
    confidence: dict[str, list[int]] = {}
    per_device, records, skipped = device_histograms(
        _rows(session, model, row.version, group=group, device=device, since=since, until=until),
        refs,
        quality,
        None if calibration is None else (int(calibration["output"]), confidence),
    )

    def estimated(hist: list[int] | None) -> dict[str, Any] | None:
        if calibration is None:
            return None
        bins = len(calibration["bins"])
        counts = hist if hist is not None and len(hist) == bins else [0] * bins
        return estimate_accuracy(calibration, counts).to_dict()

    fleet_confidence = [sum(col) for col in zip(*confidence.values(), strict=True)] or None
    keys = list(refs)
    devices = sorted(per_device)

    def empty(k: SubjectKey) -> Observed:
        return Observed((0,) * refs[k].bins)

    # Every (device, subject) of this evaluation is one BH family.
    per_key = {
        k: judge_many(refs[k], [per_device[d].get(k, empty(k)) for d in devices], t) for k in keys
    }
    cells = [(d, k, per_key[k][i]) for i, d in enumerate(devices) for k in keys]
    judged = judge_family([v for _, _, v in cells], t.fdr_q)
    by_device: dict[str, dict[SubjectKey, FeatureVerdict]] = {d: {} for d in devices}
    for (d, k, _), v in zip(cells, judged, strict=True):
        by_device[d][k] = v
    pooled_list = judge_family(
        [
            judge(refs[k], pool([per_device[d].get(k, empty(k)) for d in devices]), t)
            if devices
            else judge(refs[k], empty(k), t)
            for k in keys
        ],
        t.fdr_q,
    )
    pooled = dict(zip(keys, pooled_list, strict=True))
    outlying: dict[str, list[str]] = {d: [] for d in devices}
    if device is None:
        for k in keys:
            cells_k = {d: per_device[d].get(k, empty(k)) for d in devices}
            for d, v in outliers(refs[k], cells_k, t).items():
                if v.status in (Status.WARN, Status.ALARM):
                    outlying[d].append(subject_of(k, refs[k]))
    scope = f"device:{device}" if device else f"group:{group}" if group else "fleet"

    def sections(verdicts: dict[SubjectKey, FeatureVerdict]) -> dict[str, list[dict[str, Any]]]:
        return {
            plural: [verdicts[k].to_dict() for k in keys if k[0] == kind] for kind, plural in KINDS
        }

    return {
        "model": model,
        "version": row.version,
        "manifest_sha256": digest,
        "scope": scope,
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
        "records": records,
        "skipped_histograms": skipped,
        "status": worst([v.status for v in pooled.values()]).value,
        **sections(pooled),
        "quality": {
            **sum(quality.values(), Accuracy(0, 0)).to_dict(),
            "estimated": estimated(fleet_confidence),
        },
        "devices": {
            d: {
                "status": worst([v.status for v in by_device[d].values()]).value,
                **sections(by_device[d]),
                "quality": {
                    **quality.get(d, Accuracy(0, 0)).to_dict(),
                    "estimated": estimated(confidence.get(d)),
                },
                "outliers": outlying[d],
                # a device verdict under a scope verdict at least as severe is not news
                "suppressed": [
                    subject_of(k, refs[k])
                    for k, v in by_device[d].items()
                    if v.status in (Status.WARN, Status.ALARM)
                    and pooled[k].status.severity >= v.status.severity
                ],
            }
            for d in devices
        },
        "thresholds": t.to_dict(),
    }


def feedback_report(
    session: Session,
    model: str,
    version: int | None = None,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
) -> dict[str, Any]:
    """The feedback-loop audit of a model version's telemetry (``server.analysis.quality``).

    Predictions per class come from output 0's class counts, labels from
    ``feedback[]`` (scored when the label is a class id and the prediction
    known); the label delay from their ``predicted_at``/``labelled_at``; the
    exploration holdout from their ``exploration`` flags; the samples'
    effective size from their inclusion probabilities (Kish).

    Raises:
        NotFoundError: no such model or version.
    """
    row = (
        latest_published(session, model)
        if version is None
        else get_version(session, model, version)
    )
    predicted: dict[int, int] = {}
    pairs: list[tuple[int, int]] = []
    feedback: list[dict[str, Any]] = []
    probabilities: list[float | None] = []
    unscored = records = 0
    for r in _rows(session, model, row.version, group=None, device=None, since=since, until=until):
        records += 1
        for o in r.record.get("outputs") or []:
            if o.get("index") == 0 and o.get("classes"):
                for c, k in enumerate(o["classes"]):
                    predicted[c] = predicted.get(c, 0) + int(k)
        entries = r.record.get("feedback") or []
        scored, skipped = scored_pairs(entries)
        pairs += scored
        unscored += skipped
        feedback += entries
        probabilities += [s.get("inclusion_probability") for s in r.record.get("samples") or []]
    audit = feedback_audit(predicted, pairs, unscored)
    explored, selected, unflagged = split_by_exploration(feedback)
    return {
        "model": model,
        "version": row.version,
        "records": records,
        **audit,
        "label_delay": label_delays(feedback),
        "exploration_holdout": {
            "exploration": explored.to_dict(),
            "model_selected": selected.to_dict(),
            "unflagged_labels": unflagged,
            # the holdout's accuracy is unbiased; a gap says the labels are chosen by the model
            "accuracy_gap": (
                None
                if explored.value is None or selected.value is None
                else round(selected.value - explored.value, 6)
            ),
        },
        "samples": effective_sample_size(probabilities),
    }
