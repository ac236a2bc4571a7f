"""The accuracy gate: candidate results and the choice among them.

Flow: the pipeline fills one :class:`CandidateResult` per candidate tried;
:func:`choose` keeps the candidates whose drop is within ``max_drop`` and
returns the one with the smallest on-wire (zstd) size, sizes within
``tie_tolerance`` of the smallest counting as a tie that the faster candidate
wins.

Invariants: a candidate that errored never passes; the choice is deterministic
(final tie-break on size, then name); pure Python, no model I/O.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compression.config import Candidate

#: Slack for float noise when comparing a drop with ``max_drop``.
DROP_EPSILON = 1e-9


def config_json(value: Any) -> Any:
    """Render a config dataclass (or enum/tuple inside one) as JSON-ready data.

    Args:
        value: A frozen config dataclass, enum, tuple or scalar.

    Returns:
        Dicts (with a ``"type"`` key naming the class), lists and scalars.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {"type": type(value).__name__}
        for f in dataclasses.fields(value):
            out[f.name] = config_json(getattr(value, f.name))
        return out
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [config_json(v) for v in value]
    return value


@dataclass
class CandidateResult:
    """Measured numbers of one candidate.

    Attributes:
        candidate: What was tried.
        bytes: Size of the self-contained ONNX file.
        wire_bytes: zstd-compressed size of that file.
        metric: Gate metric on EVAL.
        drop: Degradation vs fp32 in the metric's units (positive is worse).
        latency_p50_ms: Median latency of one batch.
        weight_sparsity: Fraction of exactly-zero weights in the model.
        passed: ``drop <= max_drop`` and no error.
        error: Why the candidate could not be built or run, if so.
        path: Where the artifact lives while the run is in progress.
    """

    candidate: Candidate
    bytes: int = 0
    wire_bytes: int = 0
    metric: float | None = None
    drop: float | None = None
    latency_p50_ms: float | None = None
    weight_sparsity: float | None = None
    passed: bool = False
    error: str | None = None
    path: Path | None = None

    @property
    def name(self) -> str:
        """The candidate's name."""
        return self.candidate.name

    def to_json(self, fp32_bytes: int) -> dict[str, Any]:
        """One ``candidates`` row of the report.

        Args:
            fp32_bytes: Size of the fp32 reference model, for the ratios.

        Returns:
            JSON-ready dict.
        """
        ok = self.error is None and self.bytes > 0 and self.wire_bytes > 0
        return {
            "name": self.name,
            "prune": config_json(self.candidate.prune),
            "quant": config_json(self.candidate.quant),
            "bytes": self.bytes if ok else None,
            "wire_bytes": self.wire_bytes if ok else None,
            "size_ratio": round(fp32_bytes / self.bytes, 4) if ok else None,
            "wire_ratio": round(fp32_bytes / self.wire_bytes, 4) if ok else None,
            "metric": self.metric,
            "metric_drop": self.drop,
            "latency_p50_ms": self.latency_p50_ms,
            "weight_sparsity": self.weight_sparsity,
            "passed": self.passed,
            "error": self.error,
        }


def passes(result: CandidateResult, max_drop: float) -> bool:
    """Whether a measured candidate meets the gate."""
    return (
        result.error is None and result.drop is not None and result.drop <= max_drop + DROP_EPSILON
    )


def choose(
    results: Sequence[CandidateResult], max_drop: float, tie_tolerance: float
) -> CandidateResult | None:
    """Pick the smallest on-wire candidate within the gate; ties go to the faster.

    Args:
        results: Every candidate tried.
        max_drop: Largest allowed drop.
        tie_tolerance: Relative gap in wire size still counted as a tie.

    Returns:
        The chosen result, or ``None`` when nothing passes.
    """
    passing = [r for r in results if passes(r, max_drop)]
    if not passing:
        return None
    smallest = min(r.wire_bytes for r in passing)
    tied = [r for r in passing if r.wire_bytes <= smallest * (1.0 + tie_tolerance)]
    return min(
        tied,
        key=lambda r: (
            r.latency_p50_ms if r.latency_p50_ms is not None else float("inf"),
            r.wire_bytes,
            r.name,
        ),
    )
