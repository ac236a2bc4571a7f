"""The rollout decision core: spec, state, evidence, clock and command in; state and actions out.

Pure: no database, no broker, no clock of its own. A controller loads a
rollout's persisted state, gathers the evidence (per-device update reports
and telemetry, cohort statistics, drift verdicts), calls ``step`` and applies
the returned actions (desired-state changes, audit and gate-evaluation
records) in the same transaction as the new state. Calling ``step`` again
with the same inputs changes nothing and emits nothing new: the loop is
level-triggered, so a crash between passes loses nothing.

Rollout states: ``running`` (phase ``deploying`` -> ``evaluating`` per wave),
``paused`` (by an operator, or when an evaluation stays inconclusive past its
deadline), ``completed``, ``aborting`` -> ``reverted``, and
``needs-attention`` (a revert did not finish in time, or there is nothing to
revert to). Device states: ``pending`` (not in a wave: never told of the
candidate), ``notified``, ``downloading``, ``soaking`` (committed; its own
telemetry must cover ``soak_s`` after the commit), ``succeeded``,
``failed``, ``rolled-back`` (by the device's own health check),
``timed-out``, ``reverting``, ``reverted``.

Transitions (docs/rollouts.md has the table):

* deploying: the wave's pending devices get ``Assign`` and become
  ``notified``; reports move them on; a device not committed within
  ``device_timeout_s`` of its notification, or without telemetry through its
  soak by then, is ``timed-out``. When every device of the wave has finished,
  the phase is ``evaluating`` with a decision deadline.
* evaluating: the gates (``server.rollouts.gates``) decide: pass -> the
  next wave (or ``completed``), fail -> ``aborting``, inconclusive -> wait;
  past the deadline -> ``paused`` for a person. Never a pass by default.
* the update-failure gate also runs throughout ``deploying``.
* aborting: every device told of the candidate gets ``Revert`` to
  ``revert_to`` (the previous payload re-released above the candidate, which
  devices that committed the candidate accept under their rollback floor) or,
  without one, to ``previous`` (accepted only by devices that never
  committed the candidate; the others need attention); it is ``reverting``
  until a report made after the revert says it runs that version, then
  ``reverted``. Pending devices are never told. A revert not done within
  ``device_timeout_s`` needs attention.
* commands: ``pause``, ``resume``, ``abort`` and ``promote`` (take the next
  wave now, gates skipped, recorded as the operator's decision).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from server.analysis.verdict import Status
from server.rollouts import cohorts
from server.rollouts import gates as G
from server.rollouts.spec import RolloutSpec

__all__ = [
    "TERMINAL",
    "Assign",
    "DeviceReport",
    "DeviceState",
    "DeviceStatus",
    "Evidence",
    "Note",
    "Phase",
    "Revert",
    "RolloutState",
    "RolloutStatus",
    "start",
    "step",
]

Command = Literal["pause", "resume", "abort", "promote"]


class RolloutStatus(str, enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTING = "aborting"
    REVERTED = "reverted"
    NEEDS_ATTENTION = "needs-attention"


TERMINAL = (RolloutStatus.COMPLETED, RolloutStatus.REVERTED)


class Phase(str, enum.Enum):
    DEPLOYING = "deploying"
    EVALUATING = "evaluating"


class DeviceStatus(str, enum.Enum):
    PENDING = "pending"
    NOTIFIED = "notified"
    DOWNLOADING = "downloading"
    SOAKING = "soaking"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled-back"
    TIMED_OUT = "timed-out"
    REVERTING = "reverting"
    REVERTED = "reverted"


IN_FLIGHT = (DeviceStatus.NOTIFIED, DeviceStatus.DOWNLOADING, DeviceStatus.SOAKING)
FAILURES = (DeviceStatus.FAILED, DeviceStatus.ROLLED_BACK, DeviceStatus.TIMED_OUT)
FINISHED = (DeviceStatus.SUCCEEDED, *FAILURES)


@dataclass(frozen=True)
class DeviceState:
    status: DeviceStatus
    since: float  # when it entered this status (absolute; timers are deadlines from it)
    wave: int  # the wave that took it (-1: none)
    reason: str = ""
    committed: bool = False  # it committed the candidate: its rollback floor moved there

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status.value, "since": self.since, "wave": self.wave,
                "reason": self.reason, "committed": self.committed}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DeviceState:
        return cls(DeviceStatus(d["status"]), float(d["since"]), int(d["wave"]),
                   str(d.get("reason", "")), bool(d.get("committed", False)))  # fmt: skip


@dataclass(frozen=True)
class RolloutState:
    """Everything the controller persists for one rollout (JSON-ready through ``to_dict``)."""

    status: RolloutStatus
    wave: int
    phase: Phase
    order: tuple[str, ...]  # the group's devices in wave order, fixed at the start
    devices: Mapping[str, DeviceState]
    deadline: float | None = None  # of the current evaluation
    reason: str = ""
    last_gates: tuple[dict[str, Any], ...] = ()  # the latest evaluation's gate results

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "wave": self.wave,
            "phase": self.phase.value,
            "order": list(self.order),
            "devices": {d: s.to_dict() for d, s in self.devices.items()},
            "deadline": self.deadline,
            "reason": self.reason,
            "last_gates": list(self.last_gates),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RolloutState:
        return cls(
            RolloutStatus(d["status"]), int(d["wave"]), Phase(d["phase"]), tuple(d["order"]),
            {k: DeviceState.from_dict(v) for k, v in d["devices"].items()},
            d.get("deadline"), str(d.get("reason", "")), tuple(d.get("last_gates", ())),
        )  # fmt: skip


@dataclass(frozen=True)
class DeviceReport:
    """What a device has reported that bears on the rollout.

    ``running`` is the version it reports serving, as of ``seen_at`` (its
    latest status or event); ``update`` the last update event about the
    candidate (``none``, ``downloading``, ``committed``, ``rolled-back``,
    ``failed``) with its time ``at`` and reason; ``telemetry_until`` the end
    of its latest telemetry window on the candidate.
    """

    device_id: str
    running: int | None = None
    update: str = "none"
    at: float | None = None
    reason: str | None = None
    telemetry_until: float | None = None
    seen_at: float | None = None


@dataclass(frozen=True)
class Evidence:
    """The controller's reading of the fleet for one pass."""

    reports: Mapping[str, DeviceReport] = field(default_factory=dict)
    canary: Sequence[G.DeviceStats] = ()
    control: Sequence[G.DeviceStats] | None = None  # None: no device left on the old version
    canary_drift: Status | None = Status.INSUFFICIENT  # None: no output reference to judge by
    control_drift: Status | None = None


