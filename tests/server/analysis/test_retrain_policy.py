"""The retraining decision: triggers, cooldown, bounds."""

from __future__ import annotations

import pytest

from edgefleet.errors import ConfigError
from server.analysis.quality import accuracy
from server.analysis.retrain import Policy, decide
from server.analysis.verdict import Status

NO_LABELS = accuracy(0, 0)
DAY = 86_400.0


def test_a_psi_alarm_on_a_key_feature_fires_and_others_do_not() -> None:
    p = Policy(key_features=("amount",), on_outputs=False)
    quiet = decide(p, {"feature:hour": Status.ALARM}, NO_LABELS, None, 1000.0)
    assert not quiet.fire and "no trigger" in quiet.reason
    d = decide(p, {"feature:amount": Status.ALARM}, NO_LABELS, None, 1000.0,
               psi={"feature:amount": 0.4})  # fmt: skip
    assert d.fire and d.trigger["subject"] == "feature:amount" and d.trigger["psi"] == 0.4
    assert not decide(p, {"feature:amount": Status.WARN}, NO_LABELS, None, 1000.0).fire


def test_output_drift_and_accuracy_fire() -> None:
    d = decide(Policy(), {"output:probs": Status.ALARM}, NO_LABELS, None, 0.0)
    assert d.fire and d.trigger["kind"] == "output"
    p = Policy(on_outputs=False, min_accuracy=0.9, min_labels=100)
    assert not decide(p, {}, accuracy(1000, 895), None, 0.0).fire  # interval reaches 0.9
    d = decide(p, {}, accuracy(1000, 800), None, 0.0)
    assert d.fire and d.trigger["kind"] == "accuracy" and d.trigger["required"] == 0.9
    assert not decide(p, {}, accuracy(50, 10), None, 0.0).fire  # too few labels


def test_the_cooldown_makes_the_decision_idempotent() -> None:
    p = Policy(key_features=("amount",), cooldown_s=DAY)
    alarm = {"feature:amount": Status.ALARM}
    d = decide(p, alarm, NO_LABELS, 1000.0, 1000.0 + DAY / 2)
    assert not d.fire and "cooldown" in d.reason
    assert decide(p, alarm, NO_LABELS, 1000.0, 1000.0 + DAY + 1).fire
    assert not decide(Policy(key_features=("amount",), enabled=False), alarm, NO_LABELS, None,
                      0.0).fire  # fmt: skip


def test_policies_are_bounded_and_round_trip() -> None:
    for bad in ({"min_accuracy": 1.5}, {"cooldown_s": 1}, {"min_labels": 0},
                {"key_features": ("",)}):  # fmt: skip
        with pytest.raises(ConfigError):
            Policy(**bad)  # type: ignore[arg-type]
    p = Policy(key_features=("a", "b"), min_accuracy=0.8)
    assert Policy.from_dict(p.to_dict()) == p
