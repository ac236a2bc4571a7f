"""Drift of a batch of raw rows against a bundle's profile: the offline check (pure).

Flow: arrays keyed by input name (a user's production batch) -> each
profile feature's column is binned on the profile's edges exactly as a
device bins it (``searchsorted(edges, v, side="right")``, non-finite values
counted apart), each channel of an image input over all its values -> the
same ``judge`` and Benjamini-Hochberg step as the fleet analysis.

``dataset_drift`` is true when any feature (or channel) alarms, or at least
half of them are at ``warn`` or above (the convention of Evidently's dataset
drift, with our verdicts).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from server.analysis.drift import (
    AnalysisError,
    Observed,
    profile_references,
)
from server.analysis.judge import (
    FeatureVerdict,
    judge,
    judge_family,
)
from server.analysis.verdict import Status, Thresholds

__all__ = ["batch_drift", "histogram"]


def histogram(values: np.ndarray, edges: tuple[float, ...]) -> Observed:
    """Counts of ``values`` on ``edges`` by the device rule; non-finite values apart."""
    v = np.asarray(values, dtype=np.float64).ravel()
    finite = v[np.isfinite(v)]
    counts = np.bincount(np.searchsorted(np.asarray(edges), finite, side="right"),
                         minlength=len(edges) + 1)  # fmt: skip
    return Observed(tuple(int(c) for c in counts.tolist()), int(v.size - finite.size))


def batch_drift(
    profile: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    thresholds: Thresholds | None = None,
) -> dict[str, Any]:
    """The drift of ``arrays`` against ``profile`` (a ``drift_reference``), JSON-ready.

    Raises:
        AnalysisError: an input the profile needs is missing, or has fewer
            columns than a profiled feature's index.
    """
    t = thresholds or Thresholds()
    verdicts: list[FeatureVerdict] = []
    channel_verdicts: list[FeatureVerdict] = []
    for (kind, name, index), ref in profile_references(profile, t).items():
        if kind == "output":
            continue  # a batch of inputs has no model outputs
        if name not in arrays:
            raise AnalysisError(f"the profile needs input {name!r}; the data has {sorted(arrays)}")
        a = np.asarray(arrays[name])
        if kind == "feature":
            rows = a.reshape(a.shape[0], -1) if a.ndim >= 2 else a.reshape(-1, 1)
            if rows.shape[1] <= index:
                raise AnalysisError(
                    f"feature {ref.name} is column {index} of {name!r}, "
                    f"which has {rows.shape[1]} column(s)"
                )
            verdicts.append(judge(ref, histogram(rows[:, index], ref.edges), t))
        else:
            if a.ndim < 3 or a.shape[1] <= index:
                raise AnalysisError(f"{name!r} has no channel {index} (shape {list(a.shape)})")
            channel_verdicts.append(judge(ref, histogram(a[:, index], ref.edges), t))
    family = judge_family(verdicts + channel_verdicts, t.fdr_q)
    features, channels = family[: len(verdicts)], family[len(verdicts) :]
    judged = [v for v in family if v.status is not Status.INSUFFICIENT]
    flagged = [v for v in judged if v.status in (Status.WARN, Status.ALARM)]
    dataset_drift = any(v.status is Status.ALARM for v in judged) or (
        bool(judged) and 2 * len(flagged) >= len(judged)
    )
    return {
        "features": [v.to_dict() for v in features],
        "channels": [v.to_dict() for v in channels],
        "outputs": None,
        "dataset_drift": dataset_drift,
        "thresholds": t.to_dict(),
    }