@dataclass(frozen=True)
class Assign:
    """Point the device's desired state at the candidate."""

    device_id: str
    version: int


@dataclass(frozen=True)
class Revert:
    """Return the device to ``version`` (the controller re-issues it above the rollback floor)."""

    device_id: str
    version: int


@dataclass(frozen=True)
class Note:
    """A decision or gate evaluation to store and audit."""

    kind: str  # "decision" | "gates"
    detail: dict[str, Any]


Action = Assign | Revert | Note


def start(
    spec: RolloutSpec, rollout_id: str, devices: Sequence[tuple[str, str]], now: float
) -> RolloutState:
    """The initial state: every device of the group pending, in wave order, wave 0 deploying."""
    order = tuple(cohorts.order(rollout_id, devices))
    return RolloutState(
        RolloutStatus.RUNNING, 0, Phase.DEPLOYING, order,
        {d: DeviceState(DeviceStatus.PENDING, now, -1) for d in order},
    )  # fmt: skip


def _wave_members(spec: RolloutSpec, state: RolloutState, wave: int) -> tuple[str, ...]:
    sizes = cohorts.wave_sizes(spec.waves, len(state.order))
    return state.order[: sizes[min(wave, len(sizes) - 1)]]


def _advance_device(
    spec: RolloutSpec, s: DeviceState, r: DeviceReport | None, now: float
) -> DeviceState:
    """One device's state from its report and the clock (deploying and soaking)."""
    r = r or DeviceReport("")
    if s.status in (DeviceStatus.NOTIFIED, DeviceStatus.DOWNLOADING):
        if r.update == "committed" and r.running == spec.version:
            return replace(s, status=DeviceStatus.SOAKING, since=r.at if r.at is not None else now,
                           reason="committed its health check", committed=True)  # fmt: skip
        if r.update in ("rolled-back", "failed"):
            status = DeviceStatus.ROLLED_BACK if r.update == "rolled-back" else DeviceStatus.FAILED
            return replace(s, status=status, since=now, reason=r.reason or r.update)
        if now - s.since > spec.device_timeout_s:
            why = f"not committed within {spec.device_timeout_s:.0f} s"
            return replace(s, status=DeviceStatus.TIMED_OUT, since=now, reason=why)
        if r.update == "downloading" and s.status is DeviceStatus.NOTIFIED:
            return replace(s, status=DeviceStatus.DOWNLOADING)
        return s
    if s.status is DeviceStatus.SOAKING:
        if r.update in ("rolled-back", "failed") or (
            r.running is not None and r.running != spec.version
        ):
            return replace(s, status=DeviceStatus.ROLLED_BACK, since=now,
                           reason=r.reason or f"runs version {r.running} again")  # fmt: skip
        soaked = s.since + spec.soak_s
        if now >= soaked and r.telemetry_until is not None and r.telemetry_until >= soaked:
            return replace(s, status=DeviceStatus.SUCCEEDED, since=now,
                           reason=f"soaked {spec.soak_s:.0f} s with telemetry")  # fmt: skip
        if now - soaked > spec.device_timeout_s:
            return replace(s, status=DeviceStatus.TIMED_OUT, since=now,
                           reason="no telemetry through the soak window")  # fmt: skip
    return s


