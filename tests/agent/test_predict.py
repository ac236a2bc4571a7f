"""The inference path: inputs, errors, observer and feedback hooks, read-only agents."""

from __future__ import annotations

import numpy as np
import pytest

from agent.core import Agent
from agent.errors import InvalidInputError, NoActiveModelError
from firmware_sim.models import GOLDEN_X, BundleSet


def test_predict_dict_and_bare_array_agree(agent: Agent, bundles: BundleSet):
    agent.install(bundles.v1)
    a = agent.predict({"x": GOLDEN_X})
    b = agent.predict(GOLDEN_X)
    assert isinstance(a, list) and a[0].dtype == np.float32
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[0].sum(axis=1), 1.0, rtol=1e-5)


def test_predict_without_model(agent: Agent):
    with pytest.raises(NoActiveModelError, match="no model installed"):
        agent.predict(GOLDEN_X)


@pytest.mark.parametrize(
    "bad",
    [
        {"y": GOLDEN_X},
        {"x": GOLDEN_X.astype(np.float64)},
        {"x": np.zeros((2, 5), np.float32)},
    ],
    ids=["wrong_name", "wrong_dtype", "wrong_shape"],
)
def test_predict_invalid_input(agent: Agent, bundles: BundleSet, bad):
    agent.install(bundles.v1)
    with pytest.raises(InvalidInputError, match=r"inputs do not fit tiny v1 \(expects \['x'\]\)"):
        agent.predict(bad)


def test_observer_gets_inputs_outputs_latency_and_ids(agent: Agent, bundles: BundleSet):
    agent.install(bundles.v1)
    calls = []
    agent.set_observer(lambda i, o, t, pid: calls.append((i, o, t, pid)))
    out = agent.predict(GOLDEN_X)
    pid, out2 = agent.predict_with_id({"x": GOLDEN_X})
    assert [c[3] for c in calls] == [1, pid] and pid == 2
    inputs, outputs, latency, _ = calls[0]
    assert inputs["x"] is GOLDEN_X and outputs is out
    assert 0 < latency < 1.0
    np.testing.assert_array_equal(out[0], out2[0])


def test_observer_errors_never_break_inference(agent: Agent, bundles: BundleSet):
    agent.install(bundles.v1)

    def broken(*args):
        raise RuntimeError("telemetry bug")

    agent.set_observer(broken)
    assert agent.predict(GOLDEN_X)[0].shape == (2, 3)
    assert agent.observer_errors == 1 and agent.status()["observer_errors"] == 1


def test_feedback_goes_to_the_sink(agent: Agent, bundles: BundleSet):
    agent.install(bundles.v1)
    got = []
    agent.set_feedback_sink(lambda pid, label: got.append((pid, label)))
    pid, _ = agent.predict_with_id(GOLDEN_X)
    agent.feedback(pid, 2)
    assert got == [(pid, 2)] and agent.feedback_count == 1


def test_readonly_agent_serves_without_lock(make_agent, bundles: BundleSet, tmp_path):
    writer = make_agent()
    writer.install(bundles.v1)
    reader = Agent(tmp_path / "state", readonly=True)
    np.testing.assert_array_equal(reader.predict(GOLDEN_X)[0], writer.predict(GOLDEN_X)[0])
    with pytest.raises(Exception, match="read-only"):
        reader.install(bundles.v2)
