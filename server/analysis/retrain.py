"""The retraining decision: policy + fleet evidence + clock in, fire or not (and why) out (pure).

A policy (per model) names what makes retraining due:

* a PSI alarm on any of its key features (a fleet-wide alert level of
  ``alarm`` on ``feature:NAME``), or on any classifier output when
  ``on_outputs`` is set (``output:NAME``);
* the labelled accuracy below ``min_accuracy`` (an ``alarm`` of
  ``server.analysis.quality.judge``: even the 95% interval's upper end is
  below);
* the estimated accuracy drop above ``max_estimated_drop`` (label-free:
  devices' confidence histograms against the bundle's calibration table,
  ``server.analysis.quality.estimate_accuracy``), once ``min_estimate_n``
  rows are in.

``decide`` answers ``fire`` with the first reason found, unless the model's
last request is younger than ``cooldown_s`` (then it says so). The same
evidence a minute later, within the cooldown, does not fire again: the
decision is idempotent over a cooldown.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edgefleet.errors import ConfigError
from server.analysis.quality import Accuracy, Estimate, judge, judge_estimate
from server.analysis.verdict import Status

__all__ = ["Decision", "Policy", "decide"]


@dataclass(frozen=True)
class Policy:
    """When a model is due for retraining (bounded; ``ConfigError`` names the field)."""

    key_features: tuple[str, ...] = ()
    on_outputs: bool = True
    min_accuracy: float | None = None
    min_labels: int = 200
    cooldown_s: float = 86_400.0
    enabled: bool = True
    max_estimated_drop: float | None = None
    min_estimate_n: int = 500

    def __post_init__(self) -> None:
        if len(self.key_features) > 256 or any(
            not isinstance(f, str) or not 0 < len(f) <= 256 for f in self.key_features
        ):
            raise ConfigError("key_features must be at most 256 names of 1-256 characters")
        if self.min_accuracy is not None and not 0.0 <= self.min_accuracy <= 1.0:
            raise ConfigError(f"min_accuracy={self.min_accuracy} must be in [0, 1]")
        if not 1 <= self.min_labels <= 10_000_000:
            raise ConfigError(f"min_labels={self.min_labels} must be in [1, 10000000]")
        if self.max_estimated_drop is not None and not 0.0 < self.max_estimated_drop <= 1.0:
            raise ConfigError(f"max_estimated_drop={self.max_estimated_drop} must be in (0, 1]")
        if not 1 <= self.min_estimate_n <= 10_000_000:
            raise ConfigError(f"min_estimate_n={self.min_estimate_n} must be in [1, 10000000]")
        if not 60 <= self.cooldown_s <= 365 * 86_400:
            raise ConfigError(f"cooldown_s={self.cooldown_s} must be in [60, 31536000]")

    def to_dict(self) -> dict[str, Any]:
        return {
            "key_features": list(self.key_features),
            "on_outputs": self.on_outputs,
            "min_accuracy": self.min_accuracy,
            "min_labels": self.min_labels,
            "cooldown_s": self.cooldown_s,
            "enabled": self.enabled,
            "max_estimated_drop": self.max_estimated_drop,
            "min_estimate_n": self.min_estimate_n,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Policy:
        """A policy from its JSON form (missing fields take their defaults).

        Raises:
            ConfigError: a field is out of bounds or of the wrong type.
        """
        features = d.get("key_features", ())
        if isinstance(features, str) or not isinstance(features, (list, tuple)):
            raise ConfigError("key_features must be a list of feature names")
        return cls(
            key_features=tuple(d.get("key_features", ())),
            on_outputs=bool(d.get("on_outputs", True)),
            min_accuracy=d.get("min_accuracy"),
            min_labels=int(d.get("min_labels", 200)),
            cooldown_s=float(d.get("cooldown_s", 86_400.0)),
            enabled=bool(d.get("enabled", True)),
            max_estimated_drop=d.get("max_estimated_drop"),
            min_estimate_n=int(d.get("min_estimate_n", 500)),
        )


@dataclass(frozen=True)
class Decision:
    """Whether to fire, why, and the evidence that decided it."""

    fire: bool
    reason: str
    trigger: dict[str, Any] = field(default_factory=dict)


def decide(
    policy: Policy,
    fleet_levels: Mapping[str, Status],
    quality: Accuracy,
    last_request_at: float | None,
    now: float,
    *,
    psi: Mapping[str, float | None] | None = None,
    estimate: Estimate | None = None,
) -> Decision:
    """Decide for one model version from its fleet alert levels (subject -> level) and accuracy.

    ``estimate`` is the label-free accuracy estimate of the same window, if
    the bundle has a calibration table.
    """
    if not policy.enabled:
        return Decision(False, "the policy is disabled")
    reasons: list[tuple[str, dict[str, Any]]] = []
    for name in policy.key_features:
        subject = f"feature:{name}"
        if fleet_levels.get(subject) is Status.ALARM:
            reasons.append((
                f"PSI alarm on key feature {name}",
                {"kind": "psi", "subject": subject, "psi": (psi or {}).get(subject)},
            ))  # fmt: skip
    if policy.on_outputs:
        for subject, level in sorted(fleet_levels.items()):
            if subject.startswith("output:") and level is Status.ALARM:
                reasons.append((
                    f"output drift alarm on {subject[len('output:'):]}",
                    {"kind": "output", "subject": subject, "psi": (psi or {}).get(subject)},
                ))  # fmt: skip
    if policy.min_accuracy is not None:
        status, why = judge(quality, policy.min_accuracy, policy.min_labels)
        if status is Status.ALARM:
            reasons.append((why, {"kind": "accuracy", **quality.to_dict(),
                                  "required": policy.min_accuracy}))  # fmt: skip
    if policy.max_estimated_drop is not None and estimate is not None:
        status, why = judge_estimate(estimate, policy.max_estimated_drop, policy.min_estimate_n)
        if status is Status.ALARM:
            reasons.append((why, {"kind": "estimated", **estimate.to_dict(),
                                  "allowed_drop": policy.max_estimated_drop}))  # fmt: skip
    if not reasons:
        return Decision(False, "no trigger of the policy holds")
    if last_request_at is not None and now - last_request_at < policy.cooldown_s:
        left = policy.cooldown_s - (now - last_request_at)
        return Decision(False, f"{reasons[0][0]}, but the cooldown has {left:.0f} s left")
    reason, trigger = reasons[0]
    return Decision(True, reason, {**trigger, "all": [r for r, _ in reasons]})
