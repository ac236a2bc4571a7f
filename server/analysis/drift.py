"""Drift statistics from histograms: counts in, numbers out (pure; no I/O).

Flow: a reference (``ReferenceHistogram``: the bundle profile's edges and
reference counts) and observed counts on the same edges (``Observed``: what
devices send, summed over devices and windows: histograms on identical edges
add up) -> ``compare`` / ``compare_many`` give PSI, Jensen-Shannon distance,
binned KS and a chi-square p-value; ``grid_stats`` gives PSI and the
chi-square statistic of a whole (scopes, subjects, bins) grid at once ->
``server.analysis.judge`` turns them into verdicts with the effective
thresholds (``null_psi_quantile``) and the Benjamini-Hochberg step
(``bh_reject``).

Definitions (docs/drift.md writes them out):

* bin ``k`` of value ``v`` is ``searchsorted(edges, v, side="right")``;
  non-finite values are counted apart (``nonfinite``) and not binned;
* smoothed proportions, both sides: ``(count + 0.5) / (n + 0.5 * B)``;
* ``PSI = sum((a - e) * ln(a / e))`` over the B bins (a observed, e reference);
* Jensen-Shannon distance (base 2, in [0, 1]) and binned KS (largest gap of
  the cumulative proportions) on the raw proportions;
* chi-square: the 2 x B contingency test of reference against observed
  counts (bins empty on both sides dropped);
* effective thresholds: ``max(configured, q-quantile of PSI under no drift
  for this n)``, the null simulated from the reference's proportions with the
  reference's own sample size (seeded, so verdicts are reproducible).

Invariants: every function is deterministic and pure; mismatched bins raise
``AnalysisError`` naming the feature.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import special

from edgefleet.errors import EdgefleetError
from server.analysis.verdict import Thresholds

__all__ = [
    "AnalysisError",
    "Comparison",
    "GridStats",
    "Observed",
    "ReferenceHistogram",
    "add_histogram",
    "bh_reject",
    "chi2_pvalues",
    "compare",
    "compare_many",
    "grid_n",
    "grid_stats",
    "null_psi_quantile",
    "observed_of",
    "pool",
    "profile_references",
    "psi",
    "record_histograms",
    "references_from_profile",
    "shape_stats",
    "smoothed",
    "subject_of",
]

_NULL_DRAWS = 8000  # simulated no-drift windows behind each null quantile
_N_GRID = 48  # sample sizes per decade at which null quantiles are simulated


class AnalysisError(EdgefleetError, ValueError):
    """Counts and reference do not fit (bins, lengths, negative counts): names the problem."""


@dataclass(frozen=True)
class ReferenceHistogram:
    """One feature's (or the outputs') reference: its bin edges and reference counts.

    ``counts`` has ``len(edges) + 1`` entries; ``n`` is their sum.
    ``estimated`` says the counts came from proportions times an assumed size
    (profiles written before counts were recorded).
    """

    name: str
    index: int
    edges: tuple[float, ...]
    counts: tuple[float, ...]
    estimated: bool = False

    @property
    def bins(self) -> int:
        return len(self.counts)

    @property
    def n(self) -> float:
        return float(sum(self.counts))

    def proportions(self) -> np.ndarray:
        c = np.asarray(self.counts, dtype=np.float64)
        return c / c.sum()


@dataclass(frozen=True)
class Observed:
    """Observed counts on a reference's bins, plus the non-finite values counted apart."""

    counts: tuple[int, ...]
    nonfinite: int = 0

    @property
    def n(self) -> int:
        return int(sum(self.counts))


@dataclass(frozen=True)
class Comparison:
    """The statistics of one observed histogram against its reference."""

    n: int
    nonfinite: int
    psi: float
    js: float
    ks: float
    chi2_p: float


# ----------------------------------------------------------------- profiles


