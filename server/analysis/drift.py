"""Drift statistics from histograms: counts in, numbers and a verdict out (pure; no I/O).

Flow: a reference (``ReferenceHistogram``: the bundle profile's edges and
reference counts) and observed counts on the same edges (``Observed``: what
devices send, summed over devices and windows: histograms on identical edges
add up) -> ``compare`` gives PSI, Jensen-Shannon distance, binned KS and a
chi-square p-value -> ``judge`` turns them into a ``Status`` with the
effective thresholds for this sample size -> ``judge_family`` applies the
Benjamini-Hochberg step across every (device, feature) judged together, so
that a drifted verdict also needs a significant chi-square test.

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

Invariants: every function is deterministic and pure; ``n < min_n`` is
``insufficient``, never an alarm; mismatched bins raise ``AnalysisError``
naming the feature.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from edgefleet.errors import EdgefleetError
from server.analysis.verdict import Status, Thresholds

__all__ = [
    "AnalysisError",
    "Comparison",
    "FeatureVerdict",
    "Observed",
    "ReferenceHistogram",
    "add_histogram",
    "bh_reject",
    "compare",
    "compare_many",
    "judge",
    "judge_family",
    "judge_many",
    "null_psi_quantile",
    "observed_of",
    "outliers",
    "pool",
    "profile_references",
    "psi",
    "record_histograms",
    "references_from_profile",
    "smoothed",
    "subject_of",
]

NONFINITE_WARN_SHARE = 0.01  # a share of non-finite values that is worth a warning
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


@dataclass(frozen=True)
class FeatureVerdict:
    """A judged comparison: statistics, the thresholds that applied, and the status."""

    name: str
    index: int
    comparison: Comparison | None  # None when nothing was observed
    warn_at: float
    alarm_at: float
    status: Status
    reason: str
    fdr_passed: bool | None = None  # set by judge_family

    def to_dict(self) -> dict[str, Any]:
        c = self.comparison
        return {
            "name": self.name,
            "index": self.index,
            "n": 0 if c is None else c.n,
            "nonfinite": 0 if c is None else c.nonfinite,
            "psi": None if c is None else _round(c.psi),
            "js": None if c is None else _round(c.js),
            "ks": None if c is None else _round(c.ks),
            "chi2_p": None if c is None else float(f"{c.chi2_p:.6g}"),
            "warn_at": _round(self.warn_at),
            "alarm_at": _round(self.alarm_at),
            "status": self.status.value,
            "reason": self.reason,
            "fdr_passed": self.fdr_passed,
        }


def _round(x: float) -> float:
    return float(round(x, 6))


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
    an output by its name. Output references count predicted classes, so
    they have no edges.

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
        if len(counts) < 2 or min(counts) < 0 or sum(counts) <= 0:
            raise AnalysisError(f"output {o.get('name')}: reference needs non-negative counts")
        out[("output", "", int(o["index"]))] = ReferenceHistogram(
            str(o["name"]), int(o["index"]), (), counts
        )
    return out


def record_histograms(record: Mapping[str, Any]) -> list[tuple[SubjectKey, list[int], int]]:
    """The histograms one telemetry record carries, keyed like ``profile_references``.

    Features and channels give their counts over the reference's edges and
    their non-finite values; each classifier output its predicted-class counts.
    """
    out: list[tuple[SubjectKey, list[int], int]] = []
    for f in record.get("features") or []:
        key = ("feature", str(f.get("input")), int(f.get("index", -1)))
        out.append((key, list(f.get("counts") or []), int(f.get("nonfinite", 0))))
    for c in record.get("channels") or []:
        key = ("channel", str(c.get("input")), int(c.get("channel", -1)))
        out.append((key, list(c.get("counts") or []), int(c.get("nonfinite", 0))))
    for o in record.get("outputs") or []:
        if o.get("classes"):
            out.append((("output", "", int(o.get("index", -1))), list(o["classes"]), 0))
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
    """Population stability index of ``observed`` counts against ``reference`` counts."""
    e = smoothed(reference)
    a = smoothed(observed)
    return float(np.sum((a - e) * np.log(a / e)))


def _psi_rows(reference: np.ndarray, observed: np.ndarray) -> np.ndarray:
    e = smoothed(reference)
    a = smoothed(observed)
    return np.asarray(np.sum((a - e) * np.log(a / e), axis=-1))


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
    """``compare`` for many histograms on one reference, vectorized (one pass of numpy each).

    The chi-square test is the 2 x B contingency statistic computed directly
    (what ``scipy.stats.chi2_contingency(..., correction=False)`` computes),
    its p-value ``scipy.stats.chi2.sf``; the JS distance is scipy's
    definition (base 2) on whole arrays.

    Raises:
        AnalysisError: a histogram is not on the reference's bins.
    """
    for obs in observed:
        _check(ref, obs)
    if not observed:
        return []
    r = np.asarray(ref.counts, dtype=np.float64)  # (B,)
    o = np.asarray([obs.counts for obs in observed], dtype=np.float64)  # (K, B)
    n = o.sum(axis=1)
    has = n > 0
    safe_n = np.where(has, n, 1.0)
    p_ref = r / r.sum()
    p_obs = o / safe_n[:, None]
    psi_values = _psi_rows(r, o)
    mid = (p_ref + p_obs) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        left = np.where(p_ref > 0, p_ref * np.log(p_ref / mid), 0.0).sum(axis=1)
        right = np.where(p_obs > 0, p_obs * np.log(p_obs / mid), 0.0).sum(axis=1)
    js = np.sqrt(np.maximum((left + right) / np.log(2) / 2, 0.0))
    ks = np.max(np.abs(np.cumsum(p_ref) - np.cumsum(p_obs, axis=1)), axis=1)
    col = r + o  # (K, B) column totals of each 2 x B table
    keep = col > 0
    total = r.sum() + n
    with np.errstate(divide="ignore", invalid="ignore"):
        e_ref = np.where(keep, r.sum() * col / total[:, None], 1.0)
        e_obs = np.where(keep, n[:, None] * col / total[:, None], 1.0)
        stat = np.where(keep, (r - e_ref) ** 2 / e_ref + (o - e_obs) ** 2 / e_obs, 0.0).sum(axis=1)
    dof = keep.sum(axis=1) - 1
    chi2_p = np.where(dof >= 1, stats.chi2.sf(stat, np.maximum(dof, 1)), 1.0)
    out: list[Comparison | None] = []
    for k, obs in enumerate(observed):
        if not has[k]:
            out.append(None)
            continue
        out.append(
            Comparison(
                int(n[k]), obs.nonfinite, float(psi_values[k]), float(js[k]), float(ks[k]),
                float(chi2_p[k]),
            )
        )  # fmt: skip
    return out


# --------------------------------------------------------------- thresholds


def _grid_n(n: int) -> int:
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
    return _null_quantile(key, m, _grid_n(n), q)


@functools.lru_cache(maxsize=4096)
def _null_key(counts: tuple[float, ...]) -> tuple[tuple[float, ...], int]:
    """The cache key of a reference's null quantiles: its proportions and size (computed once)."""
    total = sum(counts)
    return tuple(round(c / total, 12) for c in counts), max(1, round(total))


