"""Metrics, the drop sign convention, and the gate's choice."""

from __future__ import annotations

import numpy as np
import pytest

from compression.config import Candidate, DynamicInt8, Float16, Metric, StaticInt8
from compression.evaluate import degradation, predictions, score
from compression.gate import CandidateResult, choose, passes

LOGITS = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5], [0.2, 0.1]])


def test_accuracy_against_labels():
    labels = np.array([0, 1, 1, 0])
    assert score(Metric.ACCURACY, LOGITS, LOGITS, labels, 0.0) == 0.75


def test_accuracy_without_labels_raises():
    with pytest.raises(ValueError, match="labels"):
        score(Metric.ACCURACY, LOGITS, LOGITS, None, 0.0)


def test_agreement_compares_top1_with_fp32():
    other = LOGITS.copy()
    other[0] = [0.0, 1.0]
    assert score(Metric.AGREEMENT, other, LOGITS, None, 0.0) == 0.75


def test_single_column_outputs_use_the_logit_threshold():
    out = np.array([[-1.0], [0.5], [2.0]])
    np.testing.assert_array_equal(predictions(out, 0.0), [0, 1, 1])
    np.testing.assert_array_equal(predictions(out, 1.0), [0, 0, 1])


def test_cosine_is_one_for_scaled_outputs_and_handles_zero_rows():
    ref = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    out = np.array([[2.0, 0.0], [0.0, 0.0], [-1.0, -1.0]])
    assert score(Metric.COSINE, out, ref, None, 0.0) == pytest.approx((1.0 + 1.0 - 1.0) / 3)


def test_mse_is_zero_for_fp32_and_grows():
    assert score(Metric.MSE, LOGITS, LOGITS, None, 0.0) == 0.0
    assert score(Metric.MSE, LOGITS + 0.1, LOGITS, None, 0.0) == pytest.approx(0.01)


def test_drop_is_positive_when_worse_for_every_metric():
    assert degradation(Metric.ACCURACY, 0.95, 0.94) == pytest.approx(0.01)
    assert degradation(Metric.MSE, 0.0, 0.02) == pytest.approx(0.02)
    assert degradation(Metric.COSINE, 1.0, 1.0) == 0.0


def _result(quant, wire, drop, latency, error=None):
    return CandidateResult(
        candidate=Candidate(quant=quant),
        bytes=wire * 2,
        wire_bytes=wire,
        metric=0.9,
        drop=drop,
        latency_p50_ms=latency,
        error=error,
    )


def test_gate_keeps_smallest_passing_and_rejects_big_drop():
    too_lossy = _result(StaticInt8(), 100, 0.05, 0.1)
    ok = _result(DynamicInt8(), 150, 0.005, 0.1)
    bigger = _result(Float16(), 300, 0.0, 0.05)
    chosen = choose([too_lossy, ok, bigger], max_drop=0.01, tie_tolerance=0.01)
    assert chosen is ok
    assert not passes(too_lossy, 0.01)


def test_gate_tie_goes_to_the_faster():
    slow = _result(StaticInt8(), 1000, 0.0, 0.5)
    fast = _result(DynamicInt8(), 1005, 0.0, 0.2)
    assert choose([slow, fast], max_drop=0.01, tie_tolerance=0.01) is fast
    assert choose([slow, fast], max_drop=0.01, tie_tolerance=0.0) is slow


def test_gate_never_passes_an_errored_candidate():
    broken = _result(StaticInt8(), 10, 0.0, 0.1, error="QuantizationError: boom")
    assert choose([broken], max_drop=1.0, tie_tolerance=0.0) is None


def test_gate_with_nothing_passing_returns_none():
    assert choose([_result(Float16(), 10, 0.5, 0.1)], max_drop=0.01, tie_tolerance=0.0) is None


def test_candidate_row_has_ratios():
    row = _result(DynamicInt8(), 250, 0.0, 0.1).to_json(fp32_bytes=1000)
    assert row["size_ratio"] == 2.0 and row["wire_ratio"] == 4.0
    assert row["quant"]["type"] == "DynamicInt8"