def references_from_profile(
    profile: Mapping[str, Any], thresholds: Thresholds | None = None
) -> list[ReferenceHistogram]:
    """The ``features`` of a ``drift_reference`` profile as reference histograms.

    Reads ``counts`` when the profile has them; an older profile with
    proportions only (``expected``) is taken as ``thresholds.reference_n``
    rows in those proportions, and marked ``estimated``.

    Raises:
        AnalysisError: an entry's edges, counts or proportions do not fit its bins.
    """
    t = thresholds or Thresholds()
    bins = int(profile.get("bins", 0))
    out = []
    for i, f in enumerate(profile.get("features", [])):
        name = str(f.get("name", f.get("index", i)))
        edges = tuple(float(e) for e in f["edges"])
        if len(edges) != bins - 1:
            raise AnalysisError(f"feature {name}: {len(edges)} edges for {bins} bins")
        if "counts" in f:
            counts = tuple(float(c) for c in f["counts"])
            estimated = False
        else:
            counts = tuple(float(p) * t.reference_n for p in f["expected"])
            estimated = True
        if len(counts) != bins or min(counts) < 0 or sum(counts) <= 0:
            raise AnalysisError(f"feature {name}: reference needs {bins} non-negative counts")
        out.append(ReferenceHistogram(name, int(f.get("index", i)), edges, counts, estimated))
    return out


SubjectKey = tuple[str, str, int]  # (kind: feature | channel | output, input, index)


def profile_references(
    profile: Mapping[str, Any], thresholds: Thresholds | None = None
) -> dict[SubjectKey, ReferenceHistogram]:
    """Every reference histogram of a profile: features, channels and classifier outputs.

    Keys are ``("feature", input, column)``, ``("channel", input, channel)`` and
    ``("output", "", output index)``; a channel is named ``input[channel]``,
    an output by its name. An output reference counts predicted classes
    (class scores: no edges) or, for any other output, its values over edges.

    Raises:
        AnalysisError: an entry does not fit its bins.
    """
    out: dict[SubjectKey, ReferenceHistogram] = {}
    bins = profile.get("bins", 0)
    features = list(profile.get("features", []))
    for f, ref in zip(features, references_from_profile(profile, thresholds), strict=True):
        out[("feature", str(f["input"]), int(f["index"]))] = ref
    for c in profile.get("channels", []):
        entry = {**c, "index": c["channel"], "name": f"{c['input']}[{c['channel']}]"}
        (ref,) = references_from_profile({"bins": bins, "features": [entry]}, thresholds)
        out[("channel", str(c["input"]), int(c["channel"]))] = ref
    for o in profile.get("outputs", []):
        counts = tuple(float(x) for x in o["counts"])
        edges = tuple(float(e) for e in o.get("edges") or ())
        if len(counts) < 2 or min(counts) < 0 or sum(counts) <= 0:
            raise AnalysisError(f"output {o.get('name')}: reference needs non-negative counts")
        if edges and len(edges) != len(counts) - 1:
            raise AnalysisError(
                f"output {o.get('name')}: {len(edges)} edges for {len(counts)} bins"
            )
        out[("output", "", int(o["index"]))] = ReferenceHistogram(
            str(o["name"]), int(o["index"]), edges, counts
        )
    return out


def record_histograms(record: Mapping[str, Any]) -> list[tuple[SubjectKey, list[int], int]]:
    """The histograms one telemetry record carries, keyed like ``profile_references``.

    Features and channels give their counts over the reference's edges and
    their non-finite values; each classifier output its predicted-class
    counts, any other profiled output its value counts over the edges.
    """
    out: list[tuple[SubjectKey, list[int], int]] = []
    for f in record.get("features") or []:
        key = ("feature", str(f.get("input")), int(f.get("index", -1)))
        out.append((key, list(f.get("counts") or []), int(f.get("nonfinite", 0))))
    for c in record.get("channels") or []:
        key = ("channel", str(c.get("input")), int(c.get("channel", -1)))
        out.append((key, list(c.get("counts") or []), int(c.get("nonfinite", 0))))
    for o in record.get("outputs") or []:
        counts = o.get("classes") or o.get("counts")
        if counts:
            out.append((("output", "", int(o.get("index", -1))), list(counts), 0))
    return out