def step(
    spec: RolloutSpec,
    state: RolloutState,
    evidence: Evidence,
    now: float,
    command: Command | None = None,
    *,
    actor: str = "controller",
) -> tuple[RolloutState, list[Action]]:
    """One reconcile: the next state and the actions that bring the fleet to it."""
    actions: list[Action] = []
    if state.status in TERMINAL:
        if command is not None:
            why = f"ignored: the rollout is {state.status.value}"
            actions.append(Note("decision", {"command": command, "actor": actor, "result": why}))
        return state, actions
    state = _command(spec, state, command, now, actor, actions)
    devices = dict(state.devices)
    reports = evidence.reports
    for d, s in devices.items():
        devices[d] = _advance_device(spec, s, reports.get(d), now)
    state = replace(state, devices=devices)
    if state.status is RolloutStatus.RUNNING:
        state = _run(spec, state, evidence, now, actions)
    if state.status in (RolloutStatus.ABORTING, RolloutStatus.NEEDS_ATTENTION):
        state = _revert(spec, state, evidence, now, actions)
    return state, actions


def _decision(actions: list[Action], state: RolloutState, what: str, **detail: Any) -> None:
    actions.append(Note("decision", {"decision": what, "wave": state.wave, **detail}))


def _command(spec: RolloutSpec, state: RolloutState, command: Command | None, now: float,
             actor: str, actions: list[Action]) -> RolloutState:  # fmt: skip
    if command is None:
        return state
    st = state.status
    if command == "pause" and st is RolloutStatus.RUNNING:
        state = replace(state, status=RolloutStatus.PAUSED, reason=f"paused by {actor}")
    elif command == "resume" and st is RolloutStatus.PAUSED:
        deadline = now + spec.decision_deadline_s if state.phase is Phase.EVALUATING else None
        state = replace(state, status=RolloutStatus.RUNNING, reason=f"resumed by {actor}",
                        deadline=deadline)  # fmt: skip
    elif command == "abort" and st in (RolloutStatus.RUNNING, RolloutStatus.PAUSED):
        state = replace(state, status=RolloutStatus.ABORTING, reason=f"aborted by {actor}")
    elif command == "promote" and st in (RolloutStatus.RUNNING, RolloutStatus.PAUSED):
        state = _next_wave(spec, replace(state, status=RolloutStatus.RUNNING), now,
                           f"promoted by {actor}, gates skipped")  # fmt: skip
    else:
        why = f"ignored: the rollout is {st.value}"
        actions.append(Note("decision", {"command": command, "actor": actor, "result": why}))
        return state
    actions.append(Note("decision", {"command": command, "actor": actor, "result": state.reason,
                                     "wave": state.wave}))  # fmt: skip
    return state


def _next_wave(spec: RolloutSpec, state: RolloutState, now: float, reason: str) -> RolloutState:
    if state.wave + 1 >= len(spec.waves):
        return replace(state, status=RolloutStatus.COMPLETED, phase=Phase.EVALUATING,
                       deadline=None, reason=reason)  # fmt: skip
    return replace(state, wave=state.wave + 1, phase=Phase.DEPLOYING, deadline=None, reason=reason)


