"""Models that verify but must not serve: each is rolled back, with the reason reported."""

from __future__ import annotations

import numpy as np
import pytest

from agent.core import Agent
from firmware_sim.models import GOLDEN_X, BundleSet

EXPECTED = {
    "unknown_op": ("ModelLoadError", "onnxruntime cannot load the model"),
    "garbage": ("ModelLoadError", "onnxruntime cannot load the model"),
    "wrong_shape": ("OutputSpecError", "shape"),
    "nan": ("NonFiniteOutputError", "NaN/infinite"),
    "slow": ("LatencyBudgetError", "above the budget"),
    "golden_wrong": ("GoldenMismatchError", "differs from the expected output"),
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_bad_model_rolled_back(agent: Agent, bundles: BundleSet, events, kind: str):
    agent.install(bundles.v1)
    good = agent.predict(GOLDEN_X)[0]
    result = agent.install(bundles.bad[kind])
    error, words = EXPECTED[kind]
    assert result.outcome == "rolled-back" and not result.ok
    assert result.error is not None and result.error.error == error
    assert words in result.error.message
    assert result.code == result.error.code and 40 <= result.code <= 48
    status = agent.status()
    assert status["state"] == "idle"
    assert status["active"]["version"] == 1 and status["serving"]["version"] == 1
    assert status["previous"] is None, "the failed slot is no rollback target"
    assert status["rollback_floor"] == {"tiny": 1}, "the floor moves only at commit"
    assert status["last_error"]["error"] == error
    assert events[-1].outcome == "rolled-back" and events[-1].error.error == error
    assert (events[-1].model, events[-1].version) == ("tiny", 5)
    np.testing.assert_array_equal(agent.predict(GOLDEN_X)[0], good)
    # The device can still move forward after a failed update.
    assert agent.install(bundles.v2).ok
    assert agent.status()["last_error"] is None


@pytest.mark.parametrize("kind", ["nan", "unknown_op"])
def test_bad_first_model_leaves_no_model(agent: Agent, bundles: BundleSet, kind: str):
    result = agent.install(bundles.bad[kind])
    assert result.outcome == "rolled-back"
    status = agent.status()
    assert status["active"] is None and status["serving"] is None
    assert status["last_error"]["error"] == EXPECTED[kind][0]
    assert status["rollback_floor"] == {}


def test_bad_model_never_serves_during_trial(agent: Agent, bundles: BundleSet):
    agent.install(bundles.v1)
    seen = []
    agent.set_observer(lambda inputs, outputs, latency, pid: seen.append(outputs[0].copy()))
    agent.install(bundles.nan)
    agent.predict(GOLDEN_X)
    assert all(np.isfinite(o).all() for o in seen)


def test_latency_budget_factor_lets_slow_devices_pass(make_agent, bundles: BundleSet):
    # The bundle allows 1 µs; a device class configured with factor 100 allows
    # 100 µs, well above the tiny model's few microseconds.
    agent = make_agent(options={"latency_budget_factor": 100.0, "health_runs": 9})
    result = agent.install(bundles.slow)
    assert result.ok, result.error