def add_histogram(
    sums: dict[Any, list[int]], key: Any, counts: Sequence[int], nonfinite: int
) -> None:
    """Add one histogram into the running sum at ``key`` (the last slot: non-finite values)."""
    acc = sums.get(key)
    if acc is None:
        acc = sums[key] = [0] * (len(counts) + 1)
    for i, c in enumerate(counts):
        acc[i] += int(c)
    acc[-1] += int(nonfinite)


def observed_of(acc: Sequence[int]) -> Observed:
    """The ``Observed`` of a running sum made by ``add_histogram``."""
    return Observed(tuple(acc[:-1]), acc[-1])


def subject_of(key: SubjectKey, ref: ReferenceHistogram) -> str:
    """The alert subject of a key: ``feature:NAME``, ``channel:x[0]`` or ``output:NAME``."""
    return f"{key[0]}:{ref.name}"


# -------------------------------------------------------------- statistics


def smoothed(counts: Sequence[float] | np.ndarray) -> np.ndarray:
    """``(count + 0.5) / (n + 0.5 * B)`` per bin (along the last axis)."""
    c = np.asarray(counts, dtype=np.float64)
    bins = c.shape[-1]
    return (c + 0.5) / (c.sum(axis=-1, keepdims=True) + 0.5 * bins)


def psi(reference: Sequence[float] | np.ndarray, observed: Sequence[float] | np.ndarray) -> float:
    """Population stability index of ``observed`` counts against ``reference`` counts.

    The documented formula, written out; ``grid_stats`` computes the same
    value for many histograms at once.
    """
    e = smoothed(reference)
    a = smoothed(observed)
    return float(np.sum((a - e) * np.log(a / e)))


def _psi_rows(reference: np.ndarray, observed: np.ndarray) -> np.ndarray:
    e = smoothed(reference)
    a = smoothed(observed)
    return np.asarray(np.sum((a - e) * np.log(a / e), axis=-1))


_LN_HALF = np.log(np.arange(1 << 16) + 0.5)  # ln(k + 0.5) of small counts: a lookup, not a log


def _ln_half(counts: np.ndarray) -> np.ndarray:
    """``ln(count + 0.5)`` of non-negative integer counts (a table lookup below 65,536)."""
    if counts.size and int(counts.max()) < _LN_HALF.size:
        return np.take(_LN_HALF, counts)
    return np.log(counts + 0.5)


@dataclass(frozen=True)
class GridStats:
    """PSI and Pearson's statistic of every cell of a (scopes, subjects, bins) grid.

    Arrays of shape (S, F): ``n`` finite observations, ``psi``, ``chi2`` (the
    2 x B contingency statistic against the subject's reference), ``dof``
    (bins not empty on both sides, minus one).
    """

    n: np.ndarray
    psi: np.ndarray
    chi2: np.ndarray
    dof: np.ndarray


