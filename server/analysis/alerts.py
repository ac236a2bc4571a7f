"""The alert state machine: judged windows in, an alert level and its transitions out (pure).

One alert exists per (model digest, scope, subject), e.g. (the fraud model's
manifest digest, ``device:pi-1``, ``feature:amount``). Each evaluation hands
it the verdict of the newest judged window; ``advance`` answers with the new
state and what changed, for the audit log and notifications.

Rules (issue 11; docs/drift.md):

* ``insufficient`` windows are not judged: nothing changes.
* Entering: a level (``warn`` or ``alarm``) is entered when at least 2 of the
  last 3 judged windows reached it; ``alarm`` wins over ``warn``.
* Clearing: an active level drops after 3 consecutive judged windows whose
  PSI is below 0.8 x that level's threshold (hysteresis, so an alert does not
  flap around its threshold), to whatever the other rule then gives.
* A new model digest resets the alert: the baseline belongs to one model.

Invariant: ``advance`` is deterministic and total; the state is small, JSON
round-trippable (``to_dict``/``from_dict``) and persisted as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.analysis.verdict import Status

__all__ = ["AlertState", "Transition", "Window", "advance"]

ENTER_OF = 3  # judged windows looked at
ENTER_NEEDS = 2  # of which this many must reach a level to enter it
CLEAR_AFTER = 3  # consecutive quiet windows that clear a level
CLEAR_FRACTION = 0.8  # "quiet": PSI below this fraction of the level's threshold


@dataclass(frozen=True)
class Window:
    """One judged window: its verdict, PSI, the thresholds that applied, and when."""

    status: Status
    psi: float | None
    warn_at: float
    alarm_at: float
    model_digest: str
    at: float  # Unix seconds


@dataclass(frozen=True)
class Transition:
    """A change of alert level, for the audit log."""

    before: Status
    after: Status
    at: float
    reason: str


@dataclass(frozen=True)
class AlertState:
    """The persisted state of one alert."""

    model_digest: str
    level: Status = Status.INSUFFICIENT
    recent: tuple[Status, ...] = ()  # the last ENTER_OF judged statuses, oldest first
    quiet_warn: int = 0  # consecutive judged windows below 0.8 x warn_at
    quiet_alarm: int = 0  # consecutive judged windows below 0.8 x alarm_at
    since: float | None = None  # when the current level was entered
    last_psi: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_digest": self.model_digest,
            "level": self.level.value,
            "recent": [s.value for s in self.recent],
            "quiet_warn": self.quiet_warn,
            "quiet_alarm": self.quiet_alarm,
            "since": self.since,
            "last_psi": self.last_psi,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AlertState:
        return cls(
            model_digest=str(d["model_digest"]),
            level=Status(d["level"]),
            recent=tuple(Status(s) for s in d.get("recent", ()))[-ENTER_OF:],
            quiet_warn=int(d.get("quiet_warn", 0)),
            quiet_alarm=int(d.get("quiet_alarm", 0)),
            since=d.get("since"),
            last_psi=d.get("last_psi"),
        )


def _reached(statuses: tuple[Status, ...], level: Status) -> int:
    return sum(s.severity >= level.severity for s in statuses)


def advance(state: AlertState | None, window: Window) -> tuple[AlertState, list[Transition]]:
    """Feed one window's verdict; return the new state and the level changes (0 or 1)."""
    if state is None or state.model_digest != window.model_digest:
        state = AlertState(window.model_digest)
    if window.status is Status.INSUFFICIENT:
        return state, []
    recent = (*state.recent, window.status)[-ENTER_OF:]
    psi = window.psi if window.psi is not None else 0.0
    quiet_warn = state.quiet_warn + 1 if psi < CLEAR_FRACTION * window.warn_at else 0
    quiet_alarm = state.quiet_alarm + 1 if psi < CLEAR_FRACTION * window.alarm_at else 0
    entered = Status.OK
    for level in (Status.ALARM, Status.WARN):
        if _reached(recent, level) >= ENTER_NEEDS:
            entered = level
            break
    level = state.level if state.level in (Status.WARN, Status.ALARM) else Status.OK
    if level is Status.ALARM and quiet_alarm >= CLEAR_AFTER:
        level = Status.WARN if quiet_warn < CLEAR_AFTER else Status.OK
    elif level is Status.WARN and quiet_warn >= CLEAR_AFTER:
        level = Status.OK
    if entered.severity > level.severity:
        level = entered
    transitions = []
    since = state.since
    if level is not state.level:
        since = window.at
        if state.level is not Status.INSUFFICIENT or level is not Status.OK:
            if level.severity > state.level.severity:
                reason = (
                    f"{_reached(recent, level)} of the last {len(recent)} windows at {level.value}"
                )
            else:
                reason = f"PSI below {CLEAR_FRACTION} x the threshold for {CLEAR_AFTER} windows"
            transitions.append(Transition(state.level, level, window.at, reason))
    new = AlertState(window.model_digest, level, recent, quiet_warn, quiet_alarm, since, window.psi)
    return new, transitions
