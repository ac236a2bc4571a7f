"""Model quality from feedback labels: counts in, accuracy with a confidence interval out (pure).

Devices report ground-truth labels with the class the model predicted for
that prediction (``feedback[]`` in telemetry: ``label`` and ``predicted``,
the argmax of output 0). A pair counts when both are class ids: an integer
(or a boolean) label and a known prediction; other labels (text, floats)
are counted as ``unscored``.

``accuracy`` gives the share right with its 95% Wilson interval; ``judge``
compares the interval with a required accuracy: ``alarm`` when even its
upper end is below, ``warn`` when the point estimate is below, ``ok``
otherwise, and ``insufficient`` under ``min_labels``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from server.analysis.verdict import Status

__all__ = [
    "Accuracy",
    "Estimate",
    "accuracy",
    "effective_sample_size",
    "estimate_accuracy",
    "feedback_audit",
    "judge",
    "judge_estimate",
    "label_delays",
    "scored_pairs",
    "split_by_exploration",
    "tally",
]

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Accuracy:
    """Labelled predictions, how many were right, and the share with its 95% Wilson interval."""

    labelled: int
    correct: int
    unscored: int = 0

    @property
    def value(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    def interval(self) -> tuple[float, float] | None:
        """The 95% Wilson score interval of the accuracy (None without labels)."""
        n = self.labelled
        if not n:
            return None
        p = self.correct / n
        denom = 1 + Z95**2 / n
        centre = (p + Z95**2 / (2 * n)) / denom
        half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
        return max(0.0, centre - half), min(1.0, centre + half)

    def __add__(self, other: Accuracy) -> Accuracy:
        return Accuracy(
            self.labelled + other.labelled, self.correct + other.correct,
            self.unscored + other.unscored,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        ci = self.interval()
        return {
            "labelled": self.labelled,
            "correct": self.correct,
            "unscored": self.unscored,
            "accuracy": None if self.value is None else round(self.value, 6),
            "wilson_low": None if ci is None else round(ci[0], 6),
            "wilson_high": None if ci is None else round(ci[1], 6),
        }


def _class_id(label: Any) -> int | None:
    if isinstance(label, bool):
        return int(label)
    if isinstance(label, int):
        return label
    return None


def scored_pairs(feedback: Iterable[Mapping[str, Any]]) -> tuple[list[tuple[int, int]], int]:
    """The (predicted, label) of every scorable ``feedback[]`` entry, and how many were not."""
    pairs: list[tuple[int, int]] = []
    unscored = 0
    for f in feedback:
        label, predicted = _class_id(f.get("label")), f.get("predicted")
        if label is None or not isinstance(predicted, int) or isinstance(predicted, bool):
            unscored += 1
        else:
            pairs.append((predicted, label))
    return pairs, unscored


def tally(feedback: Iterable[Mapping[str, Any]]) -> Accuracy:
    """Score ``feedback[]`` entries of telemetry records."""
    pairs, unscored = scored_pairs(feedback)
    return Accuracy(len(pairs), sum(p == label for p, label in pairs), unscored)


def accuracy(labelled: int, correct: int) -> Accuracy:
    """An ``Accuracy`` from counts (``0 <= correct <= labelled``)."""
    if not 0 <= correct <= labelled:
        raise ValueError(f"correct={correct} must be in [0, labelled={labelled}]")
    return Accuracy(labelled, correct)


def judge(a: Accuracy, required: float, min_labels: int = 100) -> tuple[Status, str]:
    """The verdict of an accuracy against the ``required`` one."""
    if a.labelled < min_labels or a.value is None:
        return Status.INSUFFICIENT, f"{a.labelled} labelled predictions, fewer than {min_labels}"
    low, high = a.interval() or (0.0, 1.0)
    if high < required:
        return Status.ALARM, f"accuracy {a.value:.3f} (95% up to {high:.3f}) < {required:.3f}"
    if a.value < required:
        return Status.WARN, f"accuracy {a.value:.3f} < {required:.3f} (95% from {low:.3f})"
    return Status.OK, f"accuracy {a.value:.3f} >= {required:.3f}"


def feedback_audit(
    predicted_counts: Mapping[int, int],
    pairs: Iterable[tuple[int, int]],
    unscored: int = 0,
) -> dict[str, Any]:
    """Where the labels come from: the seed guide's hidden feedback loop, measured.

    ``predicted_counts`` is how often each class was predicted (telemetry's
    output class counts); ``pairs`` the (predicted, label) of every scored
    feedback label. Reports, per predicted class, the label coverage (labels
    / predictions) and accuracy, and the predicted vs labelled class
    distributions. Very uneven coverage means the labels were chosen by the
    model's own answers (e.g. only flagged cases get investigated), and the
    labelled accuracy says little about the rest.
    """
    labels_per_class: dict[int, int] = {}
    right_per_class: dict[int, int] = {}
    labelled_dist: dict[int, int] = {}
    for predicted, label in pairs:
        labels_per_class[predicted] = labels_per_class.get(predicted, 0) + 1
        right_per_class[predicted] = right_per_class.get(predicted, 0) + (predicted == label)
        labelled_dist[label] = labelled_dist.get(label, 0) + 1
    classes = sorted(set(predicted_counts) | set(labels_per_class) | set(labelled_dist))
    total_pred = sum(predicted_counts.values())
    total_labels = sum(labels_per_class.values())
    rows = []
    for c in classes:
        preds, labels = predicted_counts.get(c, 0), labels_per_class.get(c, 0)
        rows.append({
            "class": c,
            "predictions": preds,
            "labels": labels,
            "coverage": None if not preds else round(labels / preds, 6),
            "accuracy": None if not labels else round(right_per_class[c] / labels, 6),
            "predicted_share": None if not total_pred else round(preds / total_pred, 6),
            "labelled_share": None if not total_labels else round(
                labelled_dist.get(c, 0) / total_labels, 6),
        })  # fmt: skip
    coverages = [r["coverage"] for r in rows if r["coverage"] is not None and r["predictions"]]
    return {
        "predictions": total_pred,
        "labels": total_labels,
        "unscored_labels": unscored,
        "coverage": None if not total_pred else round(total_labels / total_pred, 6),
        "coverage_ratio": (
            None
            if not coverages or min(coverages) == 0
            else round(max(coverages) / min(coverages), 3)
        ),
        "classes": rows,
    }


# ------------------------------------------------------------ label-free estimate


@dataclass(frozen=True)
class Estimate:
    """Accuracy estimated from confidences and the bundle's calibration table (no labels).

    ``n`` rows with a confidence; ``estimated`` the accuracy they imply;
    ``reference`` the accuracy on the evaluation data; ``uncovered`` the
    share of rows in confidence bins the evaluation data never reached
    (counted at the bin's midpoint).
    """

    n: int
    estimated: float | None
    reference: float | None
    uncovered: float

    @property
    def drop(self) -> float | None:
        if self.estimated is None or self.reference is None:
            return None
        return self.reference - self.estimated

    def to_dict(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 6)

        return {
            "n": self.n,
            "estimated_accuracy": r(self.estimated),
            "reference_accuracy": r(self.reference),
            "estimated_drop": r(self.drop),
            "uncovered_share": round(self.uncovered, 6),
        }


def estimate_accuracy(calibration: Mapping[str, Any], confidence: Iterable[int]) -> Estimate:
    """Confidence-based performance estimation (CBPE, as NannyML names it), from histograms.

    ``calibration`` is the manifest's table (confidence bin -> accuracy on
    the evaluation data); ``confidence`` the devices' counts of the top-class
    probability in the same bins. The estimate is the count-weighted mean of
    the bins' evaluation accuracy: it holds while the model stays as
    calibrated as on the evaluation data (covariate shift, not concept
    drift, which only labels show).

    Raises:
        ValueError: the histogram does not have the table's number of bins.
    """
    bins = list(calibration.get("bins") or [])
    counts = [int(c) for c in confidence]
    if len(counts) != len(bins):
        raise ValueError(f"{len(counts)} confidence bins for a calibration table of {len(bins)}")
    ref_n = sum(int(b["n"]) for b in bins)
    reference = (
        sum(int(b["n"]) * float(b["accuracy"]) for b in bins if b["n"]) / ref_n if ref_n else None
    )
    n = sum(counts)
    if not n:
        return Estimate(0, None, reference, 0.0)
    total = uncovered = 0.0
    for b, c in zip(bins, counts, strict=True):
        if b["accuracy"] is None:
            total += c * (float(b["lo"]) + float(b["hi"])) / 2
            uncovered += c
        else:
            total += c * float(b["accuracy"])
    return Estimate(n, total / n, reference, uncovered / n)


def judge_estimate(e: Estimate, max_drop: float, min_n: int = 500) -> tuple[Status, str]:
    """The verdict of an estimated accuracy drop against the allowed ``max_drop``."""
    drop = e.drop
    if e.n < min_n or drop is None:
        return Status.INSUFFICIENT, f"{e.n} rows with a confidence, fewer than {min_n}"
    if drop > max_drop:
        return Status.ALARM, (
            f"estimated accuracy {e.estimated:.3f} is {drop:.3f} below the reference "
            f"{e.reference:.3f} (allowed {max_drop:.3f})"
        )
    return Status.OK, f"estimated accuracy drop {drop:.3f} <= {max_drop:.3f}"


# ------------------------------------------------------------ feedback-loop audit


def label_delays(feedback: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Seconds from prediction to label, over the entries that carry both times.

    Negative differences (a label given before the prediction's drain, within
    the agent's aggregation interval) count as 0.
    """
    delays = []
    without = 0
    for f in feedback:
        a, b = f.get("predicted_at"), f.get("labelled_at")
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            delays.append(max(0.0, float(b) - float(a)))
        else:
            without += 1
    if not delays:
        return {"labels_with_times": 0, "labels_without_times": without,
                "p50_s": None, "p90_s": None, "max_s": None}  # fmt: skip
    delays.sort()

    def q(p: float) -> float:
        return round(delays[min(len(delays) - 1, math.ceil(p * len(delays)) - 1)], 3)

    return {"labels_with_times": len(delays), "labels_without_times": without,
            "p50_s": q(0.5), "p90_s": q(0.9), "max_s": round(delays[-1], 3)}  # fmt: skip