def judge(
    ref: ReferenceHistogram, obs: Observed, thresholds: Thresholds | None = None
) -> FeatureVerdict:
    """One feature's verdict: ``insufficient`` below ``min_n``, else by effective thresholds.

    A share of non-finite values of at least 1% is at least a warning (a
    broken sensor often sends NaN, which PSI over the finite values misses).
    """
    return judge_many(ref, [obs], thresholds)[0]


def judge_many(
    ref: ReferenceHistogram, observed: Sequence[Observed], thresholds: Thresholds | None = None
) -> list[FeatureVerdict]:
    """``judge`` for many histograms on one reference (devices, windows), vectorized."""
    t = thresholds or Thresholds()
    out = []
    floors: dict[int, float] = {}  # null quantile per sample size, looked up once each
    for comparison in compare_many(ref, observed):
        n = 0 if comparison is None else comparison.n
        if comparison is None or n < t.min_n:
            out.append(FeatureVerdict(
                ref.name, ref.index, comparison, t.psi_warn, t.psi_alarm, Status.INSUFFICIENT,
                f"{n} observations, fewer than min_n={t.min_n}",
            ))  # fmt: skip
            continue
        floor = floors.get(n)
        if floor is None:
            floor = floors[n] = null_psi_quantile(ref, n, t.null_quantile)
        warn_at, alarm_at = max(t.psi_warn, floor), max(t.psi_alarm, floor)
        value = comparison.psi
        share = comparison.nonfinite / (n + comparison.nonfinite)
        if value >= alarm_at:
            status, reason = Status.ALARM, f"PSI {value:.3f} >= {alarm_at:.3f}"
        elif value >= warn_at:
            status, reason = Status.WARN, f"PSI {value:.3f} >= {warn_at:.3f}"
        elif share >= NONFINITE_WARN_SHARE:
            status, reason = Status.WARN, f"{share:.1%} of the values are not finite"
        else:
            status, reason = Status.OK, f"PSI {value:.3f} < {warn_at:.3f}"
        out.append(
            FeatureVerdict(ref.name, ref.index, comparison, warn_at, alarm_at, status, reason)
        )
    return out