def grid_stats(reference: np.ndarray, counts: np.ndarray) -> GridStats:
    """PSI and the chi-square statistic of ``counts`` (S, F, B) against ``reference`` (F, B).

    Whole-array numpy, a few passes over the counts (docs/drift.md):

    * ``PSI = sum((a - e) * (ln(c + 0.5) - ln e))``: the smoothed proportions
      ``a = (c + 0.5) / S`` and ``e`` both sum to 1, so the ``-ln S`` part of
      ``ln a`` cancels, and ``ln(c + 0.5)`` of an integer count is a lookup;
    * Pearson's statistic of the 2 x B table with totals R (reference), O
      (observed), N = R + O and column sums u = r + o, by the identity
      ``chi2 = (N^2 * sum(r^2 / u) - N * R^2) / (R * O)`` (columns with
      u = 0 dropped), the value ``scipy.stats.chi2_contingency(...,
      correction=False)`` gives.

    ``counts`` must be non-negative integers (the caller checks).
    """
    r = np.asarray(reference, dtype=np.float64)
    c = np.asarray(counts)
    bins = c.shape[-1]
    ones = np.ones(bins)
    n = np.einsum("sfb->sf", c)
    # One array of the grid's size, reused in place: fresh large arrays cost
    # page faults that would be a good part of the time.
    e = smoothed(r)
    x = _ln_half(c)
    x -= np.log(e)
    # sum((a - e) * x) with a = (c + 0.5) / (n + 0.5 B), without materializing a
    sum_ax = (np.einsum("sfb,sfb->sf", c, x) + 0.5 * (x @ ones)) / (n + 0.5 * bins)
    psi_values = sum_ax - np.einsum("sfb,fb->sf", x, e)
    total_r = r.sum(axis=-1)
    u = np.add(c, r, out=x)  # column sums of each 2 x B table
    if (r == 0).any():
        nonempty = u > 0
        w = np.divide(r * r, u, out=np.zeros_like(u), where=nonempty)
        dof = nonempty.sum(axis=-1) - 1
    else:
        w = np.divide(r * r, u, out=u)
        dof = np.full(n.shape, bins - 1)
    big_n = total_r + n
    with np.errstate(divide="ignore", invalid="ignore"):
        stat = (big_n * big_n * (w @ ones) - big_n * total_r * total_r) / (total_r * n)
    stat = np.where(n > 0, np.maximum(stat, 0.0), 0.0)
    return GridStats(n.astype(np.int64), psi_values, stat, dof)


def chi2_pvalues(stat: np.ndarray, dof: np.ndarray) -> np.ndarray:
    """The chi-square upper tail of ``stat`` at ``dof`` (1.0 where dof < 1: nothing to test)."""
    # scipy.special.chdtrc is what scipy.stats.chi2.sf evaluates, without its per-call set-up
    return np.where(dof >= 1, special.chdtrc(np.maximum(dof, 1), stat), 1.0)


