"""The update state machine: a pure function from (persisted state, event) to
(next persisted state, action).

Flow: the agent (``agent.core``) feeds an event to ``advance``; stores the
returned state if it differs (one atomic write of ``state.json``); performs the
returned action (verify into a slot, health-check, report, ...), which yields
the next event; and repeats until the action is ``Stop``. This module does no
I/O and never reads the clock: the caller passes ``now``. Events that do not fit
the current state are refused with ``InvalidTransitionError`` (like python-tuf's
trusted metadata set refusing calls out of order).

Happy path of an install::

    idle -(BeginInstall)-> verifying -(Verified)-> staging -(Staged)-> switching
    -(SlotChecked ok)-> trial -(HealthChecked ok)-> committed -(Reported)-> idle

Bad outcomes: rejection or storage failure before the switch -> ``aborted``
(the active slot was never touched); a failed health check -> ``rolling-back``
-> ``rolled-back``. Both report, then return to ``idle``.

Recovery table (``Boot`` in the last persisted state -> what happens next):

============== ===============================================================
persisted      on start-up
============== ===============================================================
idle           load the active slot (hash-checked); if it is broken, recover to
               the previous slot (or to none)
downloading    abort ("interrupted"), report
verifying      abort ("interrupted"), clean the inactive slot if it was touched, report
staging        abort ("interrupted"), clean the inactive slot, report
switching      re-check the staged slot against its manifest; intact -> flip the
               pointer and start the trial; damaged -> abort, clean
trial          count the restart; under the limit -> run the health check again;
               at the limit (default 3) -> roll back
committed      report the commit again (at least once), then idle
rolling-back   re-check the previous slot and point back at it (idempotent)
rolled-back    report again, then idle
aborted        clean the inactive slot if an install wrote it, report, then idle
============== ===============================================================

Invariants: the active pointer changes only in ``switching -> trial`` (to the
staged slot), ``rolling-back -> rolled-back`` (back to the previous slot) and
the loop breaker; the rollback floor moves only in ``trial -> committed``;
``previous`` is cleared (``PayloadStarting``) after the bundle passed its
signature, expiry, target and rollback checks and before the first byte of the
inactive slot changes: a bundle rejected on its metadata keeps the rollback
target, and a slot that was touched is never a rollback target again. Each store made for
one update increments ``update.stores`` (every start-up during an update
stores once); past ``max_stores`` the machine gives up on the update and
returns to idle (Mender's loop breaker).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from agent.errors import (
    InterruptedUpdateError,
    InvalidTransitionError,
    NothingToRollBackError,
    StoreLoopError,
    TrialExhaustedError,
)
from agent.state import (
    HISTORY_LIMIT,
    AgentState,
    ErrorInfo,
    SlotRef,
    UpdateInfo,
    UpdateOutcome,
    UpdateState,
    other_slot,
)

__all__ = [
    "CONTINUE",
    "STOP",
    "ActiveLoaded",
    "BeginDownload",
    "BeginInstall",
    "BeginRollback",
    "Boot",
    "CheckSlot",
    "CheckTarget",
    "Clean",
    "Cleaned",
    "Continue",
    "DownloadFailed",
    "Failed",
    "HealthCheck",
    "HealthChecked",
    "LoadActive",
    "MachineLimits",
    "PayloadStarting",
    "Report",
    "Reported",
    "SlotChecked",
    "Stage",
    "Staged",
    "Stop",
    "TargetChecked",
    "Transition",
    "Verified",
    "VerifyInto",
    "advance",
    "inactive_slot",
    "serving_ref",
]


@dataclass(frozen=True)
class MachineLimits:
    """Bounds of the update machine."""

    max_trial_restarts: int = 3  # agent starts while on trial before reverting, 1..100
    max_stores: int = 32  # state stores for one update before giving up, 8..1000

    def __post_init__(self) -> None:
        if not 1 <= self.max_trial_restarts <= 100:
            raise ValueError("max_trial_restarts must be in [1, 100]")
        if not 8 <= self.max_stores <= 1000:
            raise ValueError("max_stores must be in [8, 1000]")


# ---------------------------------------------------------------------- events


class Event:
    """Something that happened; input to ``advance``."""


@dataclass(frozen=True)
class Boot(Event):
    """The agent started and read the persisted state."""


@dataclass(frozen=True)
class BeginDownload(Event):
    """The daemon starts fetching a bundle over the network."""

    update_id: str
    source: str


@dataclass(frozen=True)
class BeginInstall(Event):
    """A bundle is available to verify (sideloaded, or its download finished)."""

    update_id: str
    source: str


@dataclass(frozen=True)
class DownloadFailed(Event):
    """The download was given up (transport error, cancelled)."""

    error: ErrorInfo


@dataclass(frozen=True)
class Verified(Event):
    """``verify_bundle`` accepted the bundle; its payload is in the inactive slot."""

    staged: SlotRef


@dataclass(frozen=True)
class PayloadStarting(Event):
    """The bundle passed every check before its payload; the slot is about to be written."""


@dataclass(frozen=True)
class Failed(Event):
    """Verification rejected the bundle, or writing the slot failed."""

    error: ErrorInfo


@dataclass(frozen=True)
class Staged(Event):
    """The slot's files are in place and durable."""


