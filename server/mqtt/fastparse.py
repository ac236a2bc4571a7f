"""A typed fast path for telemetry payloads on the ingest path (msgspec).

Flow: ``summarize(payload)`` decodes and validates one telemetry payload
against the msgspec schema below, in C, and returns the record's
``RecordSummary``; it returns ``None`` for anything the schema refuses. The
ingester then asks the reference parser, ``TelemetryRecord.from_bytes``,
which either names the problem precisely (``MalformedMessageError``) or
accepts a record this schema is deliberately too strict for.

Invariant (the one that matters): the schema accepts a subset of what
``TelemetryRecord.from_bytes`` accepts, and for a payload both accept, the
summary is the reference's ``RecordSummary.of(record)``. So the fast path can
only make ingestion cheaper, never looser: ``edgefleet.messages`` stays the
one definition of a valid record (docs/protocol.md), and
``tests/server/test_fastparse.py`` checks the invariant by differential
fuzzing against it. Where the schema is stricter it sends the payload to the
reference: non-empty ``samples`` (binary arrays with cross-field size rules;
off by default on devices) and whatever msgspec cannot decode (e.g. a lone
UTF-16 surrogate escape).

Cost: about 6 us per 1.5 KB record where the reference takes about 65 us
(``benchmarks/ingest.py``; docs/server.md has the server's whole per-record
cost).
"""

from __future__ import annotations

import sys
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from edgefleet import messages as m
from server.services.telemetry import RecordSummary

__all__ = ["summarize"]

_MAXV = m.MAX_VERSION
_FMAX = sys.float_info.max  # bounds a float field to finite numbers (inf fails le=)


def _anchored(pattern: str) -> str:
    """The reference full-matches ``^...$`` patterns; msgspec searches, so end with ``\\Z``."""
    assert pattern.startswith("^") and pattern.endswith("$")
    return pattern[:-1] + r"\Z"


_Count = Annotated[int, Meta(ge=0, le=_MAXV)]
_Positive = Annotated[int, Meta(ge=1, le=_MAXV)]
_Num = Annotated[float, Meta(ge=-_FMAX, le=_FMAX)]
_NonNeg = Annotated[float, Meta(ge=0, le=_FMAX)]
_Unit = Annotated[float, Meta(ge=0, le=1)]
_UnixTs = Annotated[float, Meta(ge=0, le=m.MAX_UNIX_TS)]
_Str256 = Annotated[str, Meta(max_length=256)]
_Kind = Annotated[str, Meta(max_length=32, pattern=_anchored(m._KIND_RE.pattern))]
_Device = Annotated[str, Meta(max_length=64, pattern=_anchored(m._DEVICE_RE.pattern))]
_ModelName = Annotated[str, Meta(max_length=64, pattern=_anchored(m._NAME_RE.pattern))]
_Histogram = Annotated[list[_Count], Meta(max_length=100)]


class _Strict(Struct, forbid_unknown_fields=True):
    """Every key is required and no other key is allowed (as ``_keys`` in the reference)."""


class _ModelRef(_Strict):
    name: _ModelName
    version: _Positive


class _Latency(_Strict):
    count: _Positive
    mean: _NonNeg
    p50: _NonNeg
    p95: _NonNeg
    p99: _NonNeg
    max: _NonNeg


class _Output(_Strict):
    index: Annotated[int, Meta(ge=0, le=63)]
    count: _Count
    mean: _Num | None
    std: _NonNeg | None
    min: _Num | None
    max: _Num | None
    classes: Annotated[list[_Count], Meta(max_length=1024)] | None


class _Feature(_Strict):
    input: _Str256
    index: Annotated[int, Meta(ge=0, le=1 << 30)]
    name: _Str256
    counts: _Histogram
    nonfinite: _Count


class _Channel(_Strict):
    input: _Str256
    channel: Annotated[int, Meta(ge=0, le=1 << 20)]
    counts: _Histogram
    nonfinite: _Count
    mean: _Num | None
    std: _NonNeg | None


class _Shadow(_Strict):
    model: _ModelRef | None
    compared: _Count
    dropped: _Count
    agreement: _Unit | None
    mean_abs_diff: _NonNeg | None
    latency_p50_ms: _NonNeg | None
    active_latency_p50_ms: _NonNeg | None
    labelled: _Count
    active_accuracy: _Unit | None
    shadow_accuracy: _Unit | None


class _Health(_Strict):
    cpu_percent: _NonNeg | None
    load1: _NonNeg | None
    rss_bytes: _Count | None
    disk_free_bytes: _Count | None
    temperature_c: Annotated[float, Meta(ge=-273.15, le=1000)] | None


class _Event(_Strict):
    ts: _UnixTs
    kind: _Kind
    desired_version: _Positive | None
    model: _ModelRef | None
    reason: Annotated[str, Meta(max_length=1024)] | None


class _Spool(_Strict):
    dropped: _Count
    enospc: _Count
    write_errors: _Count
    rejected: _Count


class _Feedback(_Strict):
    prediction_id: _Count
    label: bool | int | _Num | _Str256
    predicted: _Count | None


class _Telemetry(_Strict):
    type: Literal["telemetry"]
    spec_version: Literal[1]
    device_id: _Device
    seq: _Positive
    window_start: _UnixTs
    window_end: _UnixTs
    model: _ModelRef | None
    predictions: _Count
    errors: _Count
    error_kinds: Annotated[dict[_Kind, _Count], Meta(max_length=32)]
    latency_ms: _Latency | None
    outputs: Annotated[list[_Output], Meta(max_length=64)]
    features: Annotated[list[_Feature], Meta(max_length=m.MAX_LIST)]
    channels: Annotated[list[_Channel], Meta(max_length=m.MAX_LIST)]
    shadow: _Shadow | None
    health: _Health
    events: Annotated[list[_Event], Meta(max_length=256)]
    spool: _Spool
    dropped_observations: _Count
    samples: Annotated[list[None], Meta(max_length=0)]  # any sample: the reference decides
    feedback: Annotated[list[_Feedback], Meta(max_length=m.MAX_LIST)]


_DECODER = msgspec.json.Decoder(_Telemetry)


def summarize(payload: bytes, *, max_bytes: int = m.MAX_TELEMETRY_BYTES) -> RecordSummary | None:
    """The summary of a valid telemetry payload, or ``None``: then ask the reference parser.

    Never raises for any input.
    """
    if len(payload) > max_bytes:
        return None
    try:
        r = _DECODER.decode(payload)
    except (msgspec.DecodeError, ValueError, RecursionError):
        # ValidationError is a DecodeError; invalid UTF-8 raises UnicodeDecodeError.
        return None
    if r.window_end < r.window_start:
        return None
    return RecordSummary.of(r)
