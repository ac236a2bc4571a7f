"""Samples with inclusion probabilities, the exploration share, label times, output histograms."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from agent.telemetry import Spool, TelemetryOptions, TelemetryRecorder
from agent.telemetry.binning import confidence_counts
from compression.profiles import calibration_table
from edgefleet.wire import TelemetryRecord


def make(tmp_path: Path, clock=None, **options) -> TelemetryRecorder:
    opts = TelemetryOptions(**options)
    return TelemetryRecorder(
        "pi-9", Spool(tmp_path / "spool"), opts, clock=clock or (lambda: 100.0),
        rng=random.Random(3),
    )  # fmt: skip


def records(rec: TelemetryRecorder) -> list[TelemetryRecord]:
    return [TelemetryRecord.from_bytes(rec.spool.read(s) or b"") for s in rec.spool.pending()]


def feed(rec: TelemetryRecorder, pids: range) -> None:
    for pid in pids:
        rec.observe({"x": np.full((1, 2), pid, np.float32)}, [np.zeros((1, 2))], 0.001, pid)


def test_exploration_is_a_fixed_share_of_ids_and_off_without_sampling(tmp_path) -> None:
    rec = make(tmp_path, sample_rate=0.1, samples_per_window=8)
    share = np.mean(rec._explore_many(np.arange(1_000_000)))
    assert 0.0195 <= share <= 0.0205
    ids = np.arange(5000)
    assert [rec.exploring(p) for p in ids.tolist()] == rec._explore_many(ids).tolist()
    again = make(tmp_path / "b", sample_rate=0.1, samples_per_window=8)
    assert [rec.exploring(p) for p in range(500)] == [again.exploring(p) for p in range(500)]
    other = TelemetryRecorder(
        "pi-10", Spool(tmp_path / "c"), TelemetryOptions(sample_rate=0.1, samples_per_window=8)
    )
    assert [rec.exploring(p) for p in range(2000)] != [other.exploring(p) for p in range(2000)]
    off = make(tmp_path / "d")  # sampling off: no exploration either
    assert not any(off.exploring(p) for p in range(5000))
    assert not rec.exploring("17") and not rec.exploring(-1) and not rec.exploring(2**70)
    with pytest.raises(Exception, match="explore_share"):
        TelemetryOptions(explore_share=0.9)


def test_samples_state_their_inclusion_probability(tmp_path) -> None:
    rec = make(tmp_path, sample_rate=0.05, samples_per_window=10, buffer_max=100_000)
    feed(rec, range(20_000))
    rec.close_window()
    (record,) = records(rec)
    samples = record.samples
    assert len(samples) == 10
    explored = [s for s in samples if s.exploration]
    assert all(rec.exploring(s.prediction_id) for s in explored)
    # ~2% explored + 5% of the rest are candidates: about 1,380, of which 10 are kept.
    candidates = 10 / samples[0].inclusion_probability * (1.0 if samples[0].exploration else 0.05)
    assert 1200 < candidates < 1600
    for s in samples:
        chance = 1.0 if s.exploration else 0.05
        assert s.inclusion_probability == pytest.approx(chance * 10 / candidates)
        x = np.frombuffer(s.inputs["x"].data, "<f4")
        assert (x == s.prediction_id).all()
    assert [s.prediction_id for s in samples] == sorted(s.prediction_id for s in samples)


def test_a_window_below_the_cap_keeps_every_candidate(tmp_path) -> None:
    rec = make(tmp_path, sample_rate=1.0, samples_per_window=50)
    feed(rec, range(30))
    rec.close_window()
    (record,) = records(rec)
    assert [s.prediction_id for s in record.samples] == list(range(30))
    assert {s.inclusion_probability for s in record.samples} == {1.0}


def test_feedback_carries_the_exploration_flag_and_both_times(tmp_path) -> None:
    now = [1000.0]
    rec = make(tmp_path, clock=lambda: now[0], sample_rate=0.1, samples_per_window=4)
    feed(rec, range(1000))
    now[0] = 1001.0
    rec.aggregate()  # drained at 1001
    now[0] = 1060.5
    explored = next(p for p in range(1000) if rec.exploring(p))
    rec.feedback(explored, 1)
    rec.feedback(3 if explored != 3 else 4, 0)
    rec.feedback(100_000, 1)  # never predicted
    rec.close_window()
    (record,) = records(rec)
    a, b, c = record.feedback
    assert (a.exploration, a.predicted_at, a.labelled_at) == (True, 1001.0, 1060.5)
    assert (b.exploration, b.predicted_at) == (False, 1001.0)
    assert c.predicted_at is None and c.labelled_at == 1060.5
    off = make(tmp_path / "off")
    feed(off, range(3))
    off.aggregate()
    off.feedback(1, 0)
    off.close_window()
    assert records(off)[0].feedback[0].exploration is None


def test_confidence_uses_the_calibration_tables_rule() -> None:
    rng = np.random.default_rng(0)
    for scores in (rng.dirichlet(np.ones(4), size=500), rng.normal(size=(500, 4)) * 3):
        winners = np.argmax(scores, axis=1)
        table = calibration_table(scores, winners)  # labels = winners: every row counted
        assert table is not None
        assert confidence_counts(scores, winners).tolist() == [b["n"] for b in table["bins"]]
    bad = np.array([[np.nan, 0.2], [0.3, 0.7]])
    assert confidence_counts(bad, np.argmax(bad, axis=1)).sum() == 1


def test_output_histograms_in_the_record(tmp_path) -> None:
    edges = [float(e) for e in np.linspace(-1, 1, 9)]
    ref = {"bins": 10, "features": [], "outputs": [{"index": 1, "name": "score", "edges": edges,
                                                    "counts": [1] * 10, "n": 10}]}  # fmt: skip
    rec = TelemetryRecorder("pi-9", Spool(tmp_path / "s"), drift_reference=ref)
    rng = np.random.default_rng(1)
    values = []
    for pid in range(200):
        probs = rng.dirichlet(np.ones(3), size=1).astype(np.float32)
        score = rng.normal(size=(1,)).astype(np.float32)
        values.append(float(score[0]))
        rec.observe({}, [probs, score], 0.001, pid)
    rec.close_window()
    (record,) = records(rec)
    classes, score = record.outputs
    assert classes.confidence is not None and sum(classes.confidence) == 200
    assert classes.counts is None and score.confidence is None
    want = np.bincount(np.searchsorted(edges, np.float32(values), side="right"), minlength=10)
    assert score.counts == tuple(int(c) for c in want)
