"""Telemetry: one window of one device's serving, drift counts, vitals and update events.

Flow: the agent's recorder closes a window into a ``TelemetryRecord``,
spools its bytes (``to_bytes``) and publishes them at QoS 1; the server's
ingester calls ``TelemetryRecord.from_bytes`` (msgspec, in C: the same schema
on both sides) and stores the record idempotently on ``(device_id, seq)``.

Invariants: ``seq`` increases by at least one per record of a device, across
agent restarts; a record may arrive twice (a lost PUBACK), and gaps together
with the ``spool`` counters say how much was lost. Telemetry is not signed,
so its spelling need not be canonical (the decoder skips that check, which
halves the server's parse cost); every other rule of ``edgefleet.wire.base``
holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Literal

from msgspec import Meta

from edgefleet.ids import (
    Count,
    DeviceName,
    Finite,
    Kind,
    NonNegative,
    UnitInterval,
    UnixTs,
    Version,
)
from edgefleet.wire.base import (
    WireStruct,
    decode,
    encode,
    fail,
    wire_default,
    wire_default_factory,
)
from edgefleet.wire.desired import ModelRef

__all__ = [
    "MAX_LIST",
    "MAX_SAMPLE_BYTES",
    "MAX_TELEMETRY_BYTES",
    "ArraySample",
    "ChannelCounts",
    "FeatureCounts",
    "Feedback",
    "LatencySummary",
    "OutputSummary",
    "Sample",
    "ShadowSummary",
    "SpoolCounters",
    "TelemetryRecord",
    "UpdateEvent",
    "Vitals",
]

MAX_TELEMETRY_BYTES = 4 << 20  # bytes; 4096 features x 10 bins plus samples stay far below
MAX_SAMPLE_BYTES = 64 << 10  # bytes of one sampled array
MAX_LIST = 4096  # entries in any list of a telemetry record
DTYPE_SIZES = {
    "float32": 4, "float16": 2, "float64": 8, "int8": 1, "uint8": 1, "int16": 2,
    "int32": 4, "int64": 8, "bool": 1,
}  # fmt: skip

Text = Annotated[str, Meta(max_length=256)]
Histogram = Annotated[tuple[Count, ...], Meta(max_length=100)]
Classes = Annotated[tuple[Count, ...], Meta(max_length=1024)]
OptFinite = Finite | None
OptNonNegative = NonNegative | None
OptUnit = UnitInterval | None


class LatencySummary(WireStruct, frozen=True):
    """Inference latency over a window, in milliseconds."""

    what = "latency_ms"
    count: Version  # at least one prediction, or there is no summary
    mean: NonNegative
    p50: NonNegative
    p95: NonNegative
    p99: NonNegative
    max: NonNegative


class OutputSummary(WireStruct, frozen=True):
    """Distribution of one model output over a window.

    ``classes`` counts the argmax over the last axis per row when the output
    looks like class scores (rank >= 2, 2-1024 columns); otherwise ``None``.
    Added later, optional (absent is ``None``): ``confidence`` counts the rows'
    top-class probability in 10 equal-width bins of [0, 1] (class scores
    only; the scores themselves when every row is a probability vector,
    else their softmax); ``counts`` counts the output's values over the drift
    reference's edges for that output (outputs that are not class scores).
    """

    what = "outputs[]"
    index: Annotated[int, Meta(ge=0, le=63)]
    count: Count
    mean: OptFinite
    std: OptNonNegative
    min: OptFinite
    max: OptFinite
    classes: Classes | None = wire_default("classes", None)
    confidence: Histogram | None = None
    counts: Histogram | None = None


class FeatureCounts(WireStruct, frozen=True):
    """Histogram of one feature column over the manifest's drift-reference edges."""

    what = "features[]"
    input: Text
    index: Annotated[int, Meta(ge=0, le=1 << 30)]
    name: Text
    counts: Histogram
    nonfinite: Count = wire_default("nonfinite", 0)


