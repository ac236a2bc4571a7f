"""Typed, bounded settings of the agent core (updates, health check, inference).

The daemon's configuration (broker, topics, telemetry) lives in
``agent.config`` and embeds an ``AgentOptions``; the CLI builds one from its
flags. Every field has a unit and a range, checked at construction, so a bad
value fails at start-up and never halfway through an update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgefleet.ids import NAME_RE

if TYPE_CHECKING:  # the verifier (and cryptography) load only when an update runs
    from edgefleet.trust import VerifierLimits

__all__ = ["AgentOptions"]

_CLASS_RE = NAME_RE  # device classes share the topic-level name rule


@dataclass(frozen=True)
class AgentOptions:
    """Settings of one agent."""

    device_class: str = "generic"  # matched against a bundle's targets.device_classes
    intra_op_threads: int = 1  # onnxruntime threads per inference, 0 = onnxruntime decides; 0..64
    max_trial_restarts: int = 3  # agent starts on trial before reverting; 1..100
    max_stores: int = 32  # state stores for one update before it is abandoned; 8..1000
    health_runs: int = 5  # timed runs of the golden inputs (median vs budget); 1..1000
    latency_budget_factor: float = 1.0  # scales the manifest's latency budget; 0.1..100
    shadow_queue: int = 256  # pending shadow comparisons before dropping; 1..65536
    feedback_memory: int = 4096  # predictions remembered for shadow accuracy; 0..1_000_000
    verifier_limits: VerifierLimits | None = None  # None: edgefleet.trust's defaults

    def __post_init__(self) -> None:
        if not _CLASS_RE.fullmatch(self.device_class):
            raise ValueError(f"device_class {self.device_class!r} must match {_CLASS_RE.pattern}")
        bounds: dict[str, tuple[float, float]] = {
            "intra_op_threads": (0, 64),
            "max_trial_restarts": (1, 100),
            "max_stores": (8, 1000),
            "health_runs": (1, 1000),
            "latency_budget_factor": (0.1, 100.0),
            "shadow_queue": (1, 65536),
            "feedback_memory": (0, 1_000_000),
        }
        for name, (lo, hi) in bounds.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not lo <= value <= hi:
                raise ValueError(f"AgentOptions.{name}={value!r} must be in [{lo}, {hi}]")