def shape_stats(reference: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Jensen-Shannon distance (base 2, scipy's definition) and binned KS, per cell.

    Both on the raw (unsmoothed) proportions; shapes as ``grid_stats``.
    """
    r = np.asarray(reference, dtype=np.float64)
    o = np.asarray(counts, dtype=np.float64)
    n = o.sum(axis=-1, keepdims=True)
    p_ref = r / r.sum(axis=-1, keepdims=True)
    p_obs = o / np.where(n > 0, n, 1.0)
    mid = (p_ref + p_obs) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        left = np.where(p_ref > 0, p_ref * np.log(p_ref / mid), 0.0).sum(axis=-1)
        right = np.where(p_obs > 0, p_obs * np.log(p_obs / mid), 0.0).sum(axis=-1)
    js = np.sqrt(np.maximum((left + right) / np.log(2) / 2, 0.0))
    ks = np.max(np.abs(np.cumsum(p_ref, axis=-1) - np.cumsum(p_obs, axis=-1)), axis=-1)
    return js, ks


def _check(ref: ReferenceHistogram, obs: Observed) -> None:
    if len(obs.counts) != ref.bins:
        raise AnalysisError(
            f"feature {ref.name}: {len(obs.counts)} observed bins for a reference of "
            f"{ref.bins} (the counts were made on other edges)"
        )
    if min(obs.counts, default=0) < 0 or obs.nonfinite < 0:
        raise AnalysisError(f"feature {ref.name}: counts must be non-negative")


def compare(ref: ReferenceHistogram, obs: Observed) -> Comparison | None:
    """PSI, JS distance, binned KS and chi-square p of ``obs`` against ``ref``.

    Returns None when no finite value was observed.

    Raises:
        AnalysisError: the observed counts are not on the reference's bins.
    """
    _check(ref, obs)
    return compare_many(ref, [obs])[0]


def compare_many(ref: ReferenceHistogram, observed: Sequence[Observed]) -> list[Comparison | None]:
    """``compare`` for many histograms on one reference (``grid_stats`` and ``shape_stats``).

    Raises:
        AnalysisError: a histogram is not on the reference's bins.
    """
    for obs in observed:
        _check(ref, obs)
    if not observed:
        return []
    r = np.asarray([ref.counts], dtype=np.float64)  # (1, B)
    o = np.asarray([[obs.counts] for obs in observed], dtype=np.int64)  # (K, 1, B)
    g = grid_stats(r, o)
    js, ks = shape_stats(r, o)
    p = chi2_pvalues(g.chi2, g.dof)
    out: list[Comparison | None] = []
    for k, obs in enumerate(observed):
        n = int(g.n[k, 0])
        out.append(
            None
            if n == 0
            else Comparison(n, obs.nonfinite, float(g.psi[k, 0]), float(js[k, 0]),
                            float(ks[k, 0]), float(p[k, 0]))
        )  # fmt: skip
    return out


# --------------------------------------------------------------- thresholds


def grid_n(n: int) -> int:
    """The largest grid sample size <= n (null quantiles are simulated on a grid)."""
    if n <= 64:
        return max(1, n)
    step = math.floor(math.log10(n) * _N_GRID) / _N_GRID
    return max(64, math.floor(10**step))


@functools.lru_cache(maxsize=8192)
def _null_quantile(key: tuple[float, ...], m: int, n: int, q: float) -> float:
    p = np.asarray(key, dtype=np.float64)
    p = p / p.sum()
    rng = np.random.default_rng(20261203)
    obs = rng.multinomial(n, p, size=_NULL_DRAWS)
    ref = rng.multinomial(m, p, size=_NULL_DRAWS)
    return float(np.quantile(_psi_rows(ref, obs), q))


def null_psi_quantile(ref: ReferenceHistogram, n: int, q: float = 0.99) -> float:
    """The ``q`` quantile of PSI between two samples of one distribution (no drift).

    One side has ``n`` rows, the other the reference's own size, both drawn
    from the reference's proportions (8,000 seeded draws, so the result is
    reproducible). ``n`` is taken down to a grid of 48 sizes per decade:
    a smaller n gives a larger quantile, so the threshold errs on the quiet side.
    """
    if n <= 0:
        return math.inf
    key, m = _null_key(ref.counts)
    return _null_quantile(key, m, grid_n(n), q)


@functools.lru_cache(maxsize=4096)
def _null_key(counts: tuple[float, ...]) -> tuple[tuple[float, ...], int]:
    """The cache key of a reference's null quantiles: its proportions and size (computed once)."""
    total = sum(counts)
    return tuple(round(c / total, 12) for c in counts), max(1, round(total))


def bh_reject(pvalues: Sequence[float] | np.ndarray, q: float, m: int | None = None) -> np.ndarray:
    """Benjamini-Hochberg: which hypotheses are rejected at false discovery rate ``q``.

    ``m`` is the size of the family when ``pvalues`` holds only some of its
    members: BH never rejects a p-value above ``q``, so a caller may pass only
    those at or below it (and the count of all).
    """
    p = np.asarray(pvalues, dtype=np.float64)
    m = p.size if m is None else m
    if p.size == 0:
        return np.zeros(0, dtype=bool)
    if m < p.size:
        raise AnalysisError(f"a family of {m} cannot hold {p.size} p-values")
    order = np.argsort(p, kind="stable")
    ranked = p[order]
    below = ranked <= q * np.arange(1, p.size + 1) / m
    reject = np.zeros(m, dtype=bool)
    if below.any():
        last = int(np.flatnonzero(below)[-1])
        reject[order[: last + 1]] = True
    return reject


# ------------------------------------------------------------------ roll-ups


def pool(observations: Sequence[Observed]) -> Observed:
    """Sum histograms on identical edges (fleet, group, device-class and time roll-ups).

    Raises:
        AnalysisError: the histograms have different numbers of bins.
    """
    if not observations:
        raise AnalysisError("nothing to pool")
    bins = {len(o.counts) for o in observations}
    if len(bins) != 1:
        raise AnalysisError(f"histograms with different bin counts cannot be pooled: {bins}")
    counts = np.asarray([o.counts for o in observations], dtype=np.int64).sum(axis=0)
    return Observed(tuple(int(c) for c in counts.tolist()), sum(o.nonfinite for o in observations))