@dataclass(frozen=True)
class SlotChecked(Event):
    """The staged slot was re-read and compared with its manifest (error or None)."""

    error: ErrorInfo | None = None


@dataclass(frozen=True)
class HealthChecked(Event):
    """The trial health check finished (error or None)."""

    error: ErrorInfo | None = None


@dataclass(frozen=True)
class BeginRollback(Event):
    """An operator asks to return to the previous committed model."""

    update_id: str


@dataclass(frozen=True)
class TargetChecked(Event):
    """The rollback target was checked (error or None)."""

    error: ErrorInfo | None = None


@dataclass(frozen=True)
class Cleaned(Event):
    """The inactive slot was emptied."""


@dataclass(frozen=True)
class Reported(Event):
    """The outcome was handed to the event sink."""


@dataclass(frozen=True)
class ActiveLoaded(Event):
    """The active slot was loaded for serving (error or None)."""

    error: ErrorInfo | None = None


# --------------------------------------------------------------------- actions


class Action:
    """What the agent must do next; its result is the next event."""


@dataclass(frozen=True)
class Stop(Action):
    """Nothing to do until the next outside event."""


STOP = Stop()


@dataclass(frozen=True)
class Continue(Action):
    """Carry on with the action in progress (after a store made in the middle of it)."""


CONTINUE = Continue()


@dataclass(frozen=True)
class VerifyInto(Action):
    """Empty ``slot``, verify the bundle and stream its payload into ``slot``."""

    slot: str


@dataclass(frozen=True)
class Stage(Action):
    """Move the verified files of ``staged`` into place and sync them."""

    staged: SlotRef


@dataclass(frozen=True)
class CheckSlot(Action):
    """Re-read the staged slot and check it against its manifest."""

    ref: SlotRef


@dataclass(frozen=True)
class HealthCheck(Action):
    """Load ``ref`` with onnxruntime and run the manifest's health check."""

    ref: SlotRef


@dataclass(frozen=True)
class CheckTarget(Action):
    """Check the rollback target (None: there is none, which always succeeds)."""

    ref: SlotRef | None


@dataclass(frozen=True)
class Clean(Action):
    """Empty ``slot`` (the half-written inactive slot of an aborted install)."""

    slot: str


@dataclass(frozen=True)
class Report(Action):
    """Hand ``event`` to the event sink."""

    event: UpdateOutcome


@dataclass(frozen=True)
class LoadActive(Action):
    """Load ``ref`` for serving (None: no model)."""

    ref: SlotRef | None


@dataclass(frozen=True)
class Transition:
    """The result of ``advance``: ``state`` is the input object when unchanged."""

    state: AgentState
    action: Action


# ---------------------------------------------------------------------- helpers


def inactive_slot(state: AgentState) -> str:
    """The slot an install writes: the one the active pointer does not name."""
    return "a" if state.active is None else other_slot(state.active.slot)


def _interrupted(where: UpdateState) -> ErrorInfo:
    return ErrorInfo.from_exception(
        InterruptedUpdateError(
            f"the agent restarted while {where.value}; the update was abandoned "
            "and the active model kept"
        )
    )


