"""The rollout specification and its gates: typed, bounded, with documented defaults.

A ``RolloutSpec`` names the candidate (model, version), the version to
return to on abort (``previous``), the group, the strategy and its waves
(cumulative percentages of the group), the soak window, the device timeout
and the deadline after which an inconclusive evaluation pauses for a person.
``GateSpec`` holds every gate's threshold (docs/rollouts.md lists them).
Every bound is checked on construction; ``ConfigError`` names the field.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from edgefleet.errors import ConfigError

__all__ = ["STRATEGIES", "GateSpec", "RolloutSpec", "Strategy"]

Strategy = Literal["all-at-once", "canary"]
STRATEGIES: tuple[str, ...] = ("all-at-once", "canary")


def _bounded(owner: str, name: str, value: float, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ConfigError(f"{owner}.{name}={value!r} must be a number in [{lo}, {hi}]")


@dataclass(frozen=True)
class GateSpec:
    """Thresholds of the gates, with units; defaults as in docs/rollouts.md.

    Attributes:
        max_failure_rate: (failed + rolled back + timed out) / executed above
            this aborts, once ``min_executed`` devices have finished.
        min_executed: devices finished before the failure rate is judged.
        first_wave_max_failures: this many failures in the first wave abort
            at once (0: the rate rule only).
        min_devices: devices with telemetry needed in each cohort (canary
            and control) before a comparison is more than ``inconclusive``.
        error_alpha: one-sided Fisher exact test of the canaries' error
            count against the control's.
        error_min_ratio: and the canaries' error rate must be at least this
            many times the control's (a practical difference).
        latency_alpha: one-sided Mann-Whitney test on per-device p95s.
        latency_min_ratio: median canary p95 / median control p95 that counts.
        metric_margin: non-inferiority margin of the labelled accuracy
            (canary minus control), as a share.
        min_labels: labels needed in each cohort for the metric gate.
        metric: judge the labelled metric at all (off for models that get no
            feedback labels: the gate would stay inconclusive).
        drift: fail the wave when the canaries' output drift alarms while
            the control's does not.
    """

    max_failure_rate: float = 0.2
    min_executed: int = 3
    first_wave_max_failures: int = 1
    min_devices: int = 3
    error_alpha: float = 0.01
    error_min_ratio: float = 2.0
    latency_alpha: float = 0.01
    latency_min_ratio: float = 1.2
    metric_margin: float = 0.02
    min_labels: int = 100
    metric: bool = True
    drift: bool = True

    def __post_init__(self) -> None:
        o = "gates"
        _bounded(o, "max_failure_rate", self.max_failure_rate, 0.0, 1.0)
        _bounded(o, "min_executed", self.min_executed, 1, 1_000_000)
        _bounded(o, "first_wave_max_failures", self.first_wave_max_failures, 0, 1_000_000)
        _bounded(o, "min_devices", self.min_devices, 1, 1_000_000)
        _bounded(o, "error_alpha", self.error_alpha, 1e-9, 0.5)
        _bounded(o, "error_min_ratio", self.error_min_ratio, 1.0, 1000.0)
        _bounded(o, "latency_alpha", self.latency_alpha, 1e-9, 0.5)
        _bounded(o, "latency_min_ratio", self.latency_min_ratio, 1.0, 1000.0)
        _bounded(o, "metric_margin", self.metric_margin, 0.0, 1.0)
        _bounded(o, "min_labels", self.min_labels, 1, 10_000_000)
        for name in ("metric", "drift"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"gates.{name}={getattr(self, name)!r} must be true or false")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GateSpec:
        """Gates from JSON (missing fields take their defaults).

        Raises:
            ConfigError: an unknown field, or a value out of bounds.
        """
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown gate fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(d))


@dataclass(frozen=True)
class RolloutSpec:
    """What to roll out where, how, and when to stop.

    ``waves`` are cumulative percentages of the group's devices, ascending,
    ending at 100 (``all-at-once`` is one wave of 100); each wave has at
    least one device more than the one before while devices remain. Times
    are seconds.
    """

    model: str
    version: int
    group: str
    previous: int | None  # the version devices return to on abort (None: nothing to revert to)
    strategy: Strategy = "canary"
    # a published version above ``version`` carrying the previous model's payload (a
    # re-release, signed like any version): devices that committed the candidate refuse
    # anything below it (their rollback floor), so an abort sends them this one
    revert_to: int | None = None
    waves: tuple[float, ...] = (5.0, 25.0, 100.0)
    soak_s: float = 600.0
    device_timeout_s: float = 1800.0
    decision_deadline_s: float = 3600.0
    gates: GateSpec = field(default_factory=GateSpec)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        waves = tuple(self.waves)
        if self.strategy == "all-at-once" and waves != (100.0,):
            object.__setattr__(self, "waves", (100.0,))
            waves = (100.0,)
        if not 1 <= len(waves) <= 20 or any(
            isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 100
            for w in waves
        ):
            raise ConfigError("waves must be 1-20 percentages in (0, 100]")
        if any(b <= a for a, b in itertools.pairwise(waves)) or waves[-1] != 100:
            raise ConfigError("waves must ascend and end at 100 (percent of the group)")
        object.__setattr__(self, "waves", tuple(float(w) for w in waves))
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise ConfigError(f"version={self.version!r} must be a positive integer")
        if self.previous is not None and (
            isinstance(self.previous, bool) or not isinstance(self.previous, int)
            or not 1 <= self.previous != self.version
        ):  # fmt: skip
            raise ConfigError("previous must be another positive version (or none)")
        if self.revert_to is not None and (
            isinstance(self.revert_to, bool) or not isinstance(self.revert_to, int)
            or self.revert_to <= self.version
        ):  # fmt: skip
            raise ConfigError(
                f"revert_to={self.revert_to!r} must be a version above {self.version} (the "
                "previous payload re-released, so devices accept it under their rollback floor)"
            )
        _bounded("rollout", "soak_s", self.soak_s, 0.0, 30 * 86_400.0)
        _bounded("rollout", "device_timeout_s", self.device_timeout_s, 10.0, 30 * 86_400.0)
        _bounded("rollout", "decision_deadline_s", self.decision_deadline_s, 10.0, 30 * 86_400.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "group": self.group,
            "previous": self.previous,
            "strategy": self.strategy,
            "revert_to": self.revert_to,
            "waves": list(self.waves),
            "soak_s": self.soak_s,
            "device_timeout_s": self.device_timeout_s,
            "decision_deadline_s": self.decision_deadline_s,
            "gates": self.gates.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RolloutSpec:
        """A spec from its JSON form.

        Raises:
            ConfigError: a field is missing, unknown or out of bounds.
        """
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown rollout fields {sorted(unknown)}")
        try:
            return cls(
                model=str(d["model"]),
                version=d["version"],
                group=str(d["group"]),
                previous=d.get("previous"),
                strategy=d.get("strategy", "canary"),
                revert_to=d.get("revert_to"),
                waves=tuple(d.get("waves", (5.0, 25.0, 100.0))),
                soak_s=d.get("soak_s", 600.0),
                device_timeout_s=d.get("device_timeout_s", 1800.0),
                decision_deadline_s=d.get("decision_deadline_s", 3600.0),
                gates=GateSpec.from_dict(d.get("gates") or {}),
            )
        except KeyError as exc:
            raise ConfigError(f"a rollout needs {exc.args[0]!r}") from exc
        except TypeError as exc:
            raise ConfigError(f"bad rollout field: {exc}") from exc
