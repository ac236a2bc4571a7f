"""Shadow mode: a second model runs on the same inputs off the hot path, never served."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.core import Agent
from agent.errors import NonFiniteOutputError, NothingToRollBackError, OutputSpecError
from edgefleet.errors import HashMismatchError
from edgefleet.trust import read_header
from firmware_sim.models import GOLDEN_X, BundleSet, cnn_model, linear_model, mlp_model

RNG = np.random.default_rng(7)
BATCHES = [RNG.normal(size=(4, 8)).astype(np.float32) for _ in range(50)]


@pytest.fixture(scope="module")
def shadow_bundles(bundles: BundleSet) -> dict[str, Path]:
    rel = bundles.release
    d = rel.dir
    return {
        "same_as_v2": rel.build(linear_model(seed=2), version=8, out=d / "same-v2.bundle"),
        "slow": rel.build(mlp_model((8, 1024, 1024, 3)), version=8, out=d / "slow-mlp.bundle"),
        "cnn": rel.build(cnn_model(), name="digits", version=1, out=d / "cnn.bundle"),
    }


@pytest.fixture
def serving_v2(agent: Agent, bundles: BundleSet) -> Agent:
    assert agent.install(bundles.v1).ok and agent.install(bundles.v2).ok
    return agent


def test_shadow_same_model_agrees_fully(serving_v2: Agent, shadow_bundles):
    stats = serving_v2.set_shadow(shadow_bundles["same_as_v2"])
    assert stats["version"] == 8 and stats["seen"] == 0
    for batch in BATCHES:
        serving_v2.predict(batch)
    stats = serving_v2.shadow_stats(wait=True)
    assert stats is not None
    assert stats["compared"] == 50 and stats["dropped"] == 0 and stats["errors"] == 0
    assert stats["kind"] == "classifier"
    assert stats["top1_agreement"] == 1.0 and stats["mean_abs_diff"] == 0.0
    assert stats["shadow_latency_ms_p50"] > 0 and stats["active_latency_ms_p50"] > 0


def test_shadow_previous_model_disagrees_and_is_never_served(serving_v2: Agent, bundles):
    expected = [serving_v2.predict(b)[0] for b in BATCHES]
    serving_v2.set_shadow("previous")
    got = [serving_v2.predict(b)[0] for b in BATCHES]
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_array_equal(a, b)
    stats = serving_v2.shadow_stats(wait=True)
    assert stats is not None and stats["version"] == 1
    assert 0.0 <= stats["top1_agreement"] < 1.0
    assert stats["mean_abs_diff"] > 0.01
    assert serving_v2.status()["serving"]["version"] == 2


def test_shadow_full_queue_drops_and_counts(make_agent, bundles: BundleSet, shadow_bundles):
    agent = make_agent(options={"shadow_queue": 1})
    agent.install(bundles.v1)
    agent.set_shadow(shadow_bundles["slow"])
    for _ in range(40):
        agent.predict(BATCHES[0])
    stats = agent.shadow_stats(wait=True)
    assert stats is not None
    assert stats["seen"] == 40 and stats["dropped"] > 0
    assert stats["compared"] + stats["dropped"] == 40


def test_shadow_feedback_scores_both_models(serving_v2: Agent, shadow_bundles):
    serving_v2.set_shadow(shadow_bundles["same_as_v2"])
    ids = []
    for batch in BATCHES[:10]:
        pid, out = serving_v2.predict_with_id(batch)
        ids.append((pid, out[0].argmax(axis=1)))
    serving_v2.shadow_stats(wait=True)
    for pid, labels in ids:
        serving_v2.feedback(pid, labels)
    stats = serving_v2.shadow_stats()
    assert stats is not None and stats["labelled"] == 40
    assert stats["active_accuracy"] == 1.0 and stats["shadow_accuracy"] == 1.0


def test_shadow_bad_model_is_refused(serving_v2: Agent, bundles: BundleSet):
    with pytest.raises(NonFiniteOutputError):
        serving_v2.set_shadow(bundles.nan)
    assert serving_v2.shadow_stats() is None


def test_shadow_tampered_bundle_is_refused(serving_v2: Agent, shadow_bundles):
    data = bytearray(shadow_bundles["same_as_v2"].read_bytes())
    data[read_header(bytes(data)).header_bytes + 512 + 20] ^= 1
    with pytest.raises(HashMismatchError, match="sha256 differs"):
        serving_v2.set_shadow(bytes(data))
    assert serving_v2.shadow_stats() is None


def test_shadow_with_other_inputs_is_refused(serving_v2: Agent, shadow_bundles):
    with pytest.raises(OutputSpecError, match="shadow inputs"):
        serving_v2.set_shadow(shadow_bundles["cnn"])


def test_shadow_previous_without_one(agent: Agent, bundles: BundleSet):
    agent.install(bundles.v1)
    with pytest.raises(NothingToRollBackError):
        agent.set_shadow("previous")


def test_shadow_clear_restores_plain_hot_path(serving_v2: Agent, shadow_bundles):
    serving_v2.set_shadow(shadow_bundles["same_as_v2"])
    serving_v2.clear_shadow()
    assert serving_v2.shadow_stats() is None and serving_v2.status()["shadow"] is None
    assert serving_v2.predict(GOLDEN_X)[0].shape == (2, 3)
