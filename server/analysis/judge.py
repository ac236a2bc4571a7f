"""Drift verdicts: statistics and thresholds in, a status per cell out (pure; no I/O).

Flow: ``judge_grid(refs, counts, nonfinite, thresholds)`` judges a grid of
cells at once, S scopes (devices, groups or the fleet) x F subjects
(features, channels or outputs with one bin count) x B bins, in whole-array
numpy (``server.analysis.drift.grid_stats``) -> ``apply_fdr(grids, q)`` runs
one Benjamini-Hochberg step over every judged cell of the grids (one family:
e.g. every device cell of one evaluation), so that a drifted verdict also
needs a significant chi-square test -> ``GridVerdicts.verdict(s, f)`` gives
one cell as a ``FeatureVerdict`` with all its statistics, for reports and
alert rows. ``judge``, ``judge_many`` and ``judge_family`` are the same rules
for a few histograms; ``outliers`` compares each device with the fleet.

The rules of a cell with ``n`` finite observations and ``m`` non-finite:

* ``n < min_n``: ``insufficient``, never an alarm;
* effective thresholds ``warn_at = max(psi_warn, floor)``, ``alarm_at =
  max(psi_alarm, floor)``, floor the ``null_quantile`` of PSI under no drift
  at this n: ``alarm`` at PSI >= alarm_at, ``warn`` at PSI >= warn_at;
* otherwise ``warn`` when ``m / (n + m) >= 1%`` (a broken sensor often
  sends NaN, which PSI over the finite values misses), else ``ok``;
* after the BH step, a PSI warn or alarm whose test is not a discovery is
  ``ok`` (or the non-finite warning, which does not depend on the test).

Why arrays: a fleet evaluation judges 10^4 to 10^6 cells per window, and
Python objects per cell cost some 50 times the statistics. The work is
skipped where it cannot change an outcome: floors are looked up only where
PSI >= psi_warn (a floor only raises a threshold), and p-values computed only
where the statistic reaches the chi-square ``q`` quantile (BH never rejects a
p-value above ``q``). ``benchmarks/drift.py`` times this path against a bare
numpy PSI.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import special

from server.analysis.drift import (
    AnalysisError,
    Comparison,
    GridStats,
    Observed,
    ReferenceHistogram,
    bh_reject,
    chi2_pvalues,
    compare,
    grid_stats,
    null_psi_quantile,
    pool,
    shape_stats,
)
from server.analysis.verdict import Status, Thresholds

__all__ = [
    "NONFINITE_WARN_SHARE",
    "FeatureVerdict",
    "GridVerdicts",
    "Rule",
    "apply_fdr",
    "judge",
    "judge_family",
    "judge_grid",
    "judge_many",
    "outliers",
]

NONFINITE_WARN_SHARE = 0.01  # a share of non-finite values that is worth a warning
_BY_SEVERITY = (Status.INSUFFICIENT, Status.OK, Status.WARN, Status.ALARM)


def _round(x: float) -> float:
    return float(round(x, 6))


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
    fdr_passed: bool | None = None  # set by the Benjamini-Hochberg step

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


class Rule(enum.IntEnum):
    """Which rule decided a cell (its reason text is made from it on demand)."""

    INSUFFICIENT = 0
    OK = 1
    PSI_WARN = 2
    PSI_ALARM = 3
    NONFINITE = 4
    NOT_SIGNIFICANT = 5  # a PSI warn or alarm the BH step did not confirm


@dataclass(frozen=True)
class GridVerdicts:
    """The verdicts of a (scopes, subjects) grid, as arrays of shape (S, F).

    ``status`` holds ``Status.severity`` codes (0 insufficient, 1 ok, 2 warn,
    3 alarm); ``floor`` the null quantile where it was looked up (NaN
    elsewhere); ``fdr_passed`` is -1 where no BH step has judged the cell,
    else 0 or 1; ``fdr_q`` the step's rate.
    """

    refs: tuple[ReferenceHistogram, ...]
    counts: np.ndarray  # (S, F, B) int64
    nonfinite: np.ndarray  # (S, F) int64
    thresholds: Thresholds
    stats: GridStats
    status: np.ndarray
    rule: np.ndarray
    floor: np.ndarray
    fdr_passed: np.ndarray
    fdr_q: float | None = None

    @property
    def judged(self) -> np.ndarray:
        """Cells with enough observations for a verdict."""
        return np.asarray(self.status > 0)

    def statuses(self) -> np.ndarray:
        """``status`` as ``Status`` members (an object array)."""
        return np.asarray(_BY_SEVERITY, dtype=object)[self.status]

    @functools.cached_property
    def _shape(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # JS, KS and p-values of the whole grid, computed once when a verdict is asked for
        r = np.asarray([ref.counts for ref in self.refs], dtype=np.float64)
        js, ks = shape_stats(r, self.counts)
        return js, ks, chi2_pvalues(self.stats.chi2, self.stats.dof)

    def verdict(self, s: int, f: int) -> FeatureVerdict:
        """Cell (s, f) as a ``FeatureVerdict``, with every statistic and its reason."""
        ref, t = self.refs[f], self.thresholds
        n, m = int(self.stats.n[s, f]), int(self.nonfinite[s, f])
        rule = Rule(int(self.rule[s, f]))
        comparison = None
        if n > 0:
            js, ks, p = self._shape
            comparison = Comparison(
                n, m, float(self.stats.psi[s, f]), float(js[s, f]), float(ks[s, f]),
                float(p[s, f]),
            )  # fmt: skip
        passed = int(self.fdr_passed[s, f])
        fdr = None if passed < 0 else bool(passed)
        if rule is Rule.INSUFFICIENT:
            return FeatureVerdict(
                ref.name, ref.index, comparison, t.psi_warn, t.psi_alarm, Status.INSUFFICIENT,
                f"{n} observations, fewer than min_n={t.min_n}", fdr,
            )  # fmt: skip
        floor = float(self.floor[s, f])
        if np.isnan(floor):
            floor = null_psi_quantile(ref, n, t.null_quantile)
        warn_at, alarm_at = max(t.psi_warn, floor), max(t.psi_alarm, floor)
        value = float(self.stats.psi[s, f])
        psi_reason = (
            f"PSI {value:.3f} >= {alarm_at:.3f}"
            if value >= alarm_at
            else f"PSI {value:.3f} >= {warn_at:.3f}"
        )
        share = m / (n + m)
        reason = {
            Rule.OK: f"PSI {value:.3f} < {warn_at:.3f}",
            Rule.PSI_WARN: psi_reason,
            Rule.PSI_ALARM: psi_reason,
            Rule.NONFINITE: f"{share:.1%} of the values are not finite",
            Rule.NOT_SIGNIFICANT: f"{psi_reason}, but the chi-square test is not "
            f"significant at FDR q={self.fdr_q}",
        }[rule]
        status = _BY_SEVERITY[int(self.status[s, f])]
        return FeatureVerdict(
            ref.name, ref.index, comparison, warn_at, alarm_at, status, reason, fdr
        )


def _grid_counts(
    refs: Sequence[ReferenceHistogram], counts: Any, nonfinite: Any
) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(counts)
    if c.ndim != 3 or c.shape[1] != len(refs):
        raise AnalysisError(
            f"counts of shape {list(c.shape)} do not make a (scopes, {len(refs)} subjects, "
            "bins) grid"
        )
    for ref in refs:
        if ref.bins != c.shape[2]:
            raise AnalysisError(
                f"feature {ref.name}: {c.shape[2]} observed bins for a reference of "
                f"{ref.bins} (the counts were made on other edges)"
            )
    if c.dtype.kind not in "iu" and c.size and not np.array_equal(c, np.floor(c)):
        raise AnalysisError("counts must be whole numbers")
    c = c.astype(np.int64, copy=False)
    nf = np.zeros(c.shape[:2], dtype=np.int64) if nonfinite is None else np.asarray(nonfinite)
    nf = nf.astype(np.int64, copy=False)
    if nf.shape != c.shape[:2]:
        raise AnalysisError(f"non-finite counts of shape {list(nf.shape)} for {list(c.shape[:2])}")
    if (c.size and c.min() < 0) or (nf.size and nf.min() < 0):
        bad = int(np.flatnonzero((c < 0).any(axis=(0, 2)) | (nf < 0).any(axis=0))[0])
        raise AnalysisError(f"feature {refs[bad].name}: counts must be non-negative")
    return c, nf


def judge_grid(
    refs: Sequence[ReferenceHistogram],
    counts: Any,
    nonfinite: Any = None,
    thresholds: Thresholds | None = None,
) -> GridVerdicts:
    """Judge every cell of ``counts`` (S, F, B) against ``refs`` (one per subject, F of them).

    ``nonfinite`` (S, F) counts each cell's non-finite values (default none).
    No BH step is applied (``apply_fdr`` does it for a family of grids).

    Raises:
        AnalysisError: the grid does not fit the references (bins, shape), or
            a count is negative or fractional.
    """
    t = thresholds or Thresholds()
    c, nf = _grid_counts(refs, counts, nonfinite)
    r = np.asarray([ref.counts for ref in refs], dtype=np.float64).reshape(len(refs), c.shape[2])
    g = grid_stats(r, c)
    n, value = g.n, g.psi
    judged = n >= max(t.min_n, 1)
    status = np.where(judged, 1, 0).astype(np.int8)
    floor = np.full(n.shape, np.nan)
    candidates = judged & (value >= t.psi_warn)
    if candidates.any():
        cs, cf = np.nonzero(candidates)
        cn = n[cs, cf]
        base = int(cn.max()) + 1  # one key per (subject, n): few distinct ones in practice
        uniq, inverse = np.unique(cf * base + cn, return_inverse=True)
        looked = np.asarray(
            [null_psi_quantile(refs[k // base], k % base, t.null_quantile) for k in uniq.tolist()]
        )
        floor[cs, cf] = looked[inverse.ravel()]
    with np.errstate(invalid="ignore"):
        alarm = candidates & (value >= np.maximum(t.psi_alarm, floor))
        warn = candidates & ~alarm & (value >= np.maximum(t.psi_warn, floor))
    rule = status.copy()  # Rule.INSUFFICIENT / Rule.OK
    status[warn], rule[warn] = 2, Rule.PSI_WARN
    status[alarm], rule[alarm] = 3, Rule.PSI_ALARM
    quiet = judged & ~warn & ~alarm
    if nf.any():
        share = nf / np.maximum(n + nf, 1)
        nonfin = quiet & (share >= NONFINITE_WARN_SHARE)
        status[nonfin], rule[nonfin] = 2, Rule.NONFINITE
    return GridVerdicts(
        tuple(refs), c, nf, t, g, status, rule, floor, np.full(n.shape, -1, dtype=np.int8)
    )


def apply_fdr(grids: Sequence[GridVerdicts], q: float = 0.05) -> list[GridVerdicts]:
    """One Benjamini-Hochberg step over every judged cell of ``grids`` (one family).

    A PSI ``warn`` or ``alarm`` whose chi-square test is not a discovery
    becomes ``ok`` (``Rule.NOT_SIGNIFICANT``), or the non-finite warning when
    that share is at least 1%. Only cells whose statistic reaches the
    chi-square ``q`` quantile get a p-value: the others cannot be rejected.
    """
    m = sum(int(g.judged.sum()) for g in grids)
    pvalues, where = [], []
    for g in grids:
        dof = g.stats.dof
        crit = np.full(dof.shape, np.inf)
        for d in np.unique(dof[g.judged & (dof >= 1)]).tolist():
            crit[dof == d] = special.chdtri(d, q)  # the chi-square upper q quantile
        cand = g.judged & (g.stats.chi2 >= crit)
        where.append(cand)
        pvalues.append(chi2_pvalues(g.stats.chi2[cand], dof[cand]))
    reject = bh_reject(np.concatenate(pvalues) if pvalues else np.zeros(0), q, m)
    out, offset = [], 0
    for g, cand in zip(grids, where, strict=True):
        passed = np.where(g.judged, 0, -1).astype(np.int8)
        k = int(cand.sum())
        passed[cand] = reject[offset : offset + k]
        offset += k
        status, rule = g.status.copy(), g.rule.copy()
        demote = ((rule == Rule.PSI_WARN) | (rule == Rule.PSI_ALARM)) & (passed == 0)
        status[demote], rule[demote] = 1, Rule.NOT_SIGNIFICANT
        if g.nonfinite.any():
            share = g.nonfinite / np.maximum(g.stats.n + g.nonfinite, 1)
            nonfin = demote & (share >= NONFINITE_WARN_SHARE)
            status[nonfin], rule[nonfin] = 2, Rule.NONFINITE
        out.append(replace(g, status=status, rule=rule, fdr_passed=passed, fdr_q=q))
    return out


def judge(
    ref: ReferenceHistogram, obs: Observed, thresholds: Thresholds | None = None
) -> FeatureVerdict:
    """One histogram's verdict (the rules of ``judge_grid``, no BH step).

    Raises:
        AnalysisError: the counts are not on the reference's bins, or negative.
    """
    return judge_many(ref, [obs], thresholds)[0]


def judge_many(
    ref: ReferenceHistogram, observed: Sequence[Observed], thresholds: Thresholds | None = None
) -> list[FeatureVerdict]:
    """``judge`` for many histograms on one reference (devices, windows), as one grid."""
    for obs in observed:
        if len(obs.counts) != ref.bins:
            raise AnalysisError(
                f"feature {ref.name}: {len(obs.counts)} observed bins for a reference of "
                f"{ref.bins} (the counts were made on other edges)"
            )
    if not observed:
        return []
    counts = np.asarray([[obs.counts] for obs in observed], dtype=np.int64)
    nonfinite = np.asarray([[obs.nonfinite] for obs in observed], dtype=np.int64)
    grid = judge_grid([ref], counts, nonfinite, thresholds)
    return [grid.verdict(k, 0) for k in range(len(observed))]


def judge_family(verdicts: Sequence[FeatureVerdict], q: float = 0.05) -> list[FeatureVerdict]:
    """Apply the Benjamini-Hochberg step across verdicts judged together.

    Every judged verdict takes part (``insufficient`` ones do not); a PSI
    ``warn`` or ``alarm`` whose chi-square test is not among the discoveries
    becomes ``ok`` saying why, or the non-finite warning when that share is
    at least 1% (as ``apply_fdr``).
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
            c = v.comparison
            assert c is not None
            share = c.nonfinite / (c.n + c.nonfinite)
            if share >= NONFINITE_WARN_SHARE:
                status, reason = Status.WARN, f"{share:.1%} of the values are not finite"
            else:
                status = Status.OK
                reason = f"{reason}, but the chi-square test is not significant at FDR q={q}"
        # constructed directly: dataclasses.replace costs several times more per cell
        out[i] = FeatureVerdict(
            v.name, v.index, v.comparison, v.warn_at, v.alarm_at, status, reason, bool(rejected)
        )
    return out


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