def bh_reject(pvalues: Sequence[float] | np.ndarray, q: float) -> np.ndarray:
    """Benjamini-Hochberg: which hypotheses are rejected at false discovery rate ``q``."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = p.size
    if m == 0:
        return np.zeros(0, dtype=bool)
    order = np.argsort(p, kind="stable")
    ranked = p[order]
    below = ranked <= q * np.arange(1, m + 1) / m
    reject = np.zeros(m, dtype=bool)
    if below.any():
        last = int(np.flatnonzero(below)[-1])
        reject[order[: last + 1]] = True
    return reject


def judge_family(verdicts: Sequence[FeatureVerdict], q: float = 0.05) -> list[FeatureVerdict]:
    """Apply the Benjamini-Hochberg step across verdicts judged together.

    Every judged verdict takes part (the family is every feature of every
    device in one evaluation; ``insufficient`` ones do not); a ``warn`` or
    ``alarm`` whose chi-square
    test is not among the discoveries becomes ``ok``, saying why. The
    non-finite-share warning does not depend on the test.
    """
    judged = [
        i
        for i, v in enumerate(verdicts)
        if v.comparison is not None and v.status is not Status.INSUFFICIENT
    ]
    reject = bh_reject([verdicts[i].comparison.chi2_p for i in judged], q)  # type: ignore[union-attr]
    out = list(verdicts)
    flagged = (Status.WARN, Status.ALARM)
    for i, rejected in zip(judged, reject.tolist(), strict=True):
        v = out[i]
        status, reason = v.status, v.reason
        if not rejected and status in flagged and reason.startswith("PSI"):
            status = Status.OK
            reason = f"{reason}, but the chi-square test is not significant at FDR q={q}"
        # constructed directly: dataclasses.replace costs several times more per cell
        out[i] = FeatureVerdict(
            v.name, v.index, v.comparison, v.warn_at, v.alarm_at, status, reason, bool(rejected)
        )
    return out


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


def outliers(
    ref: ReferenceHistogram,
    per_device: Mapping[str, Observed],
    thresholds: Thresholds | None = None,
) -> dict[str, FeatureVerdict]:
    """Each device's histogram against the fleet's typical one (one broken sensor).

    A population shift moves every device, and the typical histogram with
    it; a device whose distribution differs from the others' is an outlier.
    The typical histogram is the bin-wise median of the judged devices'
    proportions (renormalized), robust to any minority of drifting devices,
    scaled to the other devices' total count; it plays the reference, with
    the same effective thresholds and one Benjamini-Hochberg step across the
    devices. Devices below ``min_n`` and fleets of fewer than 3 judged devices
    give ``insufficient``.
    """
    t = thresholds or Thresholds()
    for device, obs in per_device.items():
        if len(obs.counts) != ref.bins:
            raise AnalysisError(
                f"feature {ref.name}, device {device}: {len(obs.counts)} bins, expected {ref.bins}"
            )
    total = pool(list(per_device.values())) if per_device else Observed((0,) * ref.bins)
    enough = [d for d, o in per_device.items() if o.n >= t.min_n]
    typical = np.zeros(ref.bins)
    if enough:
        shares = np.asarray([per_device[d].counts for d in enough], dtype=np.float64)
        typical = np.median(shares / shares.sum(axis=1, keepdims=True), axis=0)
        typical = typical / typical.sum()
    verdicts: dict[str, FeatureVerdict] = {}
    for device, obs in per_device.items():
        rest = tuple(a - b for a, b in zip(total.counts, obs.counts, strict=True))
        if device not in enough or len(enough) < 3 or sum(rest) < t.min_n:
            verdicts[device] = FeatureVerdict(
                ref.name, ref.index, compare(ref, obs), t.psi_warn, t.psi_alarm,
                Status.INSUFFICIENT, f"{obs.n} observations on {device}, {len(enough)} "
                f"device(s) with at least min_n={t.min_n}: no fleet to compare with",
            )  # fmt: skip
            continue
        scaled = typical * float(sum(rest))
        others = ReferenceHistogram(ref.name, ref.index, ref.edges, tuple(scaled.tolist()))
        verdicts[device] = judge(others, Observed(obs.counts, 0), t)
    judged = judge_family(list(verdicts.values()), t.fdr_q)
    return dict(zip(verdicts, judged, strict=True))
