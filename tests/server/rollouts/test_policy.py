"""Table tests of the rollout decision core: spec, cohorts, gates and every state of ``step``."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from edgefleet.errors import ConfigError
from server.analysis.verdict import Status
from server.rollouts import cohorts, gates
from server.rollouts.gates import DeviceStats, Verdict
from server.rollouts.policy import (
    Assign,
    DeviceReport,
    DeviceStatus,
    Evidence,
    Note,
    Phase,
    Revert,
    RolloutState,
    RolloutStatus,
    start,
    step,
)
from server.rollouts.spec import GateSpec, RolloutSpec

G = GateSpec()


# ------------------------------------------------------------------ cohorts and spec


def test_wave_order_is_deterministic_stratified_and_stable() -> None:
    devices = [(f"d{i}", "pi4" if i % 4 else "pi3") for i in range(200)]
    a = cohorts.order("r1", devices)
    assert a == cohorts.order("r1", list(reversed(devices)))
    assert a != cohorts.order("r2", devices)
    classes = dict(devices)
    for k in (4, 20, 50):  # every prefix takes the classes in proportion (1 in 4 is a pi3)
        share = Counter(classes[d] for d in a[:k])["pi3"] / k
        assert abs(share - 0.25) <= 1 / k + 1e-9
    more = cohorts.order("r1", [*devices, ("new", "pi4")])
    assert [d for d in more if d != "new"][:10] != [] and set(a) <= set(more)


def test_wave_sizes_take_at_least_one_more_device_per_wave() -> None:
    assert cohorts.wave_sizes((5, 25, 100), 100) == [5, 25, 100]
    assert cohorts.wave_sizes((1, 5, 25, 100), 10) == [1, 2, 3, 10]
    assert cohorts.wave_sizes((5, 100), 1) == [1, 1]
    assert cohorts.wave_sizes((100,), 0) == [0]


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"waves": (50, 25, 100)}, "ascend"),
        ({"waves": (5, 50)}, "end at 100"),
        ({"waves": ()}, "1-20"),
        ({"strategy": "yolo"}, "strategy"),
        ({"version": 0}, "version"),
        ({"previous": 3}, "previous"),
        ({"soak_s": -1}, "soak_s"),
        ({"gates": GateSpec.from_dict({"max_failure_rate": 0.5})} | {"device_timeout_s": 1},
         "device_timeout_s"),
    ],
)  # fmt: skip
def test_specs_are_bounded(fields: dict, needle: str) -> None:
    base = {"model": "fraud", "version": 3, "group": "g", "previous": 2}
    with pytest.raises(ConfigError, match=needle):
        RolloutSpec(**(base | fields))


def test_spec_json_round_trip_and_gate_fields_are_checked() -> None:
    spec = RolloutSpec("fraud", 3, "g", 2, waves=(10, 100), gates=GateSpec(min_labels=50))
    assert RolloutSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert RolloutSpec("fraud", 3, "g", 2, strategy="all-at-once").waves == (100.0,)
    with pytest.raises(ConfigError, match="unknown gate fields"):
        GateSpec.from_dict({"max_fail": 1})
    with pytest.raises(ConfigError, match=r"gates\.error_alpha"):
        GateSpec(error_alpha=0.9)
    with pytest.raises(ConfigError, match="needs 'group'"):
        RolloutSpec.from_dict({"model": "m", "version": 2})


# ------------------------------------------------------------------ gates


def cohort(
    n: int, *, preds: int = 1000, errors: int = 0, p95: float = 10.0,
    labelled: int = 0, correct: int = 0, prefix: str = "c",
) -> list[DeviceStats]:  # fmt: skip
    return [DeviceStats(f"{prefix}{i}", preds, errors, p95 + i * 0.01, labelled, correct)
            for i in range(n)]  # fmt: skip


@pytest.mark.parametrize(
    ("finished", "failed", "first", "verdict"),
    [
        (0, 0, True, Verdict.INCONCLUSIVE),
        (1, 1, True, Verdict.FAIL),  # any failure in the first wave
        (2, 0, False, Verdict.PASS),  # fewer than min_executed, none failed
        (2, 1, False, Verdict.INCONCLUSIVE),  # a failure among too few to judge a rate
        (10, 2, False, Verdict.PASS),  # 20% is not above 20%
        (10, 3, False, Verdict.FAIL),
    ],
)
def test_update_failure_gate(finished: int, failed: int, first: bool, verdict: Verdict) -> None:
    assert gates.update_failures(finished, failed, first, G).verdict is verdict


def test_error_rate_gate() -> None:
    control = cohort(5, errors=1, prefix="o")
    assert gates.error_rate(cohort(5, errors=1), control, G).verdict is Verdict.PASS
    bad = gates.error_rate(cohort(5, errors=20), control, G)
    assert bad.verdict is Verdict.FAIL and bad.stats["p"] < 0.01 and bad.stats["ratio"] == 20
    assert gates.error_rate(cohort(2, errors=20), control, G).verdict is Verdict.INCONCLUSIVE
    assert gates.error_rate(cohort(5), None, G).verdict is Verdict.PASS  # no control left
    # significant but not a practical difference (x1.3 < x2)
    many = cohort(5, preds=1_000_000, errors=1300)
    ref = cohort(5, preds=1_000_000, errors=1000, prefix="o")
    assert gates.error_rate(many, ref, G).verdict is Verdict.PASS


def test_latency_gate_uses_per_device_p95s() -> None:
    control = cohort(6, p95=10.0, prefix="o")
    assert gates.latency(cohort(6, p95=10.0), control, G).verdict is Verdict.PASS
    slow = gates.latency(cohort(6, p95=15.0), control, G)
    assert slow.verdict is Verdict.FAIL and slow.stats["ratio"] > 1.2
    slightly = gates.latency(cohort(6, p95=11.0), control, G)  # significant, under x1.2
    assert slightly.verdict is Verdict.PASS
    assert gates.latency(cohort(2, p95=50.0), control, G).verdict is Verdict.INCONCLUSIVE


@pytest.mark.parametrize(
    ("canary", "control", "verdict"),
    [
        ((2000, 1800), (2000, 1800), Verdict.PASS),  # same accuracy, plenty of labels
        ((2000, 1500), (2000, 1800), Verdict.FAIL),  # 0.75 vs 0.90
        ((150, 130), (150, 135), Verdict.INCONCLUSIVE),  # too wide to decide
        ((50, 50), (2000, 1800), Verdict.INCONCLUSIVE),  # fewer than min_labels
    ],
)
def test_metric_gate_is_non_inferiority(canary, control, verdict) -> None:
    a = [DeviceStats(f"c{i}", 100, 0, 1.0, canary[0] // 5, canary[1] // 5) for i in range(5)]
    b = [DeviceStats(f"o{i}", 100, 0, 1.0, control[0] // 5, control[1] // 5) for i in range(5)]
    assert gates.metric(a, b, G).verdict is verdict
    assert gates.metric(a, b, GateSpec(metric=False)).verdict is Verdict.PASS


def test_drift_gate_and_combination() -> None:
    assert gates.drift(Status.ALARM, Status.OK, G).verdict is Verdict.FAIL
    assert gates.drift(Status.ALARM, Status.ALARM, G).verdict is Verdict.PASS  # the world moved
    assert gates.drift(Status.INSUFFICIENT, Status.OK, G).verdict is Verdict.INCONCLUSIVE
    assert gates.drift(Status.ALARM, Status.OK, GateSpec(drift=False)).verdict is Verdict.PASS
    assert gates.drift(None, None, G).verdict is Verdict.PASS  # no output reference
    p, f, i = (gates.GateResult("x", v, "") for v in Verdict)
    assert (
        gates.combine([p, i]) is Verdict.INCONCLUSIVE and gates.combine([p, f, i]) is Verdict.FAIL
    )
    assert gates.combine([p, p]) is Verdict.PASS


# ------------------------------------------------------------------ the core

# version 4 is version 2's payload re-released above the candidate (the revert target)
SPEC = RolloutSpec("fraud", 3, "g", 2, waves=(10, 50, 100), soak_s=60, device_timeout_s=300,
                   decision_deadline_s=600, revert_to=4)  # fmt: skip
DEVICES = [(f"d{i}", "pi4") for i in range(10)]


def good_evidence(state: RolloutState, t: float, running: dict[str, int] | None = None) -> Evidence:
    """Every notified device committed at t-100 with telemetry up to t; healthy cohorts."""
    reports = {}
    for d, s in state.devices.items():
        if s.status is DeviceStatus.PENDING:
            reports[d] = DeviceReport(d, running=2)
        else:
            v = (running or {}).get(d, 3)
            reports[d] = DeviceReport(
                d, running=v, update="committed", at=s.since, telemetry_until=t
            )
    canary = cohort(5, labelled=400, correct=360)
    control = cohort(5, labelled=400, correct=360, prefix="o")
    return Evidence(reports, canary, control, Status.OK, Status.OK)


STOPS = (RolloutStatus.COMPLETED, RolloutStatus.REVERTED, RolloutStatus.PAUSED,
         RolloutStatus.NEEDS_ATTENTION)  # fmt: skip


def run_until(state: RolloutState, t: float, evidence_of, *, limit: int = 50, stops=STOPS):
    """Step every 30 s until the rollout reaches one of ``stops``."""
    all_actions = []
    for _ in range(limit):
        state, actions = step(SPEC, state, evidence_of(state, t), t)
        all_actions += actions
        if state.status in stops:
            break
        t += 30
    return state, all_actions, t


def test_a_good_rollout_goes_through_every_wave() -> None:
    state = start(SPEC, "r1", DEVICES, 0.0)
    state, actions = step(SPEC, state, Evidence(), 0.0)
    assigned = [a.device_id for a in actions if isinstance(a, Assign)]
    assert assigned == list(state.order[:1]) and state.phase is Phase.DEPLOYING
    again, more = step(SPEC, state, Evidence(), 1.0)  # level-triggered: nothing new
    assert not [a for a in more if isinstance(a, Assign)] and again == state
    state, actions, _ = run_until(state, 30.0, good_evidence)
    assert state.status is RolloutStatus.COMPLETED
    assigned += [a.device_id for a in actions if isinstance(a, Assign)]
    assert sorted(assigned) == sorted(d for d, _ in DEVICES) and len(set(assigned)) == 10
    decisions = [a.detail["decision"] for a in actions if isinstance(a, Note) and
                 a.kind == "decision"]  # fmt: skip
    assert decisions == ["advance", "advance", "complete"]
    assert all(s.status is DeviceStatus.SUCCEEDED for s in state.devices.values())
    assert RolloutState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


def test_a_device_succeeds_only_after_its_soak_with_telemetry() -> None:
    state, _ = step(SPEC, start(SPEC, "r1", DEVICES, 0.0), Evidence(), 0.0)
    d = state.order[0]
    committed = {d: DeviceReport(d, 3, "committed", at=10.0, telemetry_until=20.0)}
    state, _ = step(SPEC, state, Evidence(committed), 20.0)
    assert state.devices[d].status is DeviceStatus.SOAKING
    state, _ = step(SPEC, state, Evidence(committed), 100.0)  # soaked, but no telemetry after 70
    assert state.devices[d].status is DeviceStatus.SOAKING
    late = {d: DeviceReport(d, 3, "committed", at=10.0, telemetry_until=75.0)}
    state, _ = step(SPEC, state, Evidence(late), 101.0)
    assert state.devices[d].status is DeviceStatus.SUCCEEDED
    assert state.phase is Phase.EVALUATING  # the whole first wave has finished


@pytest.mark.parametrize(
    ("report", "status"),
    [
        (DeviceReport("x", 2, "rolled-back", 5.0, "health check"), DeviceStatus.ROLLED_BACK),
        (DeviceReport("x", 2, "failed", 5.0, "signature"), DeviceStatus.FAILED),
        (DeviceReport("x", 2, "downloading", 5.0), DeviceStatus.TIMED_OUT),  # at t=400 > 300
    ],
)  # fmt: skip
def test_a_first_wave_failure_aborts_and_reverts(report: DeviceReport, status) -> None:
    state, _ = step(SPEC, start(SPEC, "r1", DEVICES, 0.0), Evidence(), 0.0)
    d = state.order[0]
    state, actions = step(SPEC, state, Evidence({d: report}), 400.0)
    assert state.status is RolloutStatus.ABORTING
    assert [a for a in actions if isinstance(a, Revert)] == [Revert(d, 4)]
    assert state.devices[d].status is DeviceStatus.REVERTING
    assert not any(isinstance(a, Assign) for a in actions)
    others = [x for x in state.order if x != d]
    assert all(state.devices[x].status is DeviceStatus.PENDING for x in others)  # never told
    stale, _ = step(SPEC, state, Evidence({d: report}), 410.0)  # no report since the revert
    assert stale.devices[d].status is DeviceStatus.REVERTING
    back = {d: DeviceReport(d, 4, "committed", 420.0, seen_at=420.0)}
    state, actions = step(SPEC, state, Evidence(back), 430.0)
    assert (
        state.status is RolloutStatus.REVERTED and state.devices[d].status is DeviceStatus.REVERTED
    )
    assert not any(isinstance(a, Revert) for a in actions)  # sent once


def test_a_worse_model_in_the_field_is_aborted_by_the_metric_gate() -> None:
    state = start(SPEC, "r1", DEVICES, 0.0)

    def worse(state: RolloutState, t: float) -> Evidence:
        ev = good_evidence(state, t)
        bad = cohort(5, labelled=400, correct=280)
        return Evidence(ev.reports, bad, ev.control, Status.OK, Status.OK)

    state, actions, _ = run_until(state, 0.0, worse, stops=(RolloutStatus.ABORTING,))
    assert state.status is RolloutStatus.ABORTING and state.wave == 0
    assert "accuracy" in state.reason
    evaluations = [a.detail for a in actions if isinstance(a, Note) and a.kind == "gates"]
    assert evaluations[-1]["verdict"] == "fail"
    metric = next(g for g in evaluations[-1]["gates"] if g["gate"] == "metric")
    assert metric["verdict"] == "fail" and metric["stats"]["difference"] < -0.1
    reverts = [a for a in actions if isinstance(a, Revert)]
    assert reverts == [Revert(state.order[0], 4)]  # only the canary: wave 0 is one device


def test_inconclusive_waits_then_pauses_at_the_deadline_and_resume_gives_a_new_one() -> None:
    state = start(SPEC, "r1", DEVICES, 0.0)

    def thin(state: RolloutState, t: float) -> Evidence:
        ev = good_evidence(state, t)
        return Evidence(ev.reports, cohort(1), ev.control, Status.OK, Status.OK)

    state, _, t = run_until(state, 0.0, thin)
    assert state.status is RolloutStatus.PAUSED and "inconclusive" in state.reason
    assert state.deadline is not None and t >= state.deadline
    state, actions = step(SPEC, state, thin(state, t), t, "resume", actor="op:alice")
    assert state.status is RolloutStatus.RUNNING and state.deadline == t + 600
    assert any(isinstance(a, Note) and a.detail.get("command") == "resume" for a in actions)


def test_operator_commands() -> None:
    state, _ = step(SPEC, start(SPEC, "r1", DEVICES, 0.0), Evidence(), 0.0)
    paused, _ = step(SPEC, state, Evidence(), 1.0, "pause", actor="op")
    assert paused.status is RolloutStatus.PAUSED and paused.reason == "paused by op"
    still, actions = step(SPEC, paused, Evidence(), 2.0)
    assert still.status is RolloutStatus.PAUSED and not any(isinstance(a, Assign) for a in actions)
    promoted, actions = step(SPEC, paused, Evidence(), 3.0, "promote", actor="op")
    assert promoted.status is RolloutStatus.RUNNING and promoted.wave == 1
    assert len([a for a in actions if isinstance(a, Assign)]) == 4  # 50% of 10, one already told
    aborted, actions = step(SPEC, promoted, Evidence(), 4.0, "abort", actor="op")
    assert aborted.status is RolloutStatus.ABORTING
    assert len([a for a in actions if isinstance(a, Revert)]) == 5
    _, actions = step(SPEC, aborted, Evidence(), 5.0, "resume")
    assert actions[0].detail["result"].startswith("ignored")


def test_a_revert_that_does_not_finish_needs_attention_and_can_still_end() -> None:
    state, _ = step(SPEC, start(SPEC, "r1", DEVICES, 0.0), Evidence(), 0.0)
    d = state.order[0]
    state, _ = step(SPEC, state, Evidence(), 1.0, "abort")
    state, _ = step(SPEC, state, Evidence({d: DeviceReport(d, 3)}), 400.0)
    assert state.status is RolloutStatus.NEEDS_ATTENTION and d in state.reason
    state, _ = step(SPEC, state, Evidence({d: DeviceReport(d, 4, seen_at=450.0)}), 500.0)
    assert state.status is RolloutStatus.REVERTED


def test_without_revert_to_devices_that_committed_need_attention() -> None:
    spec = RolloutSpec("fraud", 3, "g", 2, waves=(20, 100), soak_s=60, device_timeout_s=300)
    state, _ = step(spec, start(spec, "r", DEVICES, 0.0), Evidence(), 0.0)
    a, b = state.order[:2]
    reports = {a: DeviceReport(a, 3, "committed", 5.0), b: DeviceReport(b, 2, "rolled-back", 5.0)}
    state, actions = step(spec, state, Evidence(reports), 10.0)  # b's failure aborts
    assert state.devices[a].committed and not state.devices[b].committed
    # b never committed: its floor is still 2, so it goes back to 2; a would refuse 2
    assert [x for x in actions if isinstance(x, Revert)] == [Revert(b, 2)]
    assert state.status is RolloutStatus.NEEDS_ATTENTION and a in state.reason
    assert "revert_to" in state.reason
    with pytest.raises(ConfigError, match="revert_to"):
        RolloutSpec("fraud", 3, "g", 2, revert_to=3)


def test_without_a_previous_version_an_abort_needs_attention() -> None:
    spec = RolloutSpec("fraud", 1, "g", None, waves=(10, 100))
    state, _ = step(spec, start(spec, "r", DEVICES, 0.0), Evidence(), 0.0)
    state, actions = step(spec, state, Evidence(), 1.0, "abort")
    assert state.status is RolloutStatus.NEEDS_ATTENTION and "no previous version" in state.reason
    assert not any(isinstance(a, Revert) for a in actions)


def test_terminal_rollouts_ignore_commands() -> None:
    state = start(SPEC, "r1", DEVICES, 0.0)
    done, _, _ = run_until(state, 0.0, good_evidence)
    assert done.status is RolloutStatus.COMPLETED
    same, actions = step(SPEC, done, Evidence(), 10_000.0, "abort")
    assert same == done and actions[0].detail["result"] == "ignored: the rollout is completed"