def _run(spec: RolloutSpec, state: RolloutState, ev: Evidence, now: float,
         actions: list[Action]) -> RolloutState:  # fmt: skip
    g = spec.gates
    took = [s for s in state.devices.values() if s.wave >= 0]
    finished = [s for s in took if s.status in FINISHED]
    failed = sum(1 for s in finished if s.status in FAILURES)
    first = G.update_failures(len(finished), failed, state.wave == 0, g)
    if first.verdict is G.Verdict.FAIL:
        actions.append(
            Note("gates", {"wave": state.wave, "verdict": "fail", "gates": [first.to_dict()]})
        )
        _decision(actions, state, "abort", reason=first.reason)
        return replace(state, status=RolloutStatus.ABORTING, reason=first.reason,
                       last_gates=(first.to_dict(),))  # fmt: skip
    if state.phase is Phase.DEPLOYING:
        devices = dict(state.devices)
        for d in _wave_members(spec, state, state.wave):
            if devices[d].status is DeviceStatus.PENDING:
                devices[d] = DeviceState(
                    DeviceStatus.NOTIFIED, now, state.wave, f"wave {state.wave}"
                )
                actions.append(Assign(d, spec.version))
        state = replace(state, devices=devices)
        members = _wave_members(spec, state, state.wave)
        if all(devices[d].status in FINISHED for d in members):
            state = replace(state, phase=Phase.EVALUATING, deadline=now + spec.decision_deadline_s)
        else:
            return state
    results = [
        G.update_failures(len(finished), failed, state.wave == 0, g),
        G.error_rate(ev.canary, ev.control, g),
        G.latency(ev.canary, ev.control, g),
        G.metric(ev.canary, ev.control, g),
        G.drift(ev.canary_drift, ev.control_drift, g),
    ]
    verdict = G.combine(results)
    summary = tuple(r.to_dict() for r in results)
    if summary != state.last_gates:  # store an evaluation when its outcome changes
        actions.append(Note("gates", {"wave": state.wave, "verdict": verdict.value,
                                      "gates": list(summary)}))  # fmt: skip
    state = replace(state, last_gates=summary)
    if verdict is G.Verdict.PASS:
        reason = f"wave {state.wave} passed its gates"
        nxt = _next_wave(spec, state, now, reason)
        what = "complete" if nxt.status is RolloutStatus.COMPLETED else "advance"
        _decision(actions, state, what, reason=reason)
        return nxt
    if verdict is G.Verdict.FAIL:
        why = "; ".join(r.reason for r in results if r.verdict is G.Verdict.FAIL)
        _decision(actions, state, "abort", reason=why)
        return replace(state, status=RolloutStatus.ABORTING, reason=why)
    if state.deadline is not None and now >= state.deadline:
        why = "inconclusive at the decision deadline: " + "; ".join(
            r.reason for r in results if r.verdict is G.Verdict.INCONCLUSIVE
        )
        _decision(actions, state, "pause", reason=why)
        return replace(state, status=RolloutStatus.PAUSED, reason=why)
    return state


def _revert(spec: RolloutSpec, state: RolloutState, ev: Evidence, now: float,
            actions: list[Action]) -> RolloutState:  # fmt: skip
    """Return every device told of the candidate to the previous model.

    A device that committed the candidate has its rollback floor at the
    candidate's version and refuses ``previous``: it goes to ``revert_to``,
    the previous payload re-released above the candidate. Without one, such
    devices need attention (named); the others go back to ``previous``.
    """
    target = spec.revert_to if spec.revert_to is not None else spec.previous
    devices = dict(state.devices)
    stuck: list[str] = []
    for d, s in devices.items():
        if s.status in (DeviceStatus.PENDING, DeviceStatus.REVERTED):
            continue
        if target is None or (s.committed and spec.revert_to is None):
            stuck.append(d)
            continue
        r = ev.reports.get(d)
        if s.status is not DeviceStatus.REVERTING:
            actions.append(Revert(d, target))
            s = replace(s, status=DeviceStatus.REVERTING, since=now, reason=f"was {s.status.value}")
        # back only on a report made after the revert was issued
        if r is not None and r.running == target and (r.seen_at or -1.0) >= s.since:
            s = replace(s, status=DeviceStatus.REVERTED, since=now, reason=f"runs version {target}")
        devices[d] = s
    state = replace(state, devices=devices)
    if stuck:
        why = (
            f"{len(stuck)} device(s) committed version {spec.version} and refuse a lower one: "
            "the rollout has no revert_to (the previous payload re-released above it): "
            + ", ".join(stuck[:5])
            if target is not None
            else "aborted, but there is no previous version to return devices to"
        )
        if state.status is not RolloutStatus.NEEDS_ATTENTION or state.reason != why:
            _decision(actions, state, "needs-attention", reason=why)
        return replace(state, status=RolloutStatus.NEEDS_ATTENTION, reason=why)
    reverting = [d for d, s in devices.items() if s.status is DeviceStatus.REVERTING]
    if not reverting:
        _decision(actions, state, "reverted", reason="every device that took the candidate runs "
                  f"version {target}")  # fmt: skip
        return replace(state, status=RolloutStatus.REVERTED)
    late = [d for d in reverting if now - devices[d].since > spec.device_timeout_s]
    if late and state.status is not RolloutStatus.NEEDS_ATTENTION:
        names = ", ".join(late[:5])
        why = f"{len(late)} device(s) not on version {target} in time: {names}"
        _decision(actions, state, "needs-attention", reason=why)
        return replace(state, status=RolloutStatus.NEEDS_ATTENTION, reason=why)
    return state
