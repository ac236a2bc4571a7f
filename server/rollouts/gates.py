"""The gates of a wave: canary evidence against the concurrent control cohort (pure).

Each gate takes per-device evidence of the canaries (devices of this and
earlier waves, on the candidate) and of the control (devices of the group
not yet in any wave, still on the old version) and answers ``pass``,
``fail`` or ``inconclusive`` with its statistics. The device is the unit of
analysis: a comparison needs ``min_devices`` devices with telemetry in each
cohort, else it is ``inconclusive`` (never a pass). With no control left
(the last wave), comparisons pass saying so; the update-failure and drift
gates still apply.

* ``update_failures``: (failed + rolled back + timed out) / finished above
  ``max_failure_rate`` once ``min_executed`` finished, or
  ``first_wave_max_failures`` failures in the first wave -> fail; fewer
  finished than that pass when none failed, else are inconclusive.
* ``error_rate``: one-sided Fisher exact test of the canaries' pooled error
  count against the control's, failing when p < ``error_alpha`` and the
  canaries' rate is at least ``error_min_ratio`` times the control's.
* ``latency``: one-sided Mann-Whitney U on the devices' p95 latencies,
  failing when p < ``latency_alpha`` and the median canary p95 is at least
  ``latency_min_ratio`` times the control's.
* ``metric``: the labelled accuracy difference (canary - control) with
  Newcombe's hybrid score interval (from Wilson intervals): pass when its
  lower end is above ``-metric_margin`` (non-inferior), fail when its upper
  end is below 0 and the difference below ``-metric_margin``, else
  inconclusive; ``min_labels`` labels in each cohort first.
* ``drift``: the canaries' output drift (the drift core's verdict) alarms
  while the control's does not -> fail; ``insufficient`` -> inconclusive.
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from scipy import stats

from server.analysis.quality import Accuracy
from server.analysis.verdict import Status
from server.rollouts.spec import GateSpec

__all__ = [
    "DeviceStats",
    "GateResult",
    "Verdict",
    "combine",
    "drift",
    "error_rate",
    "latency",
    "metric",
    "update_failures",
]


class Verdict(str, enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class DeviceStats:
    """One device's telemetry over the evaluation window."""

    device_id: str
    predictions: int = 0
    errors: int = 0
    latency_p95_ms: float | None = None
    labelled: int = 0
    correct: int = 0


@dataclass(frozen=True)
class GateResult:
    """A gate's verdict, why, and the statistics behind it (stored with the evaluation)."""

    gate: str
    verdict: Verdict
    reason: str
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"gate": self.gate, "verdict": self.verdict.value, "reason": self.reason,
                "stats": self.stats}  # fmt: skip


def _r(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, 6)


def update_failures(finished: int, failed: int, first_wave: bool, g: GateSpec) -> GateResult:
    """Devices whose update failed, rolled back or timed out, among those that finished."""
    s: dict[str, Any] = {"finished": finished, "failed": failed, "first_wave": first_wave}
    if first_wave and g.first_wave_max_failures and failed >= g.first_wave_max_failures:
        return GateResult("update_failures", Verdict.FAIL,
                          f"{failed} update failure(s) in the first wave "
                          f"(limit {g.first_wave_max_failures})", s)  # fmt: skip
    if not finished:
        return GateResult("update_failures", Verdict.INCONCLUSIVE, "no device finished yet", s)
    if finished < g.min_executed:
        if not failed:  # every device that finished succeeded: nothing speaks against it
            why = f"{finished} device(s) finished, none failed"
            return GateResult("update_failures", Verdict.PASS, why, s)
        why = f"{failed} of {finished} device(s) failed, fewer than {g.min_executed} finished"
        return GateResult("update_failures", Verdict.INCONCLUSIVE, why, s)
    rate = failed / finished
    s["rate"] = _r(rate)
    if rate > g.max_failure_rate:
        return GateResult("update_failures", Verdict.FAIL,
                          f"{failed}/{finished} updates failed ({rate:.0%} > "
                          f"{g.max_failure_rate:.0%})", s)  # fmt: skip
    return GateResult("update_failures", Verdict.PASS,
                      f"{failed}/{finished} updates failed", s)  # fmt: skip