def split_by_exploration(
    feedback: Iterable[Mapping[str, Any]],
) -> tuple[Accuracy, Accuracy, int]:
    """Accuracy on the exploration holdout, on the other (model-selected) labels, and unflagged.

    Exploration predictions are labelled whatever the model answered, so
    their accuracy is an unbiased estimate; the others' labels may have been
    chosen by the model's own answers. The third value counts scored labels
    from devices that do not flag exploration.
    """
    explored, selected = [], []
    unflagged = 0
    for f in feedback:
        flag = f.get("exploration")
        if flag is True:
            explored.append(f)
        elif flag is False:
            selected.append(f)
        else:
            unflagged += 1
    return tally(explored), tally(selected), unflagged


def effective_sample_size(probabilities: Iterable[float | None]) -> dict[str, Any]:
    """Kish's effective sample size of rows weighted by 1 / inclusion probability.

    ``(sum w)^2 / sum w^2``: n for equal probabilities, less the more they
    vary. Rows without a probability (older devices) are counted apart.
    """
    weights = []
    unknown = 0
    for p in probabilities:
        if isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p <= 1:
            weights.append(1.0 / float(p))
        else:
            unknown += 1
    if not weights:
        return {"rows": 0, "rows_without_probability": unknown, "effective_sample_size": None}
    total = math.fsum(weights)
    ess = total * total / math.fsum(w * w for w in weights)
    return {"rows": len(weights), "rows_without_probability": unknown,
            "effective_sample_size": round(ess, 3)}  # fmt: skip
