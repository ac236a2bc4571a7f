"""Rollouts: the database and desired-state work around the pure core (``server.rollouts``).

Flow: ``create`` checks the candidate (a published version), takes the
group's devices and the version the group runs now (``previous``), stores
the spec and ``policy.start``'s state, and audits. An operator's command
(``request_command``) is stored on the row and taken by the next
``reconcile`` pass: the controller (``server.workers.rollouts``, one replica
under the lease ``rollouts``) loads every rollout that is not finished,
gathers the evidence (``evidence``: the devices' status rows, their
telemetry since the rollout started), calls ``policy.step`` and applies the
actions in the same fenced transaction as the new state: ``Assign`` and
``Revert`` through ``server.services.desired.assign`` (signed per-device
desired states), ``Note`` as a ``RolloutEvent`` row and an audit entry.

Invariants: a rollout's state changes only in a reconcile pass of the lease
holder (a deposed holder's transaction fails its fence and commits
nothing); a crash before the commit changes nothing (the next pass decides
the same again, the core being level-triggered); devices outside the waves
never get a desired state naming the candidate.

Not built yet (docs/rollouts.md): output drift as evidence (the drift gate
does not apply), shadow / A/B / blue-green.
"""

from __future__ import annotations

import statistics
import uuid
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.errors import ConfigError, EdgefleetError
from server.analysis.quality import tally
from server.errors import ConflictError, InvalidInputError, NotFoundError
from server.models import Device, DeviceGroup, Rollout, RolloutEvent, TelemetryRow
from server.rollouts import gates as G
from server.rollouts import policy
from server.rollouts.spec import RolloutSpec
from server.services import audit, desired
from server.services.registry.catalog import STATUS_PUBLISHED, get_version
from server.settings import Settings

__all__ = [
    "COMMANDS",
    "create",
    "evidence",
    "get_rollout",
    "list_rollouts",
    "present",
    "reconcile",
    "request_command",
]

COMMANDS = ("pause", "resume", "abort", "promote")
_UPDATING = {"desired-accepted", "download-started", "download-retry", "download-complete",
             "install-started"}  # fmt: skip
_FAILED = {"desired-rejected", "download-failed", "install-failed", "aborted"}


def _ts(dt: datetime | None) -> float | None:
    if dt is None:
        return None
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


def _group_devices(session: Session, group: str) -> list[tuple[str, str]]:
    rows = session.execute(
        select(Device.id, Device.device_class)
        .join(DeviceGroup, DeviceGroup.device_id == Device.id)
        .where(DeviceGroup.group == group)
        .order_by(Device.id)
    ).all()
    return [(str(d), str(c)) for d, c in rows]


def create(
    session: Session, spec_fields: Mapping[str, Any], *, actor: str, now: datetime
) -> Rollout:
    """Start a rollout (the caller commits).

    ``previous`` defaults to the version the group's desired state names now.

    Raises:
        InvalidInputError: a bad spec (the field named), an empty group, or a
            rollout of this group still running.
        NotFoundError: no such model version.
        ConflictError: the version is not published.
    """
    fields = dict(spec_fields)
    group = str(fields.get("group", ""))
    model, version = fields.get("model"), fields.get("version")
    if not isinstance(model, str) or not isinstance(version, int) or isinstance(version, bool):
        raise InvalidInputError("a rollout needs a model name and an integer version")
    row = get_version(session, model, version)
    if row.status != STATUS_PUBLISHED:
        raise ConflictError(f"{model} version {version} is {row.status}, not published")
    if "previous" not in fields:
        current = desired.current(session, desired.Target("group", group))
        same = current is not None and current.model_name == model
        fields["previous"] = current.model_version if same and current else None
    try:
        spec = RolloutSpec.from_dict(fields)
    except ConfigError as exc:
        raise InvalidInputError(str(exc)) from exc
    if spec.revert_to is not None:
        again = get_version(session, model, spec.revert_to)
        if again.status != STATUS_PUBLISHED:
            raise ConflictError(f"revert_to version {spec.revert_to} is not published")
    devices = _group_devices(session, group)
    if not devices:
        raise InvalidInputError(f"group {group!r} has no devices")
    running = session.scalar(
        select(Rollout.id).where(
            Rollout.group_name == group,
            Rollout.status.not_in([s.value for s in policy.TERMINAL]),
        )
    )
    if running is not None:
        raise InvalidInputError(f"rollout {running} of group {group!r} has not finished")
    rollout_id = uuid.uuid4().hex
    state = policy.start(spec, rollout_id, devices, now.timestamp())
    r = Rollout(
        id=rollout_id, model_name=model, model_version=version, group_name=group,
        spec=spec.to_dict(), state=state.to_dict(), status=state.status.value, command=None,
        created_by=actor, created_at=now, updated_at=now,
    )  # fmt: skip
    session.add(r)
    audit.record(session, actor, "rollout.start", f"rollout/{rollout_id}",
                 {"spec": spec.to_dict(), "devices": len(devices)}, now=now)  # fmt: skip
    return r


