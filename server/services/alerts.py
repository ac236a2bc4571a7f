"""Drift alerts: the periodic evaluation that feeds ``server.analysis.alerts`` and persists it.

Flow of ``evaluate(session, thresholds, now)``, run by the drift worker
(``server.workers.drift``) under its lease, in one transaction:

1. For every published model version with a drift reference, the alert rows
   of its manifest digest are loaded, one per scope and subject. Scopes are
   ``fleet``, ``group:NAME`` (a device's current groups) and ``device:ID``;
   subjects ``feature:NAME``, ``channel:INPUT[C]`` and ``output:NAME`` (a
   classifier output's predicted classes).
2. Telemetry of that version that *arrived* since the oldest alert's
   ``pending_since`` is read once; each record's feature counts are added to
   the device's cell, its groups' cells and the fleet's cell, when they
   arrived after that cell's own ``pending_since`` (so every record counts
   exactly once per alert, late windows included).
3. Every cell is judged as arrays (``server.analysis.judge.judge_grid``:
   one grid per kind of scope and bin count), with one Benjamini-Hochberg
   family each for the device, the group and the fleet cells. A judged cell (enough
   observations) advances its alert's state machine and starts a new pooling
   window at ``now``; an ``insufficient`` one keeps pooling.
4. Level changes are appended to the audit log in the same transaction.

Invariants: an alert row is unique per (digest, scope, subject); a new model
version has a new digest, so its baselines start fresh; a crash before the
commit changes nothing (the next run pools the same records again).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from server.analysis.alerts import AlertState, Window, advance
from server.analysis.drift import SubjectKey, add_histogram, record_histograms, subject_of
from server.analysis.judge import FeatureVerdict, apply_fdr, judge_grid
from server.analysis.verdict import Status, Thresholds
from server.errors import InvalidInputError
from server.models import DeviceGroup, DriftAlert, Model, ModelVersion, TelemetryRow
from server.services import audit
from server.services.drift import reference_of
from server.services.registry.catalog import STATUS_PUBLISHED

__all__ = ["EvaluationSummary", "evaluate", "list_alerts", "present"]

FLEET = "fleet"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@dataclass
class EvaluationSummary:
    """What one evaluation did."""

    versions: int = 0
    records: int = 0
    judged: int = 0
    pooling: int = 0  # cells still below min_n
    transitions: int = 0


def evaluate(
    session: Session, thresholds: Thresholds, now: datetime | None = None
) -> EvaluationSummary:
    """Judge every alert whose pooled window is complete; the caller commits."""
    now = now or datetime.now(timezone.utc)
    summary = EvaluationSummary()
    versions = session.scalars(
        select(ModelVersion)
        .join(Model)
        .where(ModelVersion.status == STATUS_PUBLISHED, ModelVersion.manifest.is_not(None))
    ).all()
    for version in versions:
        try:
            digest, refs = reference_of(version, thresholds)
        except InvalidInputError:
            continue  # no drift reference: nothing to judge
        summary.versions += 1
        _evaluate_version(session, version, digest, refs, thresholds, now, summary)
    return summary


def _evaluate_version(
    session: Session,
    version: ModelVersion,
    digest: str,
    refs: dict[SubjectKey, Any],
    t: Thresholds,
    now: datetime,
    summary: EvaluationSummary,
) -> None:
    model_name = version.model.name
    rows = {
        (a.scope, a.subject): a
        for a in session.scalars(select(DriftAlert).where(DriftAlert.manifest_sha256 == digest))
    }
    # Every device and feature seen before has an alert row (created when its
    # records were first read), so nothing older than the oldest window is needed.
    start = min((a.pending_since for a in rows.values()), default=_EPOCH)
    groups: dict[str, list[str]] = {}
    for device_id, group in session.execute(select(DeviceGroup.device_id, DeviceGroup.group)):
        groups.setdefault(device_id, []).append(f"group:{group}")
    sums: dict[tuple[str, SubjectKey], list[int]] = {}
    query = (
        select(TelemetryRow.device_id, TelemetryRow.received_at, TelemetryRow.record)
        .where(
            TelemetryRow.model_name == model_name,
            TelemetryRow.model_version == version.version,
            TelemetryRow.received_at >= start,
            TelemetryRow.received_at < now,
        )
        .execution_options(yield_per=500)
    )
    for device_id, received_at, record in session.execute(query):
        summary.records += 1
        for key, counts, nonfinite in record_histograms(record):
            ref = refs.get(key)
            if ref is None or len(counts) != ref.bins:
                continue
            for scope in (f"device:{device_id}", FLEET, *groups.get(device_id, ())):
                alert = rows.get((scope, subject_of(key, ref)))
                if alert is not None and received_at < alert.pending_since:
                    continue
                add_histogram(sums, (scope, key), counts, nonfinite)
    verdicts = _judge_cells(sums, refs, t)
    for (scope, key), v in sorted(verdicts.items()):
        ref = refs[key]
        alert = rows.get((scope, subject_of(key, ref)))
        if alert is None:
            alert = DriftAlert(
                model_name=model_name,
                model_version=version.version,
                manifest_sha256=digest,
                scope=scope,
                subject=subject_of(key, ref),
                level=Status.INSUFFICIENT.value,
                state=AlertState(digest).to_dict(),
                pending_since=_EPOCH,
                last_reason="",
                updated_at=now,
            )
            session.add(alert)
        if v.status is Status.INSUFFICIENT:
            summary.pooling += 1
            alert.last_reason = v.reason
            alert.updated_at = now
            continue
        summary.judged += 1
        comp = v.comparison
        state, transitions = advance(
            AlertState.from_dict(alert.state),
            Window(v.status, None if comp is None else comp.psi, v.warn_at, v.alarm_at, digest,
                   now.timestamp()),
        )  # fmt: skip
        alert.state = state.to_dict()
        alert.level = state.level.value
        alert.pending_since = now
        alert.last_judged = now
        alert.last_reason = v.reason
        alert.updated_at = now
        if transitions:
            alert.since = now
        session.flush()
        for tr in transitions:
            summary.transitions += 1
            audit.record(
                session,
                "server:drift",
                "drift.alert",
                f"alert/{alert.id}",
                {
                    "model": model_name,
                    "version": version.version,
                    "scope": scope,
                    "subject": alert.subject,
                    "from": tr.before.value,
                    "to": tr.after.value,
                    "reason": tr.reason,
                    "psi": None if comp is None else round(comp.psi, 6),
                },
                now=now,
            )


def _judge_cells(
    sums: dict[tuple[str, SubjectKey], list[int]],
    refs: dict[SubjectKey, Any],
    t: Thresholds,
) -> dict[tuple[str, SubjectKey], FeatureVerdict]:
    """Judge every pooled cell: one grid per kind of scope and bin count, one BH family per kind.

    The grid's rows are the scopes that have a cell, its columns the
    subjects of that bin count; a (scope, subject) without records stays
    empty (n = 0), is not judged and takes no part in the family.
    """
    out: dict[tuple[str, SubjectKey], FeatureVerdict] = {}
    kinds: dict[str, list[tuple[str, SubjectKey]]] = {"device": [], "group": [], FLEET: []}
    for cell in sums:
        kinds[cell[0].split(":", 1)[0]].append(cell)
    for cells in kinds.values():
        by_bins: dict[int, list[tuple[str, SubjectKey]]] = {}
        for cell in cells:
            by_bins.setdefault(refs[cell[1]].bins, []).append(cell)
        layouts, grids = [], []
        for bins, members in sorted(by_bins.items()):
            scopes = sorted({scope for scope, _ in members})
            keys = sorted({key for _, key in members})
            row = {scope: i for i, scope in enumerate(scopes)}
            col = {key: j for j, key in enumerate(keys)}
            counts = np.zeros((len(scopes), len(keys), bins), dtype=np.int64)
            nonfinite = np.zeros((len(scopes), len(keys)), dtype=np.int64)
            for scope, key in members:
                acc = sums[(scope, key)]
                counts[row[scope], col[key]] = acc[:-1]
                nonfinite[row[scope], col[key]] = acc[-1]
            grids.append(judge_grid([refs[k] for k in keys], counts, nonfinite, t))
            layouts.append((members, row, col))
        for grid, (members, row, col) in zip(apply_fdr(grids, t.fdr_q), layouts, strict=True):
            for scope, key in members:
                out[(scope, key)] = grid.verdict(row[scope], col[key])
    return out


def list_alerts(
    session: Session,
    *,
    model: str | None = None,
    level: str | None = None,
    scope: str | None = None,
    limit: int = 100,
) -> tuple[list[DriftAlert], int, dict[tuple[str, str], str]]:
    """Alerts matching the filters (most severe and newest first), how many, and fleet levels.

    The third value maps (digest, subject) to the fleet alert's level, so a
    caller can mark device alerts a fleet alert covers.
    """
    q = select(DriftAlert)
    if model is not None:
        q = q.where(DriftAlert.model_name == model)
    if level is not None:
        q = q.where(DriftAlert.level == level)
    if scope is not None:
        q = q.where(DriftAlert.scope == scope)
    total = session.scalar(select(func.count()).select_from(q.subquery())) or 0
    rows = list(session.scalars(q.order_by(DriftAlert.updated_at.desc(), DriftAlert.id)).all())
    rows.sort(key=lambda a: -Status(a.level).severity)  # stable: newest first within a level
    rows = rows[:limit]
    digests = {a.manifest_sha256 for a in rows}
    fleet = {
        (a.manifest_sha256, a.subject): a.level
        for a in session.scalars(
            select(DriftAlert).where(
                DriftAlert.scope == FLEET, DriftAlert.manifest_sha256.in_(digests)
            )
        )
    }
    return rows, int(total), fleet


def present(alert: DriftAlert, fleet_levels: dict[tuple[str, str], str]) -> dict[str, Any]:
    """The JSON form of an alert; ``suppressed`` when a fleet alert at least as severe covers it."""
    fleet = fleet_levels.get((alert.manifest_sha256, alert.subject))
    suppressed = (
        alert.scope != FLEET
        and alert.level in ("warn", "alarm")
        and fleet is not None
        and Status(fleet).severity >= Status(alert.level).severity
    )
    state = alert.state or {}
    return {
        "id": alert.id,
        "model": alert.model_name,
        "version": alert.model_version,
        "manifest_sha256": alert.manifest_sha256,
        "scope": alert.scope,
        "subject": alert.subject,
        "level": alert.level,
        "since": alert.since.isoformat() if alert.since else None,
        "last_judged": alert.last_judged.isoformat() if alert.last_judged else None,
        "pending_since": alert.pending_since.isoformat(),
        "last_psi": state.get("last_psi"),
        "recent": list(state.get("recent", [])),
        "reason": alert.last_reason,
        "suppressed": suppressed,
    }