def _finish(s: AgentState, state: UpdateState, outcome: str, error: ErrorInfo | None, now: str,
            **changes: object) -> AgentState:  # fmt: skip
    """Enter a reporting state, appending the outcome to the history.

    The event names the update's subject: the staged model for an install,
    the model being left for a rollback.
    """
    upd = s.update
    assert upd is not None
    moved = replace(s, state=state, **changes)  # type: ignore[arg-type]
    subject = upd.staged if upd.kind == "install" else s.active
    event = UpdateOutcome(
        upd.id,
        upd.kind,
        outcome,
        subject.model if subject else None,
        subject.version if subject else None,
        moved.active,
        error,
        now,
    )
    return replace(moved, history=(*s.history, event)[-HISTORY_LIMIT:])


def _abort(s: AgentState, error: ErrorInfo, now: str) -> Transition:
    new = _finish(s, UpdateState.ABORTED, "aborted", error, now, last_error=error)
    upd = s.update
    assert upd is not None
    new = replace(new, update=replace(upd, error=error))
    if _slot_touched(s) and s.state in (
        UpdateState.VERIFYING,
        UpdateState.STAGING,
        UpdateState.SWITCHING,
    ):
        assert upd.slot is not None
        return Transition(new, Clean(upd.slot))
    return Transition(new, Report(new.history[-1]))


def _slot_touched(s: AgentState) -> bool:
    """Whether an install may have written its slot (it no longer holds ``previous``)."""
    upd = s.update
    if upd is None or upd.kind != "install" or upd.slot is None:
        return False
    return s.previous is None or s.previous.slot != upd.slot


def _rollback(s: AgentState, error: ErrorInfo | None) -> Transition:
    upd = s.update
    assert upd is not None
    new = replace(s, state=UpdateState.ROLLING_BACK, update=replace(upd, error=error))
    return Transition(new, CheckTarget(s.previous))


def _to_idle(s: AgentState) -> Transition:
    new = replace(s, state=UpdateState.IDLE, update=None, trial_restarts=0)
    return Transition(new, LoadActive(new.active))


# --------------------------------------------------------------- per state


def _idle(s: AgentState, ev: Event, now: str, lim: MachineLimits) -> Transition | None:
    if isinstance(ev, Boot):
        return Transition(s, LoadActive(s.active))
    if isinstance(ev, ActiveLoaded):
        if ev.error is None:
            return Transition(s, STOP)
        upd = UpdateInfo(f"recover-{s.seq + 1}", "recover", "start-up", now)
        return _rollback(replace(s, state=UpdateState.ROLLING_BACK, update=upd), ev.error)
    if isinstance(ev, BeginDownload):
        upd = UpdateInfo(ev.update_id, "install", ev.source, now, slot=inactive_slot(s))
        return Transition(replace(s, state=UpdateState.DOWNLOADING, update=upd), STOP)
    if isinstance(ev, BeginInstall):
        slot = inactive_slot(s)
        upd = UpdateInfo(ev.update_id, "install", ev.source, now, slot=slot)
        return Transition(replace(s, state=UpdateState.VERIFYING, update=upd), VerifyInto(slot))
    if isinstance(ev, BeginRollback):
        if s.previous is None:
            raise NothingToRollBackError(
                "no previous committed model to roll back to"
                + ("" if s.active is None else f" (active: {s.active.describe()})")
            )
        upd = UpdateInfo(ev.update_id, "rollback", "operator", now)
        return _rollback(replace(s, state=UpdateState.ROLLING_BACK, update=upd), None)
    return None


def _downloading(s: AgentState, ev: Event, now: str, lim: MachineLimits) -> Transition | None:
    upd = s.update
    assert upd is not None and upd.slot is not None
    if isinstance(ev, Boot):
        return _abort(s, _interrupted(s.state), now)
    if isinstance(ev, BeginInstall) and ev.update_id == upd.id:
        return Transition(replace(s, state=UpdateState.VERIFYING), VerifyInto(upd.slot))
    if isinstance(ev, DownloadFailed):
        return _abort(s, ev.error, now)
    return None