def get_rollout(session: Session, rollout_id: str) -> Rollout:
    """Raises: NotFoundError."""
    r = session.get(Rollout, rollout_id)
    if r is None:
        raise NotFoundError(f"no rollout {rollout_id!r}")
    return r


def list_rollouts(session: Session, *, limit: int = 100) -> list[Rollout]:
    return list(session.scalars(select(Rollout).order_by(Rollout.created_at.desc()).limit(limit)))


def request_command(
    session: Session, rollout_id: str, command: str, *, actor: str, now: datetime
) -> Rollout:
    """Queue an operator's command for the next reconcile pass (the caller commits).

    Raises:
        NotFoundError: no such rollout.
        InvalidInputError: an unknown command.
        ConflictError: the rollout has finished.
    """
    if command not in COMMANDS:
        raise InvalidInputError(f"command must be one of {', '.join(COMMANDS)}")
    r = session.get(Rollout, rollout_id, with_for_update=True)
    if r is None:
        raise NotFoundError(f"no rollout {rollout_id!r}")
    if r.status in [s.value for s in policy.TERMINAL]:
        raise ConflictError(f"rollout {rollout_id} is {r.status}")
    r.command = {"command": command, "actor": actor}
    r.updated_at = now
    audit.record(session, actor, f"rollout.{command}", f"rollout/{rollout_id}", {}, now=now)
    return r


def _report(device: Device, spec: RolloutSpec, since: float) -> policy.DeviceReport:
    running = device.model_version if device.model_name == spec.model else None
    update, at, reason = "none", None, None
    last = device.last_update or {}
    ts = last.get("ts")
    if isinstance(ts, (int, float)) and ts >= since:
        kind = str(last.get("kind"))
        model = last.get("model") or {}
        if kind == "committed" and model.get("version") == spec.version:
            update, at = "committed", float(ts)
        elif kind == "rolled-back":
            update, at, reason = "rolled-back", float(ts), last.get("reason")
        elif kind in _FAILED:
            update, at, reason = "failed", float(ts), last.get("reason") or kind
        elif kind in _UPDATING:
            update, at = "downloading", float(ts)
    return policy.DeviceReport(device.id, running, update, at, reason, None, _ts(device.last_seen))


def evidence(
    session: Session, spec: RolloutSpec, state: policy.RolloutState, started: datetime
) -> policy.Evidence:
    """What the devices of a rollout have reported since it started."""
    ids = list(state.order)
    devices = {d.id: d for d in session.scalars(select(Device).where(Device.id.in_(ids)))}
    reports = {}
    for d, s in state.devices.items():
        if d in devices:
            reports[d] = _report(devices[d], spec, s.since)
    told = {d for d, s in state.devices.items() if s.status is not policy.DeviceStatus.PENDING}
    per: dict[str, dict[str, Any]] = {}
    until: dict[str, float] = {}
    rows = session.execute(
        select(TelemetryRow.device_id, TelemetryRow.model_version, TelemetryRow.window_end,
               TelemetryRow.record)
        .where(TelemetryRow.device_id.in_(ids), TelemetryRow.model_name == spec.model,
               TelemetryRow.window_end >= started)
        .execution_options(yield_per=500)
    )  # fmt: skip
    for device_id, version, window_end, record in rows:
        is_canary = device_id in told
        if version != (spec.version if is_canary else spec.previous):
            continue
        end = _ts(window_end) or 0.0
        if is_canary:
            until[device_id] = max(until.get(device_id, 0.0), end)
        acc = per.setdefault(device_id, {"p": 0, "e": 0, "p95": [], "fb": []})
        acc["p"] += int(record.get("predictions") or 0)
        acc["e"] += int(record.get("errors") or 0)
        lat = record.get("latency_ms") or {}
        if lat.get("p95") is not None:
            acc["p95"].append(float(lat["p95"]))
        acc["fb"] += list(record.get("feedback") or [])
    for d, end in until.items():
        if d in reports:
            reports[d] = replace(reports[d], telemetry_until=end)

    def stats(d: str) -> G.DeviceStats:
        acc = per.get(d, {"p": 0, "e": 0, "p95": [], "fb": []})
        q = tally(acc["fb"])
        p95 = statistics.median(acc["p95"]) if acc["p95"] else None
        return G.DeviceStats(d, acc["p"], acc["e"], p95, q.labelled, q.correct)

    canary = [stats(d) for d in sorted(told)]
    control_ids = [d for d in ids if d not in told]
    control = [stats(d) for d in control_ids] if control_ids else None
    return policy.Evidence(reports, canary, control, None, None)