class ChannelCounts(WireStruct, frozen=True):
    """Histogram of all values of one input channel, with their mean and std."""

    what = "channels[]"
    input: Text
    channel: Annotated[int, Meta(ge=0, le=1 << 20)]
    counts: Histogram
    nonfinite: Count = wire_default("nonfinite", 0)
    mean: OptFinite = wire_default("mean", None)
    std: OptNonNegative = wire_default("std", None)


class ShadowSummary(WireStruct, frozen=True):
    """The shadow model's comparison with the serving one.

    Counters are cumulative since this shadow model started (the agent's
    shadow runner keeps them); a receiver diffs successive records of the same
    ``model`` for per-window figures.
    """

    what = "shadow"
    model: ModelRef | None
    compared: Count
    dropped: Count = wire_default("dropped", 0)  # skipped: the shadow queue was full
    agreement: OptUnit = wire_default("agreement", None)  # top-1 agreement (classifiers)
    mean_abs_diff: OptNonNegative = wire_default("mean_abs_diff", None)  # other outputs
    latency_p50_ms: OptNonNegative = wire_default("latency_p50_ms", None)  # shadow model
    active_latency_p50_ms: OptNonNegative = wire_default("active_latency_p50_ms", None)
    labelled: Count = wire_default("labelled", 0)  # comparisons with a feedback label
    active_accuracy: OptUnit = wire_default("active_accuracy", None)
    shadow_accuracy: OptUnit = wire_default("shadow_accuracy", None)


class Vitals(WireStruct, frozen=True):
    """Device vitals at window close; ``None`` where the platform does not say.

    On the wire this is the record's ``health`` object (the name is kept for
    compatibility); in code it is "vitals", to keep it apart from the bundle's
    health check and the update machine's trial.
    """

    what = "health"
    cpu_percent: OptNonNegative = wire_default("cpu_percent", None)  # this process, % of a core
    load1: OptNonNegative = wire_default("load1", None)  # 1-minute load average
    rss_bytes: Count | None = wire_default("rss_bytes", None)
    disk_free_bytes: Count | None = wire_default("disk_free_bytes", None)  # state directory's fs
    temperature_c: Annotated[float, Meta(ge=-273.15, le=1000)] | None = wire_default(
        "temperature_c", None
    )  # hottest thermal zone


class UpdateEvent(WireStruct, frozen=True):
    """One step of an update, as reported to the server, with the reason when it failed.

    ``kind`` is a short lowercase word: ``desired-accepted``,
    ``desired-rejected``, ``download-started``, ``download-complete``,
    ``download-failed``, ``install-started``, ``installed``,
    ``install-failed``, ``rolled-back``, ``committed``.
    """

    what = "event"
    ts: UnixTs
    kind: Kind
    desired_version: Version | None = wire_default("desired_version", None)
    model: ModelRef | None = wire_default("model", None)
    reason: Annotated[str, Meta(max_length=1024)] | None = wire_default("reason", None)


class SpoolCounters(WireStruct, frozen=True):
    """Telemetry that never left the device, counted since the previous record."""

    what = "spool"
    dropped: Count = wire_default("dropped", 0)  # oldest records evicted by the spool bound
    enospc: Count = wire_default("enospc", 0)  # records lost because the disk was full
    write_errors: Count = wire_default("write_errors", 0)  # lost to other I/O errors
    rejected: Count = wire_default("rejected", 0)  # refused by the broker (permanent code)

    def __add__(self, other: SpoolCounters) -> SpoolCounters:
        return SpoolCounters(
            self.dropped + other.dropped,
            self.enospc + other.enospc,
            self.write_errors + other.write_errors,
            self.rejected + other.rejected,
        )