def _verifying(s: AgentState, ev: Event, now: str, lim: MachineLimits) -> Transition | None:
    upd = s.update
    assert upd is not None
    if isinstance(ev, Boot):
        return _abort(s, _interrupted(s.state), now)
    if isinstance(ev, PayloadStarting):
        if s.previous is not None and s.previous.slot == upd.slot:
            # The slot stops being a rollback target before its first byte changes.
            return Transition(replace(s, previous=None), CONTINUE)
        return Transition(s, CONTINUE)
    if isinstance(ev, Verified):
        new = replace(s, state=UpdateState.STAGING, update=replace(upd, staged=ev.staged))
        return Transition(new, Stage(ev.staged))
    if isinstance(ev, Failed):
        return _abort(s, ev.error, now)
    return None


def _staging(s: AgentState, ev: Event, now: str, lim: MachineLimits) -> Transition | None:
    upd = s.update
    assert upd is not None
    if isinstance(ev, Boot):
        return _abort(s, _interrupted(s.state), now)
    if isinstance(ev, Staged):
        assert upd.staged is not None
        return Transition(replace(s, state=UpdateState.SWITCHING), CheckSlot(upd.staged))
    if isinstance(ev, Failed):
        return _abort(s, ev.error, now)
    return None


def _switching(s: AgentState, ev: Event, now: str, lim: MachineLimits) -> Transition | None:
    upd = s.update
    assert upd is not None and upd.staged is not None
    if isinstance(ev, Boot):
        return Transition(s, CheckSlot(upd.staged))
    if isinstance(ev, SlotChecked):
        if ev.error is not None:
            return _abort(s, ev.error, now)
        # The pointer switch: one store moves active to the staged slot.
        new = replace(
            s, state=UpdateState.TRIAL, active=upd.staged, previous=s.active, trial_restarts=0
        )
        return Transition(new, HealthCheck(upd.staged))
    return None


def _trial(s: AgentState, ev: Event, now: str, lim: MachineLimits) -> Transition | None:
    assert s.active is not None
    if isinstance(ev, Boot):
        restarts = s.trial_restarts + 1
        if restarts >= lim.max_trial_restarts:
            err = ErrorInfo.from_exception(
                TrialExhaustedError(
                    f"{s.active.describe()} did not pass its health check within "
                    f"{lim.max_trial_restarts} agent starts"
                )
            )
            return _rollback(replace(s, trial_restarts=restarts), err)
        return Transition(replace(s, trial_restarts=restarts), HealthCheck(s.active))
    if isinstance(ev, HealthChecked):
        if ev.error is not None:
            return _rollback(s, ev.error)
        floor = dict(s.rollback_floor)
        floor[s.active.model] = max(floor.get(s.active.model, 0), s.active.version)
        new = _finish(
            s,
            UpdateState.COMMITTED,
            "committed",
            None,
            now,
            rollback_floor=floor,
            last_error=None,
            trial_restarts=0,
        )
        return Transition(new, Report(new.history[-1]))
    return None


def _reporting(s: AgentState, ev: Event, now: str, lim: MachineLimits) -> Transition | None:
    if isinstance(ev, Boot):
        upd = s.update
        assert upd is not None
        if s.state is UpdateState.ABORTED and _slot_touched(s):
            # The slot may still hold half-written files; cleaning is idempotent.
            assert upd.slot is not None
            return Transition(s, Clean(upd.slot))
        return Transition(s, Report(s.history[-1]))
    if isinstance(ev, Cleaned) and s.state is UpdateState.ABORTED:
        return Transition(s, Report(s.history[-1]))
    if isinstance(ev, Reported):
        return _to_idle(s)
    return None


def _rolling_back(s: AgentState, ev: Event, now: str, lim: MachineLimits) -> Transition | None:
    upd = s.update
    assert upd is not None
    if isinstance(ev, Boot):
        return Transition(s, CheckTarget(s.previous))
    if isinstance(ev, TargetChecked):
        manual = upd.kind == "rollback"
        if ev.error is not None and manual:
            return _abort(s, ev.error, now)
        if ev.error is not None:
            # The failed model cannot stay and the previous one is unusable too.
            err = upd.error or ev.error
            message = f"{err.message}; the previous model is unusable too: {ev.error.message}"
            err = ErrorInfo(err.error, err.code, message[:2000])
            new = _finish(s, UpdateState.ROLLED_BACK, "rolled-back", err, now,
                          active=None, previous=None, last_error=err, trial_restarts=0)  # fmt: skip
            return Transition(new, Report(new.history[-1]))
        new = _finish(
            s,
            UpdateState.ROLLED_BACK,
            "rolled-back",
            upd.error,
            now,
            active=s.previous,
            previous=s.active if manual else None,
            last_error=s.last_error if manual else upd.error,
            trial_restarts=0,
        )
        return Transition(new, Report(new.history[-1]))
    return None


