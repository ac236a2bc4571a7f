"""Telemetry bounds (``[telemetry]`` in ``agent.toml``), checked on construction."""

from __future__ import annotations

from dataclasses import dataclass

from edgefleet.errors import ConfigError

__all__ = ["TelemetryOptions"]


@dataclass(frozen=True)
class TelemetryOptions:
    """Telemetry bounds, with units."""

    window_s: float = 60.0  # seconds covered by one record, [0.05, 86400]
    aggregate_interval_s: float = 1.0  # seconds between buffer drains, [0.01, 60]
    buffer_max: int = 10_000  # observations held between drains, [16, 10_000_000]
    latency_reservoir: int = 100_000  # latencies kept per window for quantiles
    spool_max_records: int = 10_000  # records kept on disk, [1, 1_000_000]
    spool_max_bytes: int = 64 << 20  # bytes of records kept on disk, [4 KiB, 16 GiB]
    sample_rate: float = 0.0  # fraction of predictions whose inputs are sampled, [0, 1]
    samples_per_window: int = 0  # cap on samples per record, [0, 256]
    # share of predictions reserved for exploration, [0, 0.5]: always sampled and
    # flagged, whatever the model answered; in effect only while sampling is on
    explore_share: float = 0.02
    feedback_per_window: int = 1024  # labels per record, [0, 4096]
    events_per_window: int = 256  # update events per record, [1, 256]
    publish_inflight: int = 8  # spooled records awaiting PUBACK at once, [1, 1000]
    ack_timeout_s: float = 60.0  # seconds before an unacknowledged record is re-sent

    def __post_init__(self) -> None:
        checks: dict[str, tuple[float, float]] = {
            "window_s": (0.05, 86400),
            "aggregate_interval_s": (0.01, 60),
            "buffer_max": (16, 10_000_000),
            "latency_reservoir": (100, 10_000_000),
            "spool_max_records": (1, 1_000_000),
            "spool_max_bytes": (4096, 16 << 30),
            "sample_rate": (0.0, 1.0),
            "samples_per_window": (0, 256),
            "explore_share": (0.0, 0.5),
            "feedback_per_window": (0, 4096),
            "events_per_window": (1, 256),
            "publish_inflight": (1, 1000),
            "ack_timeout_s": (0.1, 86400),
        }
        for name, (lo, hi) in checks.items():
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise ConfigError(f"TelemetryOptions.{name}={value} must be in [{lo}, {hi}]")
