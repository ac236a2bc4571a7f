"""The wire contract: one declarative schema per MQTT message, shared by agent and server.

Flow: a sender builds a frozen message (a msgspec ``Struct``) and calls
``to_bytes()``; a receiver calls ``Type.from_bytes(payload)`` (or, for a
signed desired state, ``edgefleet.trust.verify_desired_state``), which
bounds the length before parsing and refuses anything the schema does not
allow with ``MalformedMessageError`` (a ``VerificationError``).
``edgefleet.wire.base`` lists the guarantees; docs/protocol.md is normative.

Modules, one per protocol (identifier rules and numeric bounds come from
``edgefleet.ids``, which the manifest, topics and server schemas share):

- ``desired``: the signed desired state and the references it carries;
- ``chunks``: block requests and the binary chunk frames;
- ``telemetry``: the telemetry record and its parts;
- ``status``: retained status and device facts.

This package is pure (no paho, no I/O).
"""

from edgefleet.ids import MAX_UNIX_TS, MAX_VERSION
from edgefleet.wire.base import MalformedMessageError, WireStruct
from edgefleet.wire.chunks import (
    CHUNK_MAGIC,
    MAX_BLOCK_SIZE,
    MAX_CHUNK_HEADER_BYTES,
    MAX_CHUNK_REQUEST_BYTES,
    MAX_REQUEST_BLOCKS,
    MIN_BLOCK_SIZE,
    ChunkData,
    ChunkRefusal,
    ChunkRequest,
    parse_chunk_frame,
)
from edgefleet.wire.desired import (
    CLOCK_SKEW,
    DESIRED_STATE_TYPE,
    MAX_BUNDLE_BYTES,
    MAX_DESIRED_BYTES,
    BundleRef,
    DesiredState,
    DesiredTarget,
    ModelRef,
    ShadowSpec,
    SignedDesiredState,
)
from edgefleet.wire.status import MAX_SMALL_BYTES, DeviceFactsMessage, StatusMessage
from edgefleet.wire.telemetry import (
    MAX_LIST,
    MAX_SAMPLE_BYTES,
    MAX_TELEMETRY_BYTES,
    ArraySample,
    ChannelCounts,
    FeatureCounts,
    Feedback,
    LatencySummary,
    OutputSummary,
    Sample,
    ShadowSummary,
    SpoolCounters,
    TelemetryRecord,
    UpdateEvent,
    Vitals,
)

__all__ = [
    "CHUNK_MAGIC",
    "CLOCK_SKEW",
    "DESIRED_STATE_TYPE",
    "MAX_BLOCK_SIZE",
    "MAX_BUNDLE_BYTES",
    "MAX_CHUNK_HEADER_BYTES",
    "MAX_CHUNK_REQUEST_BYTES",
    "MAX_DESIRED_BYTES",
    "MAX_LIST",
    "MAX_REQUEST_BLOCKS",
    "MAX_SAMPLE_BYTES",
    "MAX_SMALL_BYTES",
    "MAX_TELEMETRY_BYTES",
    "MAX_UNIX_TS",
    "MAX_VERSION",
    "MIN_BLOCK_SIZE",
    "ArraySample",
    "BundleRef",
    "ChannelCounts",
    "ChunkData",
    "ChunkRefusal",
    "ChunkRequest",
    "DesiredState",
    "DesiredTarget",
    "DeviceFactsMessage",
    "FeatureCounts",
    "Feedback",
    "LatencySummary",
    "MalformedMessageError",
    "ModelRef",
    "OutputSummary",
    "Sample",
    "ShadowSpec",
    "ShadowSummary",
    "SignedDesiredState",
    "SpoolCounters",
    "StatusMessage",
    "TelemetryRecord",
    "UpdateEvent",
    "Vitals",
    "WireStruct",
    "parse_chunk_frame",
]