_Handler = Callable[[AgentState, Event, str, MachineLimits], "Transition | None"]
_HANDLERS: dict[UpdateState, _Handler] = {
    UpdateState.IDLE: _idle,
    UpdateState.DOWNLOADING: _downloading,
    UpdateState.VERIFYING: _verifying,
    UpdateState.STAGING: _staging,
    UpdateState.SWITCHING: _switching,
    UpdateState.TRIAL: _trial,
    UpdateState.COMMITTED: _reporting,
    UpdateState.ROLLING_BACK: _rolling_back,
    UpdateState.ROLLED_BACK: _reporting,
    UpdateState.ABORTED: _reporting,
}


def _break_loop(s: AgentState, now: str) -> Transition:
    """Give up on the update in ``s`` and return to idle without another report."""
    upd = s.update
    assert upd is not None
    err = ErrorInfo.from_exception(
        StoreLoopError(
            f"update {upd.id} stored its state {upd.stores} times (state {s.state.value}); "
            "giving up on it"
        )
    )
    active, previous = s.active, s.previous
    if s.state in (UpdateState.TRIAL, UpdateState.ROLLING_BACK) and upd.kind != "rollback":
        # The pointer may name an unproven or broken model: point back.
        active, previous = s.previous, None
    outcome = "rolled-back" if active != s.active else "aborted"
    ended = _finish(s, s.state, outcome, err, now, active=active, previous=previous)
    new = replace(ended, state=UpdateState.IDLE, update=None, trial_restarts=0, last_error=err)
    return Transition(new, LoadActive(active))


def advance(
    state: AgentState, event: Event, *, now: str, limits: MachineLimits | None = None
) -> Transition:
    """Decide the next persisted state and action.

    Args:
        state: the last persisted state.
        event: what happened.
        now: the current UTC time, formatted (used in history and update records).
        limits: trial restart and store limits.

    Returns:
        The next state (the same object when nothing changes, so the caller
        stores only real changes; a ``Boot`` during an update always counts as
        a change) and the action to perform.

    Raises:
        InvalidTransitionError: ``event`` does not fit ``state`` (for example a
            second install while one is in progress).
        NothingToRollBackError: a rollback was asked without a previous model.
    """
    lim = limits or MachineLimits()
    tr = _HANDLERS[state.state](state, event, now, lim)
    if tr is None:
        what = f" (update {state.update.id})" if state.update else ""
        raise InvalidTransitionError(
            f"cannot handle {type(event).__name__} while {state.state.value}{what}"
        )
    if tr.state is state and not (isinstance(event, Boot) and state.update is not None):
        return tr
    # A start-up in the middle of an update always stores once: that is what
    # the store counter counts, so a crash loop in any state ends.
    new = replace(tr.state, seq=state.seq + 1)
    upd = new.update
    if upd is not None:
        same = state.update is not None and state.update.id == upd.id
        stores = (state.update.stores if same and state.update else 0) + 1
        new = replace(new, update=replace(upd, stores=stores))
        if stores > lim.max_stores:
            broken = _break_loop(new, now)
            return Transition(replace(broken.state, seq=state.seq + 1), broken.action)
    new.check_consistent()
    return Transition(new, tr.action)


def serving_ref(state: AgentState) -> SlotRef | None:
    """The slot a reader should serve from, given only the persisted state.

    During a trial the pointer names a model that has not passed its health
    check yet, and while rolling back it may name a broken one: a read-only
    reader (``agent predict`` beside a daemon) serves the previous model then.
    """
    if state.state in (UpdateState.TRIAL, UpdateState.ROLLING_BACK):
        return state.previous
    return state.active