def _enough(cohort: Sequence[DeviceStats], g: GateSpec, what: str) -> str | None:
    with_data = sum(1 for d in cohort if d.predictions > 0)
    if with_data < g.min_devices:
        return f"{with_data} {what} device(s) with telemetry, fewer than {g.min_devices}"
    return None


def error_rate(
    canary: Sequence[DeviceStats], control: Sequence[DeviceStats] | None, g: GateSpec
) -> GateResult:
    """Runtime errors of the canaries against the control (Fisher exact, one-sided)."""
    if control is None:
        return GateResult("error_rate", Verdict.PASS, "no control cohort left to compare with")
    for cohort, what in ((canary, "canary"), (control, "control")):
        short = _enough(cohort, g, what)
        if short:
            return GateResult("error_rate", Verdict.INCONCLUSIVE, short)
    ce, cp = sum(d.errors for d in canary), sum(d.predictions for d in canary)
    oe, op = sum(d.errors for d in control), sum(d.predictions for d in control)
    _, p = stats.fisher_exact([[ce, cp - ce], [oe, op - oe]], alternative="greater")
    rate_c, rate_o = ce / cp, oe / op
    ratio = math.inf if rate_o == 0 and rate_c > 0 else (rate_c / rate_o if rate_o else 1.0)
    s = {"canary_errors": ce, "canary_predictions": cp, "control_errors": oe,
         "control_predictions": op, "p": _r(float(p)), "ratio": _r(ratio)}  # fmt: skip
    if p < g.error_alpha and ratio >= g.error_min_ratio:
        return GateResult("error_rate", Verdict.FAIL,
                          f"error rate {rate_c:.4f} vs {rate_o:.4f} on the control "
                          f"(Fisher p={float(p):.2g})", s)  # fmt: skip
    return GateResult("error_rate", Verdict.PASS,
                      f"error rate {rate_c:.4f} vs {rate_o:.4f} on the control", s)  # fmt: skip


def latency(
    canary: Sequence[DeviceStats], control: Sequence[DeviceStats] | None, g: GateSpec
) -> GateResult:
    """The devices' p95 latencies against the control's (Mann-Whitney U, one-sided)."""
    if control is None:
        return GateResult("latency", Verdict.PASS, "no control cohort left to compare with")
    c = [d.latency_p95_ms for d in canary if d.latency_p95_ms is not None and d.predictions]
    o = [d.latency_p95_ms for d in control if d.latency_p95_ms is not None and d.predictions]
    if len(c) < g.min_devices or len(o) < g.min_devices:
        return GateResult("latency", Verdict.INCONCLUSIVE,
                          f"p95 latencies of {len(c)} canary and {len(o)} control device(s), "
                          f"fewer than {g.min_devices} in a cohort")  # fmt: skip
    p = float(stats.mannwhitneyu(c, o, alternative="greater").pvalue)
    mc, mo = statistics.median(c), statistics.median(o)
    ratio = mc / mo if mo > 0 else (math.inf if mc > 0 else 1.0)
    s = {"canary_median_p95_ms": _r(mc), "control_median_p95_ms": _r(mo), "p": _r(p),
         "ratio": _r(ratio), "canary_devices": len(c), "control_devices": len(o)}  # fmt: skip
    if p < g.latency_alpha and ratio >= g.latency_min_ratio:
        return GateResult("latency", Verdict.FAIL,
                          f"median p95 {mc:.2f} ms vs {mo:.2f} ms on the control "
                          f"(x{ratio:.2f}, Mann-Whitney p={p:.2g})", s)  # fmt: skip
    return GateResult("latency", Verdict.PASS,
                      f"median p95 {mc:.2f} ms vs {mo:.2f} ms on the control", s)  # fmt: skip


