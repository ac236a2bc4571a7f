"""The array path of the verdicts (judge_grid, apply_fdr) against the one-histogram rules."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from server.analysis.drift import (
    AnalysisError,
    Observed,
    ReferenceHistogram,
    grid_stats,
    psi,
)
from server.analysis.judge import Rule, apply_fdr, judge, judge_family, judge_grid
from server.analysis.verdict import Status, Thresholds


def _refs(rng: np.random.Generator, f: int, bins: int) -> list[ReferenceHistogram]:
    out = []
    for j in range(f):
        counts = rng.multinomial(3000, rng.dirichlet(np.ones(bins) * 2)).astype(float)
        if j == 1:
            counts[0] = 0.0  # an empty reference bin
        out.append(ReferenceHistogram(f"f{j}", j, tuple(float(e) for e in range(bins - 1)),
                                      tuple(counts.tolist())))  # fmt: skip
    return out


def _grid(rng: np.random.Generator, refs: list[ReferenceHistogram], s: int) -> np.ndarray:
    f, bins = len(refs), refs[0].bins
    counts = np.zeros((s, f, bins), dtype=np.int64)
    for i in range(s):
        for j, r in enumerate(refs):
            n = int(rng.choice([0, 120, 499, 500, 800, 5000, 70_000]))
            p = r.proportions() if i % 3 else rng.dirichlet(np.ones(bins))
            counts[i, j] = rng.multinomial(n, p)
    return counts


def test_grid_statistics_equal_the_formulas() -> None:
    rng = np.random.default_rng(3)
    refs = _refs(rng, 4, 10)
    counts = _grid(rng, refs, 30)
    r = np.asarray([ref.counts for ref in refs])
    g = grid_stats(r, counts)
    for i in range(counts.shape[0]):
        for j in range(len(refs)):
            c = counts[i, j]
            assert g.n[i, j] == c.sum()
            if c.sum() == 0:
                continue
            assert g.psi[i, j] == pytest.approx(psi(r[j], c), rel=1e-9, abs=1e-12)
            keep = (r[j] + c) > 0
            table = np.stack([r[j][keep], c[keep]])
            expected, _, dof, _ = stats.chi2_contingency(table, correction=False)
            assert g.chi2[i, j] == pytest.approx(expected, rel=1e-7, abs=1e-7)
            assert g.dof[i, j] == dof


def test_grid_verdicts_equal_one_histogram_verdicts() -> None:
    rng = np.random.default_rng(4)
    refs = _refs(rng, 3, 10)
    counts = _grid(rng, refs, 24)
    nonfinite = rng.choice([0, 0, 3, 40], size=counts.shape[:2])
    t = Thresholds()
    grid = judge_grid(refs, counts, nonfinite, t)
    for i in range(counts.shape[0]):
        for j, ref in enumerate(refs):
            one = judge(ref, Observed(tuple(counts[i, j].tolist()), int(nonfinite[i, j])), t)
            cell = grid.verdict(i, j)
            assert (cell.status, cell.reason, cell.warn_at, cell.alarm_at) == (
                one.status, one.reason, one.warn_at, one.alarm_at,
            )  # fmt: skip
            if one.comparison is None:
                assert cell.comparison is None
            else:
                assert cell.comparison is not None
                assert cell.comparison.n == one.comparison.n
                # the same formula; einsum's summation order depends on the array's size
                assert cell.comparison.psi == pytest.approx(one.comparison.psi, rel=1e-12)
                assert cell.comparison.chi2_p == pytest.approx(one.comparison.chi2_p, rel=1e-9)
            assert grid.status[i, j] == one.status.severity


def test_the_fdr_step_on_grids_equals_the_step_on_verdict_lists() -> None:
    rng = np.random.default_rng(5)
    t = Thresholds()
    refs_a, refs_b = _refs(rng, 3, 10), _refs(rng, 2, 4)
    ca, cb = _grid(rng, refs_a, 40), _grid(rng, refs_b, 40)
    na = rng.choice([0, 0, 0, 30], size=ca.shape[:2])
    grids = apply_fdr([judge_grid(refs_a, ca, na, t), judge_grid(refs_b, cb, None, t)], t.fdr_q)
    cells = [grids[0].verdict(i, j) for i in range(40) for j in range(3)] + [
        grids[1].verdict(i, j) for i in range(40) for j in range(2)
    ]
    raw = [judge_grid(refs_a, ca, na, t), judge_grid(refs_b, cb, None, t)]
    listed = judge_family(
        [raw[0].verdict(i, j) for i in range(40) for j in range(3)]
        + [raw[1].verdict(i, j) for i in range(40) for j in range(2)],
        t.fdr_q,
    )
    assert [(v.status, v.fdr_passed) for v in cells] == [(v.status, v.fdr_passed) for v in listed]
    assert [v.reason for v in cells] == [v.reason for v in listed]
    flagged = sum(v.status in (Status.WARN, Status.ALARM) for v in cells)
    assert flagged > 0  # the data has drifted cells, some of them confirmed


def test_an_unconfirmed_psi_flag_is_ok_or_the_non_finite_warning() -> None:
    # One cell just past its thresholds (p ~ 0.005) among 2,000 cells without
    # drift: Benjamini-Hochberg does not confirm it.
    rng = np.random.default_rng(6)
    t = Thresholds(psi_warn=0.01, psi_alarm=0.25)
    ref = ReferenceHistogram("x", 0, (0.0,), (5000.0, 5000.0))
    counts = np.concatenate(
        [np.array([[[282, 218]]]), rng.multinomial(500, [0.5, 0.5], size=(2000, 1))]
    )
    for nonfinite, status, words in (
        (0, Status.OK, "not significant"),
        (20, Status.WARN, "not finite"),
    ):
        nf = np.zeros((2001, 1), dtype=np.int64)
        nf[0, 0] = nonfinite
        grid = judge_grid([ref], counts, nf, t)
        assert grid.rule[0, 0] == Rule.PSI_WARN
        (judged,) = apply_fdr([grid], t.fdr_q)
        v = judged.verdict(0, 0)
        assert v.fdr_passed is False and v.status is status and words in v.reason


def test_bad_grids_are_clear_errors() -> None:
    ref = ReferenceHistogram("speed", 0, (0.0,), (5.0, 5.0))
    with pytest.raises(AnalysisError, match="speed: 3 observed bins for a reference of 2"):
        judge_grid([ref], np.zeros((1, 1, 3), dtype=np.int64))
    with pytest.raises(AnalysisError, match="grid"):
        judge_grid([ref], np.zeros((1, 2)))
    with pytest.raises(AnalysisError, match="speed: counts must be non-negative"):
        judge_grid([ref], np.array([[[1, -1]]]))
    with pytest.raises(AnalysisError, match="whole numbers"):
        judge_grid([ref], np.array([[[1.5, 1.0]]]))
    with pytest.raises(AnalysisError, match="non-finite counts of shape"):
        judge_grid([ref], np.array([[[1, 1]]]), np.zeros(3))
    with pytest.raises(AnalysisError, match="family of 1"):
        from server.analysis.drift import bh_reject

        bh_reject([0.01, 0.02], 0.05, m=1)
