"""The alert state machine and the fleet-outlier check."""

from __future__ import annotations

import numpy as np

from server.analysis.alerts import AlertState, Window, advance
from server.analysis.drift import Observed, ReferenceHistogram
from server.analysis.judge import outliers
from server.analysis.verdict import Status

W, A = 0.10, 0.25


def window(status: Status, psi: float | None, at: float, digest: str = "m1") -> Window:
    return Window(status, psi, W, A, digest, at)


def feed(steps: list[tuple[Status, float | None]], state: AlertState | None = None):
    levels, transitions = [], []
    for i, (status, psi) in enumerate(steps):
        state, changed = advance(state, window(status, psi, float(i)))
        levels.append(state.level)
        transitions.extend(changed)
    return state, levels, transitions


def test_a_level_is_entered_on_two_of_the_last_three_windows() -> None:
    ok, warn, alarm = (Status.OK, 0.01), (Status.WARN, 0.15), (Status.ALARM, 0.4)
    _, levels, _ = feed([ok, warn, ok, ok, warn, ok, warn])
    assert levels == [Status.OK] * 6 + [Status.WARN]  # warn, ok, warn: 2 of 3
    _, levels, transitions = feed([alarm, ok, alarm])
    assert levels == [Status.OK, Status.OK, Status.ALARM]
    assert [(t.before, t.after) for t in transitions] == [(Status.OK, Status.ALARM)]
    assert "2 of the last 3" in transitions[0].reason
    _, levels, _ = feed([warn, alarm])  # both reach warn, one alarm: warn
    assert levels[-1] is Status.WARN


def test_a_level_clears_after_three_quiet_windows_with_hysteresis() -> None:
    warn, alarm = (Status.WARN, 0.15), (Status.ALARM, 0.4)
    state, levels, _ = feed([warn, warn])
    assert levels[-1] is Status.WARN
    # PSI 0.09 is below the threshold but not below 0.8 x 0.10: the alert holds
    state, levels, _ = feed([(Status.OK, 0.09)] * 5, state)
    assert set(levels) == {Status.WARN}
    state, levels, transitions = feed([(Status.OK, 0.05)] * 3, state)
    assert levels == [Status.WARN, Status.WARN, Status.OK]
    assert transitions[-1].after is Status.OK and "0.8" in transitions[-1].reason
    # an alarm steps down to warn while the PSI stays above 0.8 x warn
    state, levels, _ = feed([alarm, alarm] + [(Status.WARN, 0.15)] * 3)
    assert levels == [Status.OK, Status.ALARM, Status.ALARM, Status.ALARM, Status.WARN]


def test_insufficient_windows_change_nothing_and_a_new_model_resets() -> None:
    alarm = (Status.ALARM, 0.4)
    state, levels, _ = feed([alarm, (Status.INSUFFICIENT, None), alarm])
    assert levels == [Status.OK, Status.OK, Status.ALARM]
    assert state is not None and state.recent == (Status.ALARM, Status.ALARM)
    fresh, changed = advance(state, window(Status.ALARM, 0.4, 10.0, digest="m2"))
    assert fresh.model_digest == "m2" and fresh.level is Status.OK and changed == []
    assert AlertState.from_dict(state.to_dict()) == state


def test_one_broken_device_is_an_outlier_a_population_shift_is_not() -> None:
    rng = np.random.default_rng(0)
    edges = tuple(np.quantile(rng.normal(size=5000), np.arange(1, 10) / 10))
    ref = ReferenceHistogram("amount", 3, edges, (500.0,) * 10)

    def device(shift: float) -> Observed:
        idx = np.searchsorted(edges, rng.normal(shift, 1, size=800), side="right")
        return Observed(tuple(np.bincount(idx, minlength=10).tolist()))

    fleet = {f"pi-{i}": device(0.0) for i in range(10)}
    fleet["pi-broken"] = device(1.5)
    verdicts = outliers(ref, fleet)
    assert verdicts["pi-broken"].status is Status.ALARM
    assert all(v.status is Status.OK for d, v in verdicts.items() if d != "pi-broken")
    minority = {f"pi-{i}": device(1.0 if i < 3 else 0.0) for i in range(10)}
    flagged = {d for d, v in outliers(ref, minority).items() if v.status is not Status.OK}
    assert flagged == {"pi-0", "pi-1", "pi-2"}  # the median ignores a drifting minority
    shifted = {f"pi-{i}": device(1.0) for i in range(10)}  # everyone moved together
    assert all(v.status is Status.OK for v in outliers(ref, shifted).values())
    two = {"a": device(0.0), "b": device(2.0)}
    assert {v.status for v in outliers(ref, two).values()} == {Status.INSUFFICIENT}
