"""Verdicts of the analysis core: four real outcomes, and the bounded thresholds behind them.

``Status`` is what a drift or quality check concludes for one scope (a
feature, the outputs, a device, a group): ``ok``, ``warn``, ``alarm``, or
``insufficient`` when there are too few observations to judge (never an
alarm). ``Thresholds`` are the configured values; the effective thresholds of
a judgement also depend on the sample size (``server.analysis.drift``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from edgefleet.errors import ConfigError

__all__ = ["Status", "Thresholds", "worst"]


class Status(str, enum.Enum):
    """The outcome of one judgement."""

    OK = "ok"
    WARN = "warn"
    ALARM = "alarm"
    INSUFFICIENT = "insufficient"

    @property
    def severity(self) -> int:
        """0 insufficient, 1 ok, 2 warn, 3 alarm: ``worst`` takes the maximum."""
        return _SEVERITY[self]


_SEVERITY = {Status.INSUFFICIENT: 0, Status.OK: 1, Status.WARN: 2, Status.ALARM: 3}


def worst(statuses: list[Status] | tuple[Status, ...]) -> Status:
    """The most severe status (``insufficient`` for none)."""
    return max(statuses, key=lambda s: s.severity, default=Status.INSUFFICIENT)


@dataclass(frozen=True)
class Thresholds:
    """Drift thresholds, with units and bounds (checked on construction).

    Attributes:
        psi_warn: PSI at which a feature is worth watching (the seed guide's 0.10).
        psi_alarm: PSI at which retraining is due (0.25).
        min_n: observations pooled before a verdict other than ``insufficient``.
        null_quantile: the effective threshold is at least this quantile of
            PSI under no drift for the sample size at hand (0.99: at most 1%
            false alarms per feature-window).
        fdr_q: Benjamini-Hochberg false discovery rate of the chi-square test
            across every (device, feature) judged together.
        reference_n: rows assumed behind a reference profile that carries
            proportions only (profiles written before counts were recorded).
    """

    psi_warn: float = 0.10
    psi_alarm: float = 0.25
    min_n: int = 500
    null_quantile: float = 0.99
    fdr_q: float = 0.05
    reference_n: int = 10_000

    def to_dict(self) -> dict[str, float | int]:
        """The thresholds a report states it used (``reference_n`` is an input detail)."""
        return {
            "psi_warn": self.psi_warn,
            "psi_alarm": self.psi_alarm,
            "min_n": self.min_n,
            "null_quantile": self.null_quantile,
            "fdr_q": self.fdr_q,
        }

    def __post_init__(self) -> None:
        if not 0 < self.psi_warn <= self.psi_alarm <= 10:
            raise ConfigError(
                f"psi_warn={self.psi_warn} and psi_alarm={self.psi_alarm} must satisfy "
                "0 < psi_warn <= psi_alarm <= 10"
            )
        if not 1 <= self.min_n <= 10_000_000:
            raise ConfigError(f"min_n={self.min_n} must be in [1, 10000000]")
        if not 0.5 <= self.null_quantile < 1:
            raise ConfigError(f"null_quantile={self.null_quantile} must be in [0.5, 1)")
        if not 0 < self.fdr_q < 1:
            raise ConfigError(f"fdr_q={self.fdr_q} must be in (0, 1)")
        if not 10 <= self.reference_n <= 100_000_000:
            raise ConfigError(f"reference_n={self.reference_n} must be in [10, 100000000]")
