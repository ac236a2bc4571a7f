"""Accuracy from feedback labels, with its Wilson interval and verdict."""

from __future__ import annotations

import pytest

from server.analysis.quality import Accuracy, accuracy, judge, tally
from server.analysis.verdict import Status


def test_tally_scores_class_labels_against_the_prediction() -> None:
    feedback = [
        {"label": 1, "predicted": 1},
        {"label": 0, "predicted": 1},
        {"label": True, "predicted": 1},
        {"label": "cat", "predicted": 1},  # not a class id
        {"label": 2, "predicted": None},  # nothing to compare with
        {"label": 0.5, "predicted": 0},
    ]
    a = tally(feedback)
    assert (a.labelled, a.correct, a.unscored) == (3, 2, 3)
    assert a.value == pytest.approx(2 / 3)
    assert (a + Accuracy(1, 1)).to_dict()["correct"] == 3


def test_wilson_interval() -> None:
    low, high = accuracy(100, 90).interval() or (0, 0)
    assert low == pytest.approx(0.8256, abs=1e-4) and high == pytest.approx(0.9448, abs=1e-4)
    assert accuracy(0, 0).interval() is None and accuracy(0, 0).value is None
    low, high = accuracy(10, 10).interval() or (0, 0)
    assert high == pytest.approx(1.0) and 0.7 < low < 0.75
    with pytest.raises(ValueError, match="correct"):
        accuracy(3, 4)


def test_judge_against_a_required_accuracy() -> None:
    assert judge(accuracy(50, 10), 0.9)[0] is Status.INSUFFICIENT
    assert judge(accuracy(1000, 950), 0.9)[0] is Status.OK
    status, reason = judge(accuracy(1000, 890), 0.9)  # below, but the interval reaches 0.9
    assert status is Status.WARN and "0.890" in reason
    assert judge(accuracy(1000, 800), 0.9)[0] is Status.ALARM


def test_feedback_audit_shows_labels_chosen_by_the_model() -> None:
    from server.analysis.quality import feedback_audit

    # 900 predicted "ok" (0), 100 predicted "fraud" (1); only flagged cases were investigated
    pairs = [(1, 1)] * 70 + [(1, 0)] * 30 + [(0, 0)] * 9
    audit = feedback_audit({0: 900, 1: 100}, pairs, unscored=2)
    assert audit["predictions"] == 1000 and audit["labels"] == 109 and audit["unscored_labels"] == 2
    by = {c["class"]: c for c in audit["classes"]}
    assert by[1]["coverage"] == 1.0 and by[0]["coverage"] == 0.01
    assert by[1]["accuracy"] == 0.7 and by[0]["accuracy"] == 1.0
    assert audit["coverage_ratio"] == 100.0  # labels 100x more likely on one predicted class
    assert by[0]["labelled_share"] == round(39 / 109, 6)
    empty = feedback_audit({}, [])
    assert empty["coverage"] is None and empty["classes"] == []


def test_label_free_estimate_from_confidences() -> None:
    from server.analysis.quality import Estimate, estimate_accuracy, judge_estimate

    bins = [{"lo": b / 10, "hi": (b + 1) / 10, "n": 0, "confidence": None, "accuracy": None}
            for b in range(10)]  # fmt: skip
    bins[9].update(n=800, confidence=0.95, accuracy=0.9)
    bins[6].update(n=200, confidence=0.65, accuracy=0.6)
    table = {"output": 0, "bins": bins}
    same = estimate_accuracy(table, [0] * 6 + [20] + [0] * 2 + [80])
    assert same.estimated == same.reference == 0.84 and same.drop == 0.0
    shifted = estimate_accuracy(table, [0] * 6 + [80] + [0] * 2 + [20])
    assert shifted.estimated == 0.6 * 0.8 + 0.9 * 0.2
    assert round(shifted.drop, 9) == round(0.84 - 0.66, 9) and shifted.uncovered == 0.0
    # a bin the evaluation data never reached counts at its midpoint, and is reported
    odd = estimate_accuracy(table, [10] + [0] * 9)
    assert odd.estimated == 0.05 and odd.uncovered == 1.0
    assert estimate_accuracy(table, [0] * 10) == Estimate(0, None, 0.84, 0.0)
    assert judge_estimate(shifted, 0.1, 100)[0] is Status.ALARM
    assert judge_estimate(shifted, 0.2, 100)[0] is Status.OK
    assert judge_estimate(shifted, 0.1, 1000)[0] is Status.INSUFFICIENT
    with pytest.raises(ValueError, match="3 confidence bins for a calibration table of 10"):
        estimate_accuracy(table, [1, 2, 3])


def test_label_delay_holdout_split_and_effective_sample_size() -> None:
    from server.analysis.quality import effective_sample_size, label_delays, split_by_exploration

    fb = [
        {"label": 1, "predicted": 1, "exploration": True, "predicted_at": 10.0,
         "labelled_at": 70.0},
        {"label": 0, "predicted": 1, "exploration": False, "predicted_at": 10.0,
         "labelled_at": 9.5},  # labelled before the drain: 0 s
        {"label": 1, "predicted": 1},
    ]  # fmt: skip
    delays = label_delays(fb)
    assert delays == {"labels_with_times": 2, "labels_without_times": 1,
                      "p50_s": 0.0, "p90_s": 60.0, "max_s": 60.0}  # fmt: skip
    explored, selected, unflagged = split_by_exploration(fb)
    assert (explored.labelled, explored.correct) == (1, 1)
    assert (selected.labelled, selected.correct) == (1, 0) and unflagged == 1
    assert effective_sample_size([0.5, 0.5, 0.5])["effective_sample_size"] == 3.0
    mixed = effective_sample_size([1.0, 0.1, None, 0.0])
    assert mixed["effective_sample_size"] == round(11**2 / 101, 3)
    assert mixed["rows"] == 2 and mixed["rows_without_probability"] == 2