def _newcombe(a: Accuracy, b: Accuracy) -> tuple[float, float, float]:
    """Difference a - b of two proportions with Newcombe's hybrid score 95% interval."""
    pa, pb = a.value or 0.0, b.value or 0.0
    la, ua = a.interval() or (0.0, 1.0)
    lb, ub = b.interval() or (0.0, 1.0)
    d = pa - pb
    return (
        d,
        d - math.sqrt((pa - la) ** 2 + (ub - pb) ** 2),
        d + math.sqrt((ua - pa) ** 2 + (pb - lb) ** 2),
    )


def metric(
    canary: Sequence[DeviceStats], control: Sequence[DeviceStats] | None, g: GateSpec
) -> GateResult:
    """Labelled accuracy of the canaries against the control: non-inferiority with a margin."""
    if not g.metric:
        return GateResult("metric", Verdict.PASS, "the metric gate is off")
    if control is None:
        return GateResult("metric", Verdict.PASS, "no control cohort left to compare with")
    a = Accuracy(sum(d.labelled for d in canary), sum(d.correct for d in canary))
    b = Accuracy(sum(d.labelled for d in control), sum(d.correct for d in control))
    if a.labelled < g.min_labels or b.labelled < g.min_labels:
        return GateResult("metric", Verdict.INCONCLUSIVE,
                          f"{a.labelled} canary and {b.labelled} control labels, fewer than "
                          f"{g.min_labels} in a cohort")  # fmt: skip
    d, lo, hi = _newcombe(a, b)
    s = {"canary": a.to_dict(), "control": b.to_dict(), "difference": _r(d),
         "low": _r(lo), "high": _r(hi), "margin": g.metric_margin}  # fmt: skip
    if lo > -g.metric_margin:
        return GateResult("metric", Verdict.PASS,
                          f"accuracy {a.value:.3f} vs {b.value:.3f}: non-inferior "
                          f"(95% from {lo:+.3f} > -{g.metric_margin})", s)  # fmt: skip
    if hi < 0 and d < -g.metric_margin:
        return GateResult("metric", Verdict.FAIL,
                          f"accuracy {a.value:.3f} vs {b.value:.3f} on the control "
                          f"(95% up to {hi:+.3f})", s)  # fmt: skip
    return GateResult("metric", Verdict.INCONCLUSIVE,
                      f"accuracy {a.value:.3f} vs {b.value:.3f}: interval "
                      f"[{lo:+.3f}, {hi:+.3f}] decides nothing yet", s)  # fmt: skip


def drift(canary: Status | None, control: Status | None, g: GateSpec) -> GateResult:
    """The canaries' output drift verdict (``server.analysis``) against the control's.

    ``canary`` is None when the candidate has no output reference to judge
    against: the gate does not apply.
    """
    s = {
        "canary": None if canary is None else canary.value,
        "control": None if control is None else control.value,
    }
    if not g.drift:
        return GateResult("drift", Verdict.PASS, "the drift gate is off", s)
    if canary is None:
        return GateResult("drift", Verdict.PASS, "the candidate has no output reference", s)
    if canary is Status.INSUFFICIENT:
        return GateResult("drift", Verdict.INCONCLUSIVE, "too few canary outputs to judge", s)
    if canary is Status.ALARM and control is not Status.ALARM:
        return GateResult("drift", Verdict.FAIL, "the canaries' outputs drift (alarm) and the "
                          "control's do not", s)  # fmt: skip
    return GateResult("drift", Verdict.PASS, f"canary output drift {canary.value}", s)


def combine(results: Sequence[GateResult]) -> Verdict:
    """Any fail fails; else any inconclusive is inconclusive; else pass."""
    verdicts = {r.verdict for r in results}
    if Verdict.FAIL in verdicts:
        return Verdict.FAIL
    if Verdict.INCONCLUSIVE in verdicts:
        return Verdict.INCONCLUSIVE
    return Verdict.PASS