DType = Literal["float32", "float16", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"]


class ArraySample(WireStruct, frozen=True, rename={"data": "data_b64"}):
    """One array as little-endian C-order bytes (the manifest's golden-array form).

    On the wire the bytes are base64 in ``data_b64``.
    """

    what = "sample"
    dtype: DType
    shape: Annotated[tuple[Annotated[int, Meta(ge=0, le=1 << 30)], ...], Meta(max_length=8)]
    data: Annotated[bytes, Meta(max_length=MAX_SAMPLE_BYTES)]

    def _check(self) -> None:
        if len(self.data) != math.prod(self.shape) * DTYPE_SIZES[self.dtype]:
            raise fail(self.what, "data length does not match dtype and shape")


class Sample(WireStruct, frozen=True):
    """A sampled prediction: its inputs and outputs (sampling is off by default).

    Added later, optional: ``inclusion_probability``, the probability with
    which this prediction was taken into the samples (absent: unknown), and
    ``exploration``, true when it belongs to the exploration share, sampled
    regardless of the model's output.
    """

    what = "samples[]"
    prediction_id: Count
    inputs: Annotated[dict[Text, ArraySample], Meta(max_length=64)]
    outputs: Annotated[tuple[ArraySample, ...], Meta(max_length=64)]
    inclusion_probability: Annotated[float, Meta(gt=0, le=1)] | None = None
    exploration: bool = False


Label = (
    bool
    | int
    | Annotated[float, Meta(ge=-1.7976931348623157e308, le=1.7976931348623157e308)]
    | Text
)


class Feedback(WireStruct, frozen=True):
    """A ground-truth label for a prediction, with what the model predicted if known."""

    what = "feedback[]"
    prediction_id: Count
    label: Label
    predicted: Count | None = wire_default("predicted", None)  # argmax of output 0, if known
    # Added later, optional (absent: unknown): whether the prediction was in the
    # exploration share, when it was made (to the drain, within a second) and
    # when its label was given.
    exploration: bool | None = None
    predicted_at: UnixTs | None = None
    labelled_at: UnixTs | None = None


class _TelemetryType(WireStruct, frozen=True, kw_only=True, rename={"msg_type": "type"}):
    msg_type: Literal["telemetry"] = wire_default("type", "telemetry")
    spec_version: Literal[1] = wire_default("spec_version", 1)


class TelemetryRecord(_TelemetryType, frozen=True):
    """One telemetry window of one device.

    ``seq`` increases by at least one per record of a device, across agent
    restarts; a receiver dedupes on ``(device_id, seq)`` (a record may arrive
    twice when a PUBACK was lost) and may detect loss from gaps together with
    the ``spool`` counters.
    """

    what = "telemetry"
    device_id: DeviceName
    seq: Version
    window_start: UnixTs
    window_end: UnixTs
    model: ModelRef | None = wire_default("model", None)
    predictions: Count = wire_default("predictions", 0)
    errors: Count = wire_default("errors", 0)
    error_kinds: Annotated[Mapping[Kind, Count], Meta(max_length=32)] = wire_default_factory(
        "error_kinds", dict
    )
    latency_ms: LatencySummary | None = wire_default("latency_ms", None)
    outputs: Annotated[tuple[OutputSummary, ...], Meta(max_length=64)] = wire_default("outputs", ())
    features: Annotated[tuple[FeatureCounts, ...], Meta(max_length=MAX_LIST)] = wire_default(
        "features", ()
    )
    channels: Annotated[tuple[ChannelCounts, ...], Meta(max_length=MAX_LIST)] = wire_default(
        "channels", ()
    )
    shadow: ShadowSummary | None = wire_default("shadow", None)
    health: Vitals = wire_default("health", Vitals())
    events: Annotated[tuple[UpdateEvent, ...], Meta(max_length=256)] = wire_default("events", ())
    spool: SpoolCounters = wire_default("spool", SpoolCounters())
    dropped_observations: Count = wire_default("dropped_observations", 0)  # buffer overflows
    samples: Annotated[tuple[Sample, ...], Meta(max_length=256)] = wire_default("samples", ())
    feedback: Annotated[tuple[Feedback, ...], Meta(max_length=MAX_LIST)] = wire_default(
        "feedback", ()
    )

    def _check(self) -> None:
        if self.window_end < self.window_start:
            raise fail(self.what, "window_end is before window_start")

    def to_bytes(self) -> bytes:
        return encode(self)

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = MAX_TELEMETRY_BYTES) -> TelemetryRecord:
        """Parse a record payload.

        Raises:
            MalformedMessageError: oversized or malformed.
        """
        return decode(data, cls, cls.what, max_bytes)
