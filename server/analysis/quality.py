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

__all__ = ["Accuracy", "accuracy", "judge", "tally"]

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


def tally(feedback: Iterable[Mapping[str, Any]]) -> Accuracy:
    """Score ``feedback[]`` entries of telemetry records."""
    labelled = correct = unscored = 0
    for f in feedback:
        label, predicted = _class_id(f.get("label")), f.get("predicted")
        if label is None or not isinstance(predicted, int) or isinstance(predicted, bool):
            unscored += 1
            continue
        labelled += 1
        correct += label == predicted
    return Accuracy(labelled, correct, unscored)


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
