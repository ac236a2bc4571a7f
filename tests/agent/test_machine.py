"""The update machine as a pure function: transitions, recovery table, loop breaker."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.errors import InvalidTransitionError, NothingToRollBackError
from agent.machine import (
    ActiveLoaded,
    BeginDownload,
    BeginInstall,
    BeginRollback,
    Boot,
    CheckSlot,
    CheckTarget,
    Clean,
    Cleaned,
    Continue,
    DownloadFailed,
    Failed,
    HealthCheck,
    HealthChecked,
    LoadActive,
    MachineLimits,
    PayloadStarting,
    Report,
    Reported,
    SlotChecked,
    Stage,
    Staged,
    Stop,
    TargetChecked,
    Verified,
    VerifyInto,
    advance,
    serving_ref,
)
from agent.state import AgentState, ErrorInfo, SlotRef, UpdateState

NOW = "2026-06-01T12:00:00Z"
V1 = SlotRef("a", "tiny", 1, "1" * 64)
V2 = SlotRef("b", "tiny", 2, "2" * 64)
ERR = ErrorInfo("NonFiniteOutputError", 44, "output 'probs' has 6 NaN/infinite value(s) of 6")


def step(state, event, **kw):
    return advance(state, event, now=NOW, **kw)


def committed_v1() -> AgentState:
    return AgentState(active=V1, rollback_floor={"tiny": 1})


def run_install(state: AgentState, *, health: ErrorInfo | None = None) -> list:
    """Drive a whole install with scripted action results; return [(state, action)]."""
    trail = []
    tr = step(state, BeginInstall("u1", "file"))
    while True:
        trail.append((tr.state.state, type(tr.action).__name__))
        a = tr.action
        if isinstance(a, Stop):
            return trail
        event = {
            VerifyInto: lambda: Verified(V2),
            Stage: Staged,
            CheckSlot: SlotChecked,
            HealthCheck: lambda: HealthChecked(health),
            CheckTarget: TargetChecked,
            Report: Reported,
            LoadActive: ActiveLoaded,
            Clean: Cleaned,
        }[type(a)]()
        tr = step(tr.state, event)
        state = tr.state


def test_install_happy_path_order():
    trail = run_install(committed_v1())
    assert [s.value for s, _ in trail] == [
        "verifying", "staging", "switching", "trial", "committed", "idle", "idle",
    ]  # fmt: skip
    assert [a for _, a in trail] == [
        "VerifyInto", "Stage", "CheckSlot", "HealthCheck", "Report", "LoadActive", "Stop",
    ]  # fmt: skip


def test_install_pointer_moves_only_at_switch_and_floor_only_at_commit():
    s = committed_v1()
    s = step(s, BeginInstall("u1", "f")).state
    s = step(s, Verified(V2)).state
    s = step(s, Staged()).state
    assert (s.state, s.active, s.rollback_floor) == (UpdateState.SWITCHING, V1, {"tiny": 1})
    s = step(s, SlotChecked()).state
    assert (s.state, s.active, s.previous, s.trial_restarts) == (UpdateState.TRIAL, V2, V1, 0)
    assert s.rollback_floor == {"tiny": 1}
    s = step(s, HealthChecked()).state
    assert (s.state, s.rollback_floor, s.last_error) == (UpdateState.COMMITTED, {"tiny": 2}, None)
    assert s.history[-1].outcome == "committed"
    assert (s.history[-1].model, s.history[-1].version) == ("tiny", 2)


def test_health_failure_rolls_back_and_keeps_floor():
    s = committed_v1()
    for event in (BeginInstall("u1", "f"), Verified(V2), Staged(), SlotChecked()):
        s = step(s, event).state
    tr = step(s, HealthChecked(ERR))
    assert tr.state.state is UpdateState.ROLLING_BACK
    assert tr.action == CheckTarget(V1)
    tr = step(tr.state, TargetChecked())
    s = tr.state
    assert (s.state, s.active, s.previous) == (UpdateState.ROLLED_BACK, V1, None)
    assert s.rollback_floor == {"tiny": 1}
    assert s.last_error == ERR
    assert s.history[-1].outcome == "rolled-back" and s.history[-1].error == ERR
    assert isinstance(tr.action, Report)
    tr = step(s, Reported())
    assert tr.state.state is UpdateState.IDLE and tr.action == LoadActive(V1)


def test_rollback_target_unusable_leaves_no_model():
    s = committed_v1()
    for event in (BeginInstall("u1", "f"), Verified(V2), Staged(), SlotChecked()):
        s = step(s, event).state
    s = step(s, HealthChecked(ERR)).state
    bad = ErrorInfo("SlotIntegrityError", 48, "model.onnx sha256 differs")
    s = step(s, TargetChecked(bad)).state
    assert (s.state, s.active, s.previous) == (UpdateState.ROLLED_BACK, None, None)
    assert s.last_error is not None and "previous model is unusable" in s.last_error.message


def test_rejection_keeps_previous_until_payload_starts():
    s = replace(committed_v1(), previous=SlotRef("b", "tiny", 0 + 1, "3" * 64))
    s = replace(s, active=SlotRef("a", "tiny", 2, "4" * 64), rollback_floor={"tiny": 2})
    s = step(s, BeginInstall("u1", "f")).state
    assert s.previous is not None, "metadata checks come before the slot is touched"
    tr = step(s, Failed(ERR))
    assert tr.state.state is UpdateState.ABORTED
    assert tr.state.previous is not None
    assert isinstance(tr.action, Report), "an untouched slot is not cleaned"
    s2 = step(s, PayloadStarting())
    assert isinstance(s2.action, Continue) and s2.state.previous is None
    tr = step(s2.state, Failed(ERR))
    assert tr.action == Clean("b")


RECOVERY = {
    # persisted state -> (state after Boot, action type)
    UpdateState.IDLE: (UpdateState.IDLE, LoadActive),
    UpdateState.DOWNLOADING: (UpdateState.ABORTED, Report),
    UpdateState.VERIFYING: (UpdateState.ABORTED, Clean),
    UpdateState.STAGING: (UpdateState.ABORTED, Clean),
    UpdateState.SWITCHING: (UpdateState.SWITCHING, CheckSlot),
    UpdateState.TRIAL: (UpdateState.TRIAL, HealthCheck),
    UpdateState.COMMITTED: (UpdateState.COMMITTED, Report),
    UpdateState.ROLLING_BACK: (UpdateState.ROLLING_BACK, CheckTarget),
    UpdateState.ROLLED_BACK: (UpdateState.ROLLED_BACK, Report),
    UpdateState.ABORTED: (UpdateState.ABORTED, Clean),
}


def state_in(target: UpdateState) -> AgentState:
    """A realistic persisted state for each value of the enum."""
    s = committed_v1()
    if target is UpdateState.IDLE:
        return s
    if target is UpdateState.DOWNLOADING:
        return step(s, BeginDownload("u1", "mqtt")).state
    path = [
        BeginInstall("u1", "f"), PayloadStarting(), Verified(V2), Staged(), SlotChecked(),
    ]  # fmt: skip
    order = [UpdateState.VERIFYING, UpdateState.VERIFYING, UpdateState.STAGING,
             UpdateState.SWITCHING, UpdateState.TRIAL]  # fmt: skip
    for event, reached in zip(path, order, strict=True):
        s = step(s, event).state
        if reached is target and not isinstance(event, BeginInstall):
            return s
    if target is UpdateState.COMMITTED:
        return step(s, HealthChecked()).state
    s = step(s, HealthChecked(ERR)).state
    if target is UpdateState.ROLLING_BACK:
        return s
    if target is UpdateState.ROLLED_BACK:
        return step(s, TargetChecked()).state
    assert target is UpdateState.ABORTED
    return step(state_in(UpdateState.STAGING), Failed(ERR)).state


@pytest.mark.parametrize("persisted", list(UpdateState), ids=lambda s: s.value)
def test_recovery_table(persisted):
    s = state_in(persisted)
    assert s.state is persisted
    tr = step(s, Boot())
    expected_state, expected_action = RECOVERY[persisted]
    assert tr.state.state is expected_state
    assert isinstance(tr.action, expected_action)


@pytest.mark.parametrize("persisted", list(UpdateState), ids=lambda s: s.value)
def test_recovery_reaches_idle_with_a_known_model(persisted):
    s = state_in(persisted)
    event = Boot()
    results = {
        LoadActive: ActiveLoaded, Clean: Cleaned, Report: Reported, CheckSlot: SlotChecked,
        HealthCheck: HealthChecked, CheckTarget: TargetChecked,
    }  # fmt: skip
    for _ in range(20):
        tr = step(s, event)
        s = tr.state
        if isinstance(tr.action, Stop):
            break
        event = results[type(tr.action)]()
    assert s.state is UpdateState.IDLE
    assert s.active in (V1, V2)
    assert s.rollback_floor["tiny"] == s.active.version


def test_trial_restarts_revert_at_the_limit():
    s = state_in(UpdateState.TRIAL)
    limits = MachineLimits(max_trial_restarts=3)
    for restarts in (1, 2):
        tr = step(s, Boot(), limits=limits)
        assert tr.state.state is UpdateState.TRIAL and tr.state.trial_restarts == restarts
        assert isinstance(tr.action, HealthCheck)
        s = tr.state
    tr = step(s, Boot(), limits=limits)
    assert tr.state.state is UpdateState.ROLLING_BACK
    assert tr.state.update is not None and tr.state.update.error is not None
    assert tr.state.update.error.error == "TrialExhaustedError"


def test_store_counter_breaks_a_report_loop():
    s = state_in(UpdateState.COMMITTED)
    limits = MachineLimits(max_stores=8)
    # A sink that crashes the agent every time: each boot re-reports; the trial
    # restart counter does not apply, the store counter does.
    seen = []
    for _ in range(20):
        tr = step(s, Boot(), limits=limits)
        seen.append(tr.state.state)
        if tr.state.state is UpdateState.IDLE:
            break
        s = tr.state
    assert seen[-1] is UpdateState.IDLE, "the loop breaker ends the crash loop"
    assert len(seen) < 8
    assert tr.state.last_error is not None and tr.state.last_error.error == "StoreLoopError"
    assert tr.state.active == V2, "the commit stands; only the report is given up"


def test_store_counter_in_trial_points_back():
    s = state_in(UpdateState.TRIAL)
    s = replace(s, update=replace(s.update, stores=32))
    tr = step(s, Boot(), limits=MachineLimits(max_trial_restarts=50, max_stores=32))
    assert tr.state.state is UpdateState.IDLE
    assert tr.state.active == V1 and tr.state.update is None
    assert tr.state.last_error is not None and tr.state.last_error.error == "StoreLoopError"
    assert tr.action == LoadActive(V1)


def test_manual_rollback_swaps_slots_and_keeps_floor():
    s = replace(state_in(UpdateState.IDLE), active=V2, previous=V1, rollback_floor={"tiny": 2})
    tr = step(s, BeginRollback("r1"))
    assert tr.action == CheckTarget(V1)
    s = step(tr.state, TargetChecked()).state
    assert (s.active, s.previous, s.rollback_floor) == (V1, V2, {"tiny": 2})
    assert s.history[-1].kind == "rollback" and s.history[-1].version == 2


def test_manual_rollback_to_broken_target_aborts():
    s = replace(state_in(UpdateState.IDLE), active=V2, previous=V1, rollback_floor={"tiny": 2})
    s = step(s, BeginRollback("r1")).state
    tr = step(s, TargetChecked(ErrorInfo("BadSignatureError", 12, "revoked")))
    assert tr.state.state is UpdateState.ABORTED and tr.state.active == V2
    assert isinstance(tr.action, Report)


def test_rollback_without_previous_is_refused():
    with pytest.raises(NothingToRollBackError, match="no previous"):
        step(committed_v1(), BeginRollback("r1"))


def test_second_install_during_download_is_refused():
    s = step(committed_v1(), BeginDownload("u1", "mqtt")).state
    with pytest.raises(InvalidTransitionError, match="while downloading"):
        step(s, BeginInstall("u2", "file"))
    tr = step(s, BeginInstall("u1", "spool"))
    assert tr.state.state is UpdateState.VERIFYING and tr.action == VerifyInto("b")


def test_download_failure_aborts_without_touching_slots():
    s = step(committed_v1(), BeginDownload("u1", "mqtt")).state
    tr = step(s, DownloadFailed(ErrorInfo("TransportError", 30, "broker gone")))
    assert tr.state.state is UpdateState.ABORTED and isinstance(tr.action, Report)


def test_broken_active_at_boot_recovers_to_previous():
    s = replace(committed_v1(), active=V2, previous=V1)
    tr = step(s, ActiveLoaded(ErrorInfo("SlotIntegrityError", 48, "bit rot")))
    assert tr.state.state is UpdateState.ROLLING_BACK and tr.state.update.kind == "recover"
    s = step(tr.state, TargetChecked()).state
    assert (s.active, s.previous) == (V1, None)


def test_every_change_bumps_seq_and_unchanged_returns_same_object():
    s = committed_v1()
    tr = step(s, Boot())
    assert tr.state is s
    mid = state_in(UpdateState.COMMITTED)
    assert step(mid, Boot()).state.update.stores == mid.update.stores + 1
    tr = step(s, BeginInstall("u1", "f"))
    assert tr.state.seq == s.seq + 1 and tr.state.update.stores == 1


def test_serving_ref_during_trial_is_the_previous_model():
    assert serving_ref(state_in(UpdateState.TRIAL)) == V1
    assert serving_ref(state_in(UpdateState.COMMITTED)) == V2
