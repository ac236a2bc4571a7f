"""The drift core against its formulas, its edge cases, and a simulation of its thresholds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.spatial import distance

from edgefleet.errors import ConfigError
from server.analysis.drift import (
    AnalysisError,
    Observed,
    ReferenceHistogram,
    bh_reject,
    compare,
    null_psi_quantile,
    pool,
    psi,
    references_from_profile,
    smoothed,
)
from server.analysis.judge import judge, judge_family
from server.analysis.verdict import Status, Thresholds, worst

BINS = 10


def reference_of(sample: np.ndarray, name: str = "f", index: int = 0) -> ReferenceHistogram:
    """What ``edgefleet compress`` profiles: equal-frequency edges and the counts on them."""
    edges = np.quantile(sample, np.arange(1, BINS) / BINS)
    counts = np.bincount(np.searchsorted(edges, sample, side="right"), minlength=BINS)
    return ReferenceHistogram(name, index, tuple(edges), tuple(float(c) for c in counts))


def observe(ref: ReferenceHistogram, values: np.ndarray) -> Observed:
    finite = values[np.isfinite(values)]
    idx = np.searchsorted(np.asarray(ref.edges), finite, side="right")
    counts = np.bincount(idx, minlength=ref.bins)
    return Observed(tuple(int(c) for c in counts), int(values.size - finite.size))


def test_psi_is_the_documented_formula() -> None:
    ref = [30, 20, 50]
    obs = [10, 40, 50]
    e = [(c + 0.5) / (100 + 1.5) for c in ref]
    a = [(c + 0.5) / (100 + 1.5) for c in obs]
    expected = sum((x - y) * math.log(x / y) for x, y in zip(a, e, strict=True))
    assert psi(ref, obs) == pytest.approx(expected, rel=1e-12)
    assert smoothed(obs).tolist() == pytest.approx(a)
    assert psi(ref, ref) == 0.0


def test_statistics_match_scipy() -> None:
    r = ReferenceHistogram("f", 0, tuple(range(4)), (10.0, 20.0, 30.0, 25.0, 15.0))
    o = Observed((5, 25, 35, 20, 15))
    c = compare(r, o)
    assert c is not None and c.n == 100
    p, q = np.array(r.counts) / 100, np.array(o.counts) / 100
    assert c.js == pytest.approx(distance.jensenshannon(p, q, base=2))
    assert c.ks == pytest.approx(np.max(np.abs(np.cumsum(p) - np.cumsum(q))))
    table = np.array([r.counts, o.counts])
    assert c.chi2_p == pytest.approx(stats.chi2_contingency(table, correction=False).pvalue)


def test_empty_bins_on_either_side_give_finite_statistics() -> None:
    r = ReferenceHistogram("f", 0, (0.0, 1.0, 2.0), (0.0, 50.0, 50.0, 0.0))
    c = compare(r, Observed((0, 10, 0, 90)))
    assert c is not None
    assert all(math.isfinite(x) for x in (c.psi, c.js, c.ks, c.chi2_p))
    assert c.psi > 1 and c.chi2_p < 1e-6


def test_all_in_one_bin() -> None:
    r = ReferenceHistogram("f", 0, (0.0, 1.0), (700.0, 0.0, 0.0))
    same = compare(r, Observed((700, 0, 0)))
    assert same is not None and (same.js, same.ks, same.chi2_p) == (0.0, 0.0, 1.0)
    assert same.psi == pytest.approx(0.0, abs=1e-12)  # rounding of the one-pass formula
    other_n = compare(r, Observed((100, 0, 0)))  # the smoothing depends on n: small, not 0
    assert other_n is not None and 0 < other_n.psi < 0.02 and other_n.chi2_p == 1.0
    uniform = reference_of(np.random.default_rng(0).normal(size=5000))
    v = judge(uniform, Observed((1000,) + (0,) * 9))
    assert v.status is Status.ALARM and v.comparison is not None and v.comparison.psi > 2


def test_non_finite_values_are_counted_apart_and_warn() -> None:
    ref = reference_of(np.random.default_rng(1).normal(size=5000))
    values = np.random.default_rng(2).normal(size=2000)
    values[:40] = np.nan
    values[40:50] = np.inf
    obs = observe(ref, values)
    assert obs.n == 1950 and obs.nonfinite == 50
    v = judge(ref, obs)
    assert v.comparison is not None and v.comparison.n == 1950 and v.comparison.nonfinite == 50
    assert v.status is Status.WARN and "not finite" in v.reason
    assert judge(ref, observe(ref, values[40:])).status is Status.OK  # 10 of 1960: under 1%


def test_mismatched_bins_are_a_clear_error() -> None:
    ref = reference_of(np.random.default_rng(1).normal(size=1000), name="amount")
    with pytest.raises(AnalysisError, match="amount: 9 observed bins for a reference of 10"):
        compare(ref, Observed((1,) * 9))
    with pytest.raises(AnalysisError, match="non-negative"):
        compare(ref, Observed((-1,) + (1,) * 9))
    with pytest.raises(AnalysisError, match="different bin counts"):
        pool([Observed((1, 2)), Observed((1, 2, 3))])
    with pytest.raises(AnalysisError, match="edges for 10 bins"):
        references_from_profile({"bins": 10, "features": [{"name": "a", "edges": [0.0]}]})


def test_few_observations_are_insufficient_never_an_alarm() -> None:
    ref = reference_of(np.random.default_rng(1).normal(size=5000))
    v = judge(ref, Observed((499,) + (0,) * 9))
    assert v.status is Status.INSUFFICIENT and "min_n=500" in v.reason
    assert judge(ref, Observed((0,) * 10)).status is Status.INSUFFICIENT
    assert worst([Status.INSUFFICIENT, Status.OK, Status.WARN]) is Status.WARN


def test_pooling_sums_counts() -> None:
    pooled = pool([Observed((1, 2, 3), 1), Observed((4, 5, 6), 2)])
    assert pooled == Observed((5, 7, 9), 3)


def test_profiles_with_counts_and_older_ones_with_proportions() -> None:
    profile = {
        "bins": 3,
        "features": [
            {"input": "x", "index": 0, "name": "a", "edges": [0.0, 1.0],
             "expected": [0.2, 0.3, 0.5], "counts": [20, 30, 50], "n": 100},
            {"input": "x", "index": 1, "name": "b", "edges": [0.0, 1.0],
             "expected": [0.2, 0.3, 0.5]},
        ],
    }  # fmt: skip
    a, b = references_from_profile(profile, Thresholds(reference_n=1000))
    assert (a.counts, a.estimated, a.n) == ((20.0, 30.0, 50.0), False, 100.0)
    assert b.counts == pytest.approx((200.0, 300.0, 500.0)) and b.estimated


def test_thresholds_are_bounded() -> None:
    for bad in ({"psi_warn": 0.3, "psi_alarm": 0.2}, {"min_n": 0}, {"fdr_q": 1.0},
                {"null_quantile": 1.0}, {"reference_n": 1}):  # fmt: skip
        with pytest.raises(ConfigError):
            Thresholds(**bad)  # type: ignore[arg-type]


def test_benjamini_hochberg() -> None:
    p = [0.01, 0.04, 0.03, 0.005, 0.5]
    # sorted 0.005, 0.01, 0.03, 0.04, 0.5 against q*k/m = 0.01, 0.02, 0.03, 0.04, 0.05
    assert bh_reject(p, 0.05).tolist() == [True, True, True, True, False]
    assert bh_reject([0.02, 0.5], 0.05).tolist() == [True, False]  # 0.02 <= 0.05 * 1/2
    assert bh_reject([0.03, 0.5], 0.05).tolist() == [False, False]
    assert bh_reject([], 0.05).tolist() == []


def test_a_psi_alarm_without_a_significant_test_is_not_called_drifted() -> None:
    from server.analysis.drift import Comparison
    from server.analysis.judge import FeatureVerdict

    def verdict(index: int, status: Status, p: float) -> FeatureVerdict:
        c = Comparison(1000, 0, 0.3 if status is not Status.OK else 0.01, 0.1, 0.1, p)
        reason = "PSI 0.300 >= 0.250" if status is not Status.OK else "PSI 0.010 < 0.100"
        return FeatureVerdict(f"f{index}", index, c, 0.1, 0.25, status, reason)

    # one alarm with p = 0.004 among 20 features: BH needs p <= 0.05 * 1/20 = 0.0025
    family = [verdict(0, Status.ALARM, 0.004)] + [verdict(i, Status.OK, 0.6) for i in range(1, 20)]
    judged = judge_family(family, 0.05)
    assert judged[0].status is Status.OK and judged[0].fdr_passed is False
    assert "not significant" in judged[0].reason
    family[0] = verdict(0, Status.ALARM, 0.001)
    judged = judge_family(family, 0.05)
    assert judged[0].status is Status.ALARM and judged[0].fdr_passed is True
    assert all(v.status is Status.OK and v.fdr_passed is False for v in judged[1:])
    insufficient = FeatureVerdict("x", 0, None, 0.1, 0.25, Status.INSUFFICIENT, "0 observations")
    assert judge_family([insufficient]) == [insufficient]


# ------------------------------------------------------- the thresholds, simulated

WINDOWS = 1000


@pytest.fixture(scope="module")
def references() -> list[ReferenceHistogram]:
    rng = np.random.default_rng(11)
    return [reference_of(rng.normal(size=5000), name=f"f{i}", index=i) for i in range(5)]


@pytest.mark.parametrize("n", [200, 500, 5000])
def test_false_alarms_under_no_drift_are_at_most_one_percent(references, n) -> None:
    """Windows drawn from the reference itself: warn or alarm in <= 1% of feature-windows."""
    rng = np.random.default_rng(n)
    t = Thresholds(min_n=min(n, 500))
    flagged = judged = 0
    for _ in range(WINDOWS // 5):
        verdicts = [
            judge(r, Observed(tuple(rng.multinomial(n, r.proportions()).tolist())), t)
            for r in references
        ]
        for v in judge_family(verdicts, t.fdr_q):
            judged += 1
            flagged += v.status in (Status.WARN, Status.ALARM)
    assert judged == WINDOWS and flagged / judged <= 0.01, flagged


@pytest.mark.parametrize("n", [500, 5000])
def test_false_alarms_on_fresh_data_of_the_reference_population(references, n) -> None:
    """Windows of new N(0, 1) samples (the population the reference was profiled from).

    Harder than sampling the reference's own proportions: the reference's
    sampling error is a fixed bias here. (Below the default ``min_n`` of 500
    the verdict is ``insufficient``.)
    """
    rng = np.random.default_rng(100 + n)
    t = Thresholds()
    flagged = 0
    for _ in range(WINDOWS // 5):
        verdicts = [judge(r, observe(r, rng.normal(size=n)), t) for r in references]
        flagged += sum(v.status in (Status.WARN, Status.ALARM) for v in judge_family(verdicts))
    assert flagged / WINDOWS <= 0.01, flagged


@pytest.mark.parametrize(
    ("shift", "wanted"), [(0.5, (Status.WARN, Status.ALARM)), (1.0, (Status.ALARM,))]
)
def test_a_shift_of_one_feature_is_flagged_and_the_others_stay_quiet(
    references, shift, wanted
) -> None:
    rng = np.random.default_rng(int(shift * 10))
    n, hits, noise = 500, 0, 0
    for _ in range(WINDOWS // 5):
        verdicts = [
            judge(r, observe(r, rng.normal(shift if r.index == 2 else 0.0, 1, size=n)))
            for r in references
        ]
        family = judge_family(verdicts)
        hits += family[2].status in wanted
        noise += sum(v.status in (Status.WARN, Status.ALARM) for v in family if v.index != 2)
    assert hits / (WINDOWS // 5) >= 0.99, hits
    assert noise / (4 * WINDOWS // 5) <= 0.01, noise


def test_the_null_quantile_shrinks_with_n_and_is_reproducible(references) -> None:
    r = references[0]
    q = [null_psi_quantile(r, n) for n in (200, 500, 5000, 50_000)]
    assert q == sorted(q, reverse=True) and q[-1] < 0.01
    assert null_psi_quantile(r, 500) == q[1]
    # Roughly (1/n + 1/m) * the chi-square(B - 1) 99th percentile, for large n and m.
    approx = (1 / 5000 + 1 / r.n) * stats.chi2.ppf(0.99, BINS - 1)
    assert q[2] == pytest.approx(approx, rel=0.25)
