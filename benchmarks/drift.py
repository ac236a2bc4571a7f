"""The fleet drift evaluation against a bare vectorized PSI over the same counts, in one run.

``python benchmarks/drift.py [--json] [--devices N] [--features F] [--windows W]``

A simulated fleet (default 1,000 devices x 30 features x 24 windows, 500
observations per device-window, 10 bins on a reference of 5,000 rows): most
devices draw from the reference's population, a tenth of them have one
feature shifted by 0.5 sigma (and, in other windows, by 1 sigma). Every
window is evaluated through the code path of the server's drift worker
(``server.services.alerts`` -> ``server.analysis.judge``: ``judge_grid`` over
the devices x features grid, one Benjamini-Hochberg family over every
(device, feature) with ``apply_fdr``, and the pooled fleet verdict per
feature as its own grid and family) and, on the same counts, by a bare
vectorized numpy PSI (smoothed proportions, one expression over the whole
devices x features x bins array), the strongest simple alternative.

Prints ``ratio`` (analysis time / bare PSI time; target <= 1.5),
``false_alarm_rate`` (warn or alarm on unshifted feature-windows; target
<= 0.01) and ``detection_rate`` (the share of 0.5 sigma shifted
feature-windows flagged; target >= 0.99). Exits 1 when a target is missed.
Counts are made in memory: the benchmark times the statistics and verdicts
(status arrays), not the database or the alert rows the worker then
updates (``tests/server/test_drift_alerts.py`` covers that path);
``verdicts_s`` reports, untimed in the ratio, what building a
``FeatureVerdict`` object for every cell would add.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.analysis.drift import ReferenceHistogram
from server.analysis.judge import apply_fdr, judge_grid
from server.analysis.verdict import Thresholds

TARGETS = {"ratio": 1.5, "false_alarm_rate": 0.01, "detection_rate": 0.99}
BINS = 10


def bare_psi(reference: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """PSI of every (device, feature) histogram at once: counts (D, F, B), reference (F, B)."""
    e = (reference + 0.5) / (reference.sum(axis=-1, keepdims=True) + 0.5 * BINS)
    a = (counts + 0.5) / (counts.sum(axis=-1, keepdims=True) + 0.5 * BINS)
    return np.asarray(np.sum((a - e) * np.log(a / e), axis=-1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--features", type=int, default=30)
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--n", type=int, default=500, help="observations per device-window")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    d, f, n = args.devices, args.features, args.n
    sample = rng.normal(size=(5000, f))
    edges = np.quantile(sample, np.arange(1, BINS) / BINS, axis=0).T  # (F, B-1)
    ref_counts = np.stack(
        [np.bincount(np.searchsorted(edges[j], sample[:, j], side="right"), minlength=BINS)
         for j in range(f)]
    ).astype(np.float64)  # fmt: skip
    refs = [ReferenceHistogram(f"f{j}", j, tuple(edges[j]), tuple(ref_counts[j])) for j in range(f)]
    t = Thresholds()

    def probabilities(shift: float) -> np.ndarray:
        # bin probabilities of N(shift, 1) on each feature's edges
        from scipy import stats

        cdf = stats.norm.cdf(edges - shift)
        full = np.concatenate([np.zeros((f, 1)), cdf, np.ones((f, 1))], axis=1)
        return np.diff(full, axis=1)

    base, half, one = probabilities(0.0), probabilities(0.5), probabilities(1.0)
    analysis_s = bare_s = verdicts_s = 0.0
    flagged_null = judged_null = flagged_shift = judged_shift = 0
    for w in range(args.windows):
        shifted_devices = rng.choice(d, size=max(1, d // 10), replace=False)
        shifted_feature = int(rng.integers(f))
        counts = np.empty((d, f, BINS), dtype=np.int64)
        for j in range(f):
            counts[:, j] = rng.multinomial(n, base[j], size=d)
        shifted_p = half if w % 2 == 0 else one
        counts[shifted_devices, shifted_feature] = rng.multinomial(
            n, shifted_p[shifted_feature], size=len(shifted_devices)
        )
        start = time.perf_counter()
        psi = bare_psi(ref_counts, counts)
        flags_bare = psi >= t.psi_warn
        bare_s += time.perf_counter() - start
        assert flags_bare.shape == (d, f)
        start = time.perf_counter()
        (grid,) = apply_fdr([judge_grid(refs, counts, None, t)], t.fdr_q)
        (fleet,) = apply_fdr([judge_grid(refs, counts.sum(axis=0, keepdims=True), None, t)])
        status = grid.status >= 2  # warn or alarm
        analysis_s += time.perf_counter() - start
        assert fleet.status.shape == (1, f)
        if w == 0:
            start = time.perf_counter()
            objects = [grid.verdict(i, j) for i in range(d) for j in range(f)]
            verdicts_s = time.perf_counter() - start
            assert len(objects) == d * f
        mask = np.zeros((d, f), dtype=bool)
        mask[shifted_devices, shifted_feature] = True
        flagged_null += int(status[~mask].sum())
        judged_null += int((~mask).sum())
        if w % 2 == 0:  # the 0.5 sigma windows: the harder of the two shifts
            flagged_shift += int(status[mask].sum())
            judged_shift += int(mask.sum())
    result: dict[str, Any] = {
        "ratio": round(analysis_s / bare_s, 3),
        "false_alarm_rate": round(flagged_null / judged_null, 6),
        "detection_rate": round(flagged_shift / max(judged_shift, 1), 6),
        "analysis_s": round(analysis_s, 3),
        "bare_psi_s": round(bare_s, 4),
        "verdicts_s": round(verdicts_s, 3),  # one window's FeatureVerdict objects, not in ratio
        "cells": d * f * args.windows,
        "targets": TARGETS,
    }
    ok = (
        result["ratio"] <= TARGETS["ratio"]
        and result["false_alarm_rate"] <= TARGETS["false_alarm_rate"]
        and result["detection_rate"] >= TARGETS["detection_rate"]
    )
    result["ok"] = ok
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['cells']} (device, feature, window) cells")
        print(f"  analysis {result['analysis_s']} s, bare numpy PSI {result['bare_psi_s']} s")
        print(f"  ratio             {result['ratio']:10.3f}   (target <= {TARGETS['ratio']})")
        print(f"  false_alarm_rate  {result['false_alarm_rate']:10.6f}   (target <= 0.01)")
        print(f"  detection_rate    {result['detection_rate']:10.6f}   (target >= 0.99)")
        print("all targets met" if ok else "MISSED a target")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