def _apply(
    session: Session, settings: Settings, r: Rollout, spec: RolloutSpec,
    actions: list[policy.Action], now: datetime,
) -> None:  # fmt: skip
    actor = f"rollout:{r.id}"
    for a in actions:
        if isinstance(a, (policy.Assign, policy.Revert)):
            try:
                with session.begin_nested():
                    desired.assign(
                        session, settings, desired.Target("device", a.device_id),
                        model=spec.model, version=a.version, rollout_id=r.id, actor=actor,
                        now=now, commit=False,
                    )  # fmt: skip
            except EdgefleetError as exc:  # the device then times out and counts as failed
                detail = {"decision": "desired-state-failed", "device": a.device_id,
                          "version": a.version, "error": str(exc)}  # fmt: skip
                _note(session, r, "decision", detail, now)
        else:
            _note(session, r, a.kind, a.detail, now)


def _note(session: Session, r: Rollout, kind: str, detail: dict[str, Any], now: datetime) -> None:
    session.add(RolloutEvent(rollout_id=r.id, kind=kind, detail=detail, created_at=now))
    action = "rollout.gates" if kind == "gates" else "rollout.decision"
    audit.record(session, "server:rollouts", action, f"rollout/{r.id}", detail, now=now)


def reconcile(session: Session, settings: Settings, now: datetime) -> int:
    """One pass over every rollout that has not finished; returns how many were stepped.

    Runs in the caller's (fenced) transaction.
    """
    open_rollouts = session.scalars(
        select(Rollout)
        .where(Rollout.status.not_in([s.value for s in policy.TERMINAL]))
        .order_by(Rollout.created_at)
    ).all()
    for r in open_rollouts:
        spec = RolloutSpec.from_dict(r.spec)
        state = policy.RolloutState.from_dict(r.state)
        command = r.command or {}
        ev = evidence(session, spec, state, r.created_at)
        new, actions = policy.step(
            spec, state, ev, now.timestamp(), command.get("command"),
            actor=str(command.get("actor", "controller")),
        )  # fmt: skip
        _apply(session, settings, r, spec, actions, now)
        r.state = new.to_dict()
        r.status = new.status.value
        r.command = None
        r.updated_at = now
    return len(open_rollouts)


def present(session: Session, r: Rollout, *, events: int = 50) -> dict[str, Any]:
    """The JSON form of a rollout: spec, state, per-device states and the latest events."""
    state = r.state
    counts: dict[str, int] = {}
    for d in state["devices"].values():
        counts[d["status"]] = counts.get(d["status"], 0) + 1
    recent = session.scalars(
        select(RolloutEvent).where(RolloutEvent.rollout_id == r.id)
        .order_by(RolloutEvent.id.desc()).limit(events)
    ).all()  # fmt: skip
    return {
        "id": r.id,
        "model": r.model_name,
        "version": r.model_version,
        "group": r.group_name,
        "status": r.status,
        "wave": state["wave"],
        "phase": state["phase"],
        "reason": state["reason"],
        "deadline": state["deadline"],
        "pending_command": r.command,
        "spec": r.spec,
        "device_counts": counts,
        "devices": state["devices"],
        "gates": state["last_gates"],
        "events": [
            {"id": e.id, "kind": e.kind, "at": e.created_at.isoformat(), "detail": e.detail}
            for e in reversed(recent)
        ],
        "created_by": r.created_by,
        "created_at": r.created_at.isoformat(),
        "updated_at": r.updated_at.isoformat(),
    }
