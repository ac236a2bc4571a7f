"""The reference decoder: the hand-written parser the wire schema replaced (test oracle only).

This is ``edgefleet/messages.py`` as it was before ``edgefleet.wire``: frozen
dataclasses checked field by field in Python. It is kept here, unchanged in
its rules, so that ``test_differential.py`` can check the one msgspec schema
against an independent implementation of docs/protocol.md: both must accept
the same payloads, and decode them to the same values. Nothing outside the
tests imports it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import math
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from edgefleet import canonical
from edgefleet.errors import (
    VerificationError,
)
from edgefleet.keys import SigningKey
from edgefleet.manifest import DeviceFacts
from edgefleet.timeutil import format_utc, parse_utc
from edgefleet.topics import DeviceTopic, GroupTopic
from edgefleet.trust.root import Signature

__all__ = [
    "CHUNK_MAGIC",
    "DESIRED_STATE_TYPE",
    "MAX_BLOCK_SIZE",
    "MAX_CHUNK_HEADER_BYTES",
    "MAX_DESIRED_BYTES",
    "MAX_REQUEST_BLOCKS",
    "MAX_TELEMETRY_BYTES",
    "MAX_UNIX_TS",
    "MIN_BLOCK_SIZE",
    "ArraySample",
    "BundleRef",
    "ChannelCounts",
    "ChunkData",
    "ChunkError",
    "ChunkRequest",
    "DesiredState",
    "DesiredTarget",
    "DeviceFactsMessage",
    "FeatureCounts",
    "Feedback",
    "Health",
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
    "parse_chunk_frame",
]

DESIRED_STATE_TYPE = "edgefleet-desired-state"
MAX_DESIRED_BYTES = 64 << 10  # bytes; a desired state with 64 signatures is ~10 KiB
MAX_CHUNK_REQUEST_BYTES = 4 << 10  # bytes
MAX_CHUNK_HEADER_BYTES = 1 << 10  # bytes of the JSON header inside a chunk frame
MAX_TELEMETRY_BYTES = 4 << 20  # bytes; 4096 features x 10 bins plus samples stay far below
MAX_SMALL_BYTES = 16 << 10  # bytes; status and facts
MIN_BLOCK_SIZE = 256  # bytes
MAX_BLOCK_SIZE = 256 << 10  # bytes (MQTT brokers commonly cap packets near 256 KiB-1 MiB)
MAX_REQUEST_BLOCKS = 2048  # bits in one request's bitmap: bounds the responder's work
MAX_BUNDLE_BYTES = 1 << 40  # bytes; a sanity bound, devices configure a smaller one
MAX_VERSION = 2**53 - 1
# Unix-seconds fields end at 9999-12-31T23:59:59Z, the last second a datetime can hold.
MAX_UNIX_TS = 253_402_300_799.0
CHUNK_MAGIC = b"EFC1"
MAX_SAMPLE_BYTES = 64 << 10  # bytes of one sampled array
MAX_LIST = 4096  # entries in any list of a telemetry record
CLOCK_SKEW = timedelta(hours=1)  # how far in the future ``issued`` may be

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")  # = manifest model names
_DEVICE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # = topics.NAME_PATTERN
_KIND_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_DTYPE_SIZES = {
    "float32": 4, "float16": 2, "float64": 8, "int8": 1, "uint8": 1, "int16": 2,
    "int32": 4, "int64": 8, "bool": 1,
}  # fmt: skip


class MalformedMessageError(VerificationError):
    """A message is not well formed (size, JSON, keys, types or bounds)."""

    code = 26


# --------------------------------------------------------------------- helpers


def _fail(what: str, msg: str) -> MalformedMessageError:
    return MalformedMessageError(f"{what}: {msg}")


def _decode(
    data: bytes, what: str, max_bytes: int, *, require_canonical: bool = True
) -> dict[str, Any]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _fail(what, "payload must be bytes")
    if len(data) > max_bytes:
        raise _fail(what, f"{len(data)} bytes is more than the limit of {max_bytes}")
    if not require_canonical:
        # Unsigned messages: the C decoder alone (no duplicate-key hook); NaN and
        # Infinity are still refused.
        try:
            # UTF-8 only (json.loads would also sniff UTF-16/32 from bytes).
            value = json.loads(bytes(data).decode("utf-8"), parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as exc:
            raise _fail(what, f"not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise _fail(what, "top level is not a JSON object")
        if _SURROGATE_ESCAPE.search(data) and _has_lone_surrogate(value):
            raise _fail(what, "a string holds a lone UTF-16 surrogate (not valid Unicode text)")
        return value
    try:
        return canonical.decode_strict(bytes(data), require_canonical=require_canonical)
    except canonical.CanonicalError as exc:
        raise _fail(what, str(exc)) from exc


# Only a \uD800-\uDFFF escape can put a surrogate into a decoded string (strict UTF-8
# refuses encoded ones); pairs are fine, a lone one is not text and breaks storage.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


@functools.lru_cache(maxsize=256)
def _key_sets(required: tuple[str, ...], optional: tuple[str, ...]) -> tuple[frozenset[str], ...]:
    req = frozenset(required)
    return req, req | frozenset(optional)


def _keys(
    d: Any, what: str, required: Iterable[str], optional: Iterable[str] = ()
) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise _fail(what, "must be an object")
    req, allowed = _key_sets(tuple(required), tuple(optional))
    keys = d.keys()
    if keys == req or (req <= keys and keys <= allowed):  # set algebra in C: the hot path
        return d
    missing = req - set(d)
    extra = set(d) - allowed
    raise _fail(what, f"missing keys {sorted(missing)}, unexpected keys {sorted(extra)}")


def _int(v: Any, what: str, lo: int = 0, hi: int = MAX_VERSION) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _fail(what, f"must be an integer in [{lo}, {hi}]")
    return v


def _is_one(v: Any) -> bool:
    """``v`` is the integer 1 (``True`` and ``1.0`` compare equal to 1 but are not)."""
    return type(v) is int and v == 1


def _opt_int(v: Any, what: str, lo: int = 0, hi: int = MAX_VERSION) -> int | None:
    return None if v is None else _int(v, what, lo, hi)


def _num(v: Any, what: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise _fail(what, "must be a finite number")
    try:
        finite = math.isfinite(v)  # an int beyond the float range raises OverflowError
    except OverflowError:
        finite = False
    if not finite:
        raise _fail(what, "must be a finite number")
    if not lo <= v <= hi:
        raise _fail(what, f"must be in [{lo}, {hi}]")
    return float(v)


def _opt_num(v: Any, what: str, lo: float = -math.inf, hi: float = math.inf) -> float | None:
    return None if v is None else _num(v, what, lo, hi)


def _str(v: Any, what: str, max_len: int = 256, pattern: re.Pattern[str] | None = None) -> str:
    if (
        not isinstance(v, str)
        or len(v) > max_len
        or (pattern is not None and not pattern.fullmatch(v))
    ):
        extra = f" matching {pattern.pattern}" if pattern is not None else ""
        raise _fail(what, f"must be a string of at most {max_len} characters{extra}")
    return v


def _opt_str(v: Any, what: str, max_len: int = 256) -> str | None:
    return None if v is None else _str(v, what, max_len)


def _list(v: Any, what: str, max_len: int = MAX_LIST) -> list[Any]:
    if not isinstance(v, list) or len(v) > max_len:
        raise _fail(what, f"must be a list of at most {max_len} entries")
    return v


def _counts(v: Any, what: str, max_len: int = 1024) -> tuple[int, ...]:
    items = _list(v, what, max_len)
    # Whole-list checks run in C (type() excludes bool, unlike isinstance).
    if items and (set(map(type, items)) != {int} or min(items) < 0 or max(items) > MAX_VERSION):
        raise _fail(f"{what}[]", f"must be integers in [0, {MAX_VERSION}]")
    return tuple(items)


def _ts(v: Any, what: str) -> datetime:
    try:
        return parse_utc(v)
    except (ValueError, TypeError) as exc:
        raise _fail(what, str(exc)) from exc


def _finite_or_none(v: float | None) -> float | None:
    """Round a statistic for the wire; NaN/inf (which canonical JSON refuses) become None."""
    if v is None or not math.isfinite(v):
        return None
    return float(round(v, 6))


# ------------------------------------------------------------- desired state


@dataclass(frozen=True)
class ModelRef:
    """A model by name and integer version (as in the bundle manifest)."""

    name: str
    version: int

    def __post_init__(self) -> None:
        _str(self.name, "model.name", 64, _NAME_RE)
        _int(self.version, "model.version", 1)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version}

    @classmethod
    def from_dict(cls, d: Any, what: str = "model") -> ModelRef:
        d = _keys(d, what, ("name", "version"))
        return cls(_str(d["name"], f"{what}.name", 64, _NAME_RE), _int(d["version"], what, 1))


@dataclass(frozen=True)
class BundleRef:
    """Which bundle file to fetch: the chunk service's id, its sha256 and exact size."""

    id: str
    sha256: str
    size: int

    def __post_init__(self) -> None:
        _str(self.id, "bundle.id", 128, _ID_RE)
        _str(self.sha256, "bundle.sha256", 64, _HEX64)
        _int(self.size, "bundle.size", 1, MAX_BUNDLE_BYTES)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "sha256": self.sha256, "size": self.size}

    @classmethod
    def from_dict(cls, d: Any, what: str = "bundle") -> BundleRef:
        d = _keys(d, what, ("id", "sha256", "size"))
        return cls(
            _str(d["id"], f"{what}.id", 128, _ID_RE),
            _str(d["sha256"], f"{what}.sha256", 64, _HEX64),
            _int(d["size"], f"{what}.size", 1, MAX_BUNDLE_BYTES),
        )


@dataclass(frozen=True)
class ShadowSpec:
    """A candidate model to run in shadow next to the primary one."""

    model: ModelRef
    bundle: BundleRef

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "bundle": self.bundle.to_dict()}

    @classmethod
    def from_dict(cls, d: Any) -> ShadowSpec:
        d = _keys(d, "shadow", ("model", "bundle"))
        return cls(ModelRef.from_dict(d["model"], "shadow.model"), BundleRef.from_dict(d["bundle"]))


@dataclass(frozen=True)
class DesiredTarget:
    """Exactly one of a device id or a group name."""

    device: str | None = None
    group: str | None = None

    def __post_init__(self) -> None:
        if (self.device is None) == (self.group is None):
            raise _fail("desired.target", "needs exactly one of device or group")
        name = self.device if self.device is not None else self.group
        _str(name, "desired.target", 64, _DEVICE_RE)

    @property
    def key(self) -> str:
        """A stable key for per-target bookkeeping: ``device:ID`` or ``group:NAME``."""
        return f"device:{self.device}" if self.device is not None else f"group:{self.group}"

    @property
    def topic(self) -> DeviceTopic | GroupTopic:
        """The retained topic this desired state is published on."""
        if self.device is not None:
            return DeviceTopic.desired(self.device)
        assert self.group is not None
        return GroupTopic(self.group)

    def to_dict(self) -> dict[str, str]:
        if self.device is not None:
            return {"device": self.device}
        assert self.group is not None
        return {"group": self.group}

    @classmethod
    def from_dict(cls, d: Any) -> DesiredTarget:
        if not isinstance(d, dict) or len(d) != 1 or not set(d) <= {"device", "group"}:
            raise _fail("desired.target", 'must be {"device": ID} or {"group": NAME}')
        return cls(device=d.get("device"), group=d.get("group"))


@dataclass(frozen=True)
class DesiredState:
    """What the server wants a device (or a group) to run.

    ``version`` is the director's sequence number for this target: every new
    desired state for the same target carries a strictly higher one.
    """

    target: DesiredTarget
    version: int
    model: ModelRef
    bundle: BundleRef
    issued: datetime
    expires: datetime
    shadow: ShadowSpec | None = None
    rollout_id: str | None = None

    def __post_init__(self) -> None:
        _int(self.version, "desired.version", 1)
        if self.rollout_id is not None:
            _str(self.rollout_id, "desired.rollout_id", 128, _ID_RE)
        if self.expires <= self.issued:
            raise _fail("desired", "expires must be after issued")

    def to_signed_dict(self) -> dict[str, Any]:
        """The ``signed`` body (what director keys sign, canonically encoded)."""
        return {
            "_type": DESIRED_STATE_TYPE,
            "spec_version": 1,
            "target": self.target.to_dict(),
            "version": self.version,
            "model": self.model.to_dict(),
            "bundle": self.bundle.to_dict(),
            "shadow": None if self.shadow is None else self.shadow.to_dict(),
            "rollout_id": self.rollout_id,
            "issued": format_utc(self.issued),
            "expires": format_utc(self.expires),
        }

    @classmethod
    def from_signed_dict(cls, d: Any) -> DesiredState:
        """Parse a ``signed`` body.

        Raises:
            MalformedMessageError: any structural problem.
        """
        d = _keys(
            d,
            "desired",
            ("_type", "spec_version", "target", "version", "model", "bundle", "shadow",
             "rollout_id", "issued", "expires"),
        )  # fmt: skip
        if d["_type"] != DESIRED_STATE_TYPE or not _is_one(d["spec_version"]):
            raise _fail("desired", f"_type must be {DESIRED_STATE_TYPE!r} with spec_version 1")
        rollout = d["rollout_id"]
        return cls(
            target=DesiredTarget.from_dict(d["target"]),
            version=_int(d["version"], "desired.version", 1),
            model=ModelRef.from_dict(d["model"]),
            bundle=BundleRef.from_dict(d["bundle"]),
            shadow=None if d["shadow"] is None else ShadowSpec.from_dict(d["shadow"]),
            rollout_id=None if rollout is None else _str(rollout, "rollout_id", 128, _ID_RE),
            issued=_ts(d["issued"], "desired.issued"),
            expires=_ts(d["expires"], "desired.expires"),
        )

    def sign(self, keys: Sequence[SigningKey]) -> SignedDesiredState:
        """Sign with director keys (server side)."""
        body = canonical.encode(self.to_signed_dict())
        sigs = tuple(Signature(k.keyid, k.sign(body)) for k in keys)
        return SignedDesiredState(self, sigs)


@dataclass(frozen=True)
class SignedDesiredState:
    """A desired state with its director signatures: the retained payload."""

    state: DesiredState
    signatures: tuple[Signature, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "signed": self.state.to_signed_dict(),
            "signatures": [s.to_dict() for s in self.signatures],
        }

    def to_bytes(self) -> bytes:
        return canonical.encode(self.to_dict())

    @property
    def sha256(self) -> str:
        """Digest of the wire bytes (identifies a retained re-delivery)."""
        return hashlib.sha256(self.to_bytes()).hexdigest()


# ----------------------------------------------------------------------- chunks


@dataclass(frozen=True)
class ChunkRequest:
    """Device -> server: send the blocks of ``bundle_id`` set in ``bitmap``.

    Bit ``i`` of the bitmap (byte ``i // 8``, bit ``i % 8``, least significant
    first, as in AWS IoT OTA streams) asks for block ``first_block + i``;
    block ``b`` covers bytes ``[b * block_size, min((b + 1) * block_size, size))``.
    """

    bundle_id: str
    block_size: int
    first_block: int
    bitmap: bytes
    token: str = ""

    def __post_init__(self) -> None:
        _str(self.bundle_id, "chunk-request.bundle_id", 128, _ID_RE)
        _int(self.block_size, "chunk-request.block_size", MIN_BLOCK_SIZE, MAX_BLOCK_SIZE)
        _int(self.first_block, "chunk-request.first_block", 0, MAX_BUNDLE_BYTES)
        if not isinstance(self.bitmap, bytes) or not 1 <= len(self.bitmap) <= (
            MAX_REQUEST_BLOCKS // 8
        ):
            raise _fail("chunk-request", f"bitmap must be 1 to {MAX_REQUEST_BLOCKS // 8} bytes")
        _str(self.token, "chunk-request.token", 64)

    def blocks(self) -> list[int]:
        """The requested block indexes, ascending."""
        return [
            self.first_block + i
            for i in range(len(self.bitmap) * 8)
            if self.bitmap[i >> 3] & (1 << (i & 7))
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "chunk-request",
            "bundle_id": self.bundle_id,
            "block_size": self.block_size,
            "first_block": self.first_block,
            "bitmap": base64.b64encode(self.bitmap).decode("ascii"),
            "token": self.token,
        }

    def to_bytes(self) -> bytes:
        return canonical.encode(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> ChunkRequest:
        """Parse a request.

        Raises:
            MalformedMessageError: any problem.
        """
        d = _keys(
            _decode(data, "chunk-request", MAX_CHUNK_REQUEST_BYTES),
            "chunk-request",
            ("type", "bundle_id", "block_size", "first_block", "bitmap", "token"),
        )
        if d["type"] != "chunk-request":
            raise _fail("chunk-request", "type must be 'chunk-request'")
        try:
            bitmap = base64.b64decode(_str(d["bitmap"], "bitmap", 1024), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _fail("chunk-request", "bitmap is not base64") from exc
        return cls(d["bundle_id"], d["block_size"], d["first_block"], bitmap, d["token"])


def _frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = canonical.encode(header)
    return CHUNK_MAGIC + struct.pack(">H", len(head)) + head + payload


@dataclass(frozen=True)
class ChunkData:
    """Server -> device: one block.

    Frame: ``b"EFC1"`` | uint16 big-endian header length | canonical JSON
    header ``{"type": "chunk-data", "bundle_id", "block", "block_size",
    "file_size", "token"}`` | the block's raw bytes (exactly ``block_size``
    bytes, fewer only for the last block).
    """

    bundle_id: str
    block: int
    block_size: int
    file_size: int
    data: bytes
    token: str = ""

    def __post_init__(self) -> None:
        _str(self.bundle_id, "chunk-data.bundle_id", 128, _ID_RE)
        _int(self.block_size, "chunk-data.block_size", MIN_BLOCK_SIZE, MAX_BLOCK_SIZE)
        _int(self.file_size, "chunk-data.file_size", 1, MAX_BUNDLE_BYTES)
        _int(self.block, "chunk-data.block", 0, (self.file_size - 1) // self.block_size)
        _str(self.token, "chunk-data.token", 64)
        expected = min(self.block_size, self.file_size - self.block * self.block_size)
        if len(self.data) != expected:
            raise _fail(
                "chunk-data",
                f"block {self.block} carries {len(self.data)} bytes, expected {expected}",
            )

    @property
    def offset(self) -> int:
        """Byte offset of this block in the bundle."""
        return self.block * self.block_size

    def to_bytes(self) -> bytes:
        return _frame(
            {
                "type": "chunk-data",
                "bundle_id": self.bundle_id,
                "block": self.block,
                "block_size": self.block_size,
                "file_size": self.file_size,
                "token": self.token,
            },
            self.data,
        )


@dataclass(frozen=True)
class ChunkError:
    """Server -> device, same frame without data: the request cannot be served.

    ``reason`` is one of ``unknown-bundle``, ``bad-request``, ``busy``.
    """

    bundle_id: str
    reason: str
    token: str = ""

    REASONS = ("unknown-bundle", "bad-request", "busy")

    def __post_init__(self) -> None:
        _str(self.bundle_id, "chunk-error.bundle_id", 128, _ID_RE)
        if self.reason not in self.REASONS:
            raise _fail("chunk-error", f"reason must be one of {self.REASONS}")
        _str(self.token, "chunk-error.token", 64)

    def to_bytes(self) -> bytes:
        return _frame(
            {
                "type": "chunk-error",
                "bundle_id": self.bundle_id,
                "reason": self.reason,
                "token": self.token,
            }
        )


def parse_chunk_frame(
    data: bytes, *, max_block_size: int = MAX_BLOCK_SIZE
) -> ChunkData | ChunkError:
    """Parse a frame from the chunk-data topic.

    The header length and the payload length are checked before anything is
    copied: a frame larger than one block plus the header is refused at once.

    Raises:
        MalformedMessageError: bad magic, header or sizes (including a block
            with more or fewer bytes than its position allows).
    """
    what = "chunk frame"
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _fail(what, "payload must be bytes")
    view = memoryview(data)
    if len(view) > 6 + MAX_CHUNK_HEADER_BYTES + max_block_size:
        raise _fail(what, f"{len(view)} bytes is more than one block of {max_block_size} allows")
    if len(view) < 6 or bytes(view[:4]) != CHUNK_MAGIC:
        raise _fail(what, "does not start with the EFC1 magic")
    (head_len,) = struct.unpack(">H", view[4:6])
    if head_len > MAX_CHUNK_HEADER_BYTES or 6 + head_len > len(view):
        raise _fail(what, "header length is out of range")
    header = _decode(bytes(view[6 : 6 + head_len]), what, MAX_CHUNK_HEADER_BYTES)
    payload = view[6 + head_len :]
    kind = header.get("type")
    if kind == "chunk-error":
        h = _keys(header, what, ("type", "bundle_id", "reason", "token"))
        if len(payload):
            raise _fail(what, "a chunk-error frame carries no data")
        return ChunkError(h["bundle_id"], h["reason"], h["token"])
    if kind != "chunk-data":
        raise _fail(what, "type must be chunk-data or chunk-error")
    h = _keys(header, what, ("type", "bundle_id", "block", "block_size", "file_size", "token"))
    block_size = _int(h["block_size"], "chunk-data.block_size", MIN_BLOCK_SIZE, max_block_size)
    if len(payload) > block_size:
        raise _fail(what, f"{len(payload)} data bytes exceed the block size {block_size}")
    return ChunkData(
        h["bundle_id"], h["block"], block_size, h["file_size"], bytes(payload), h["token"]
    )


# -------------------------------------------------------------------- telemetry


@dataclass(frozen=True)
class LatencySummary:
    """Inference latency over a window, in milliseconds."""

    count: int
    mean: float
    p50: float
    p95: float
    p99: float
    max: float

    _KEYS = ("count", "mean", "p50", "p95", "p99", "max")

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._KEYS}

    @classmethod
    def from_dict(cls, d: Any) -> LatencySummary:
        d = _keys(d, "latency_ms", cls._KEYS)
        return cls(
            _int(d["count"], "latency_ms.count", 1),
            *(_num(d[k], f"latency_ms.{k}", 0) for k in cls._KEYS[1:]),
        )


@dataclass(frozen=True)
class OutputSummary:
    """Distribution of one model output over a window.

    ``classes`` counts the argmax over the last axis per row when the output
    looks like class scores (rank >= 2, 2-1024 columns); otherwise ``None``.
    """

    index: int
    count: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    classes: tuple[int, ...] | None = None
    confidence: tuple[int, ...] | None = None  # added later, optional
    counts: tuple[int, ...] | None = None  # added later, optional

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "count": self.count,
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            "classes": None if self.classes is None else list(self.classes),
            "confidence": None if self.confidence is None else list(self.confidence),
            "counts": None if self.counts is None else list(self.counts),
        }

    @classmethod
    def from_dict(cls, d: Any) -> OutputSummary:
        w = "outputs[]"
        d = _keys(
            d, w, ("index", "count", "mean", "std", "min", "max", "classes"),
            ("confidence", "counts"),
        )  # fmt: skip
        classes, confidence, counts = d["classes"], d.get("confidence"), d.get("counts")
        return cls(
            _int(d["index"], f"{w}.index", 0, 63),
            _int(d["count"], f"{w}.count"),
            _opt_num(d["mean"], f"{w}.mean"),
            _opt_num(d["std"], f"{w}.std", 0),
            _opt_num(d["min"], f"{w}.min"),
            _opt_num(d["max"], f"{w}.max"),
            None if classes is None else _counts(classes, f"{w}.classes"),
            None if confidence is None else _counts(confidence, f"{w}.confidence", 100),
            None if counts is None else _counts(counts, f"{w}.counts", 100),
        )


@dataclass(frozen=True)
class FeatureCounts:
    """Histogram of one feature column over the manifest's drift-reference edges."""

    input: str
    index: int
    name: str
    counts: tuple[int, ...]
    nonfinite: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "index": self.index,
            "name": self.name,
            "counts": list(self.counts),
            "nonfinite": self.nonfinite,
        }

    _KEYS = frozenset(("input", "index", "name", "counts", "nonfinite"))

    @classmethod
    def from_dict(cls, d: Any) -> FeatureCounts:
        # Fast path (several of these per telemetry record on the server's ingest
        # path): the same checks as below, inline; any doubt falls through to the
        # field-by-field checks, which name the problem.
        if type(d) is dict and d.keys() == cls._KEYS:
            inp, index, name, counts, nonfinite = (
                d["input"], d["index"], d["name"], d["counts"], d["nonfinite"]
            )  # fmt: skip
            if (
                type(inp) is str
                and len(inp) <= 256
                and type(name) is str
                and len(name) <= 256
                and type(index) is int
                and 0 <= index <= 1 << 30
                and type(nonfinite) is int
                and 0 <= nonfinite <= MAX_VERSION
                and type(counts) is list
                and len(counts) <= 100
                and (
                    not counts
                    or (
                        set(map(type, counts)) == {int}
                        and min(counts) >= 0
                        and max(counts) <= MAX_VERSION
                    )
                )
            ):
                return cls(inp, index, name, tuple(counts), nonfinite)
        w = "features[]"
        d = _keys(d, w, ("input", "index", "name", "counts", "nonfinite"))
        return cls(
            _str(d["input"], f"{w}.input"),
            _int(d["index"], f"{w}.index", 0, 1 << 30),
            _str(d["name"], f"{w}.name"),
            _counts(d["counts"], f"{w}.counts", 100),
            _int(d["nonfinite"], f"{w}.nonfinite"),
        )


@dataclass(frozen=True)
class ChannelCounts:
    """Histogram of all values of one input channel, with their mean and std."""

    input: str
    channel: int
    counts: tuple[int, ...]
    nonfinite: int = 0
    mean: float | None = None
    std: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "input": self.input,
            "channel": self.channel,
            "counts": list(self.counts),
            "nonfinite": self.nonfinite,
            "mean": self.mean,
            "std": self.std,
        }

    @classmethod
    def from_dict(cls, d: Any) -> ChannelCounts:
        w = "channels[]"
        d = _keys(d, w, ("input", "channel", "counts", "nonfinite", "mean", "std"))
        return cls(
            _str(d["input"], f"{w}.input"),
            _int(d["channel"], f"{w}.channel", 0, 1 << 20),
            _counts(d["counts"], f"{w}.counts", 100),
            _int(d["nonfinite"], f"{w}.nonfinite"),
            _opt_num(d["mean"], f"{w}.mean"),
            _opt_num(d["std"], f"{w}.std", 0),
        )


@dataclass(frozen=True)
class ShadowSummary:
    """The shadow model's comparison with the serving one.

    Counters are cumulative since this shadow model started (the agent's
    shadow runner keeps them); a receiver diffs successive records of the same
    ``model`` for per-window figures.
    """

    model: ModelRef | None
    compared: int
    dropped: int = 0  # comparisons skipped because the shadow queue was full
    agreement: float | None = None  # top-1 agreement in [0, 1] (classifiers)
    mean_abs_diff: float | None = None  # mean |shadow - serving| (other outputs)
    latency_p50_ms: float | None = None  # shadow model
    active_latency_p50_ms: float | None = None  # serving model
    labelled: int = 0  # comparisons with a feedback label
    active_accuracy: float | None = None
    shadow_accuracy: float | None = None

    _KEYS = (
        "model", "compared", "dropped", "agreement", "mean_abs_diff", "latency_p50_ms",
        "active_latency_p50_ms", "labelled", "active_accuracy", "shadow_accuracy",
    )  # fmt: skip

    def __post_init__(self) -> None:
        _int(self.compared, "shadow.compared")
        _int(self.dropped, "shadow.dropped")
        _int(self.labelled, "shadow.labelled")
        for key in ("agreement", "active_accuracy", "shadow_accuracy"):
            _opt_num(getattr(self, key), f"shadow.{key}", 0, 1)
        for key in ("mean_abs_diff", "latency_p50_ms", "active_latency_p50_ms"):
            _opt_num(getattr(self, key), f"shadow.{key}", 0)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self._KEYS}
        out["model"] = None if self.model is None else self.model.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Any) -> ShadowSummary:
        d = _keys(d, "shadow", cls._KEYS)
        fields = {k: d[k] for k in cls._KEYS}
        fields["model"] = (
            None if d["model"] is None else ModelRef.from_dict(d["model"], "shadow.model")
        )
        return cls(**fields)


@dataclass(frozen=True)
class Health:
    """Device health at window close; ``None`` where the platform does not say."""

    cpu_percent: float | None = None  # this process, % of one core over the window
    load1: float | None = None  # 1-minute load average
    rss_bytes: int | None = None
    disk_free_bytes: int | None = None  # on the state directory's filesystem
    temperature_c: float | None = None  # hottest thermal zone

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpu_percent": self.cpu_percent,
            "load1": self.load1,
            "rss_bytes": self.rss_bytes,
            "disk_free_bytes": self.disk_free_bytes,
            "temperature_c": self.temperature_c,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Health:
        w = "health"
        d = _keys(d, w, ("cpu_percent", "load1", "rss_bytes", "disk_free_bytes", "temperature_c"))
        return cls(
            _opt_num(d["cpu_percent"], f"{w}.cpu_percent", 0),
            _opt_num(d["load1"], f"{w}.load1", 0),
            _opt_int(d["rss_bytes"], f"{w}.rss_bytes"),
            _opt_int(d["disk_free_bytes"], f"{w}.disk_free_bytes"),
            _opt_num(d["temperature_c"], f"{w}.temperature_c", -273.15, 1000),
        )


@dataclass(frozen=True)
class UpdateEvent:
    """One step of an update, with the reason when it failed or was refused.

    ``kind`` is a short lowercase word: ``desired-accepted``,
    ``desired-rejected``, ``download-started``, ``download-complete``,
    ``download-failed``, ``install-started``, ``installed``,
    ``install-failed``, ``rolled-back``, ``committed``.
    """

    ts: float  # unix seconds
    kind: str
    desired_version: int | None = None
    model: ModelRef | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        _num(self.ts, "event.ts", 0, MAX_UNIX_TS)
        _str(self.kind, "event.kind", 32, _KIND_RE)
        if self.reason is not None:
            _str(self.reason, "event.reason", 1024)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ts": self.ts,
            "kind": self.kind,
            "desired_version": self.desired_version,
            "model": None if self.model is None else self.model.to_dict(),
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, d: Any) -> UpdateEvent:
        d = _keys(d, "event", ("ts", "kind", "desired_version", "model", "reason"))
        return cls(
            _num(d["ts"], "event.ts", 0, MAX_UNIX_TS),
            _str(d["kind"], "event.kind", 32, _KIND_RE),
            _opt_int(d["desired_version"], "event.desired_version", 1),
            None if d["model"] is None else ModelRef.from_dict(d["model"], "event.model"),
            _opt_str(d["reason"], "event.reason", 1024),
        )


@dataclass(frozen=True)
class SpoolCounters:
    """Telemetry that never left the device, counted since the previous record."""

    dropped: int = 0  # oldest records evicted by the spool bound
    enospc: int = 0  # records lost because the disk was full
    write_errors: int = 0  # records lost to other I/O errors
    rejected: int = 0  # records the broker refused with a permanent reason code

    def to_dict(self) -> dict[str, int]:
        return {
            "dropped": self.dropped,
            "enospc": self.enospc,
            "write_errors": self.write_errors,
            "rejected": self.rejected,
        }

    @classmethod
    def from_dict(cls, d: Any) -> SpoolCounters:
        d = _keys(d, "spool", ("dropped", "enospc", "write_errors", "rejected"))
        return cls(*(_int(d[k], f"spool.{k}") for k in ("dropped", "enospc", "write_errors",
                                                         "rejected")))  # fmt: skip

    def __add__(self, other: SpoolCounters) -> SpoolCounters:
        return SpoolCounters(
            self.dropped + other.dropped,
            self.enospc + other.enospc,
            self.write_errors + other.write_errors,
            self.rejected + other.rejected,
        )


@dataclass(frozen=True)
class ArraySample:
    """One array as little-endian C-order bytes (the manifest's golden-array form)."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPE_SIZES:
            raise _fail("sample", f"dtype {self.dtype!r} is not supported")
        if len(self.shape) > 8 or any(
            not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in self.shape
        ):
            raise _fail("sample", "shape must be at most 8 non-negative integers")
        item = _DTYPE_SIZES[self.dtype]
        if len(self.data) > MAX_SAMPLE_BYTES or len(self.data) != math.prod(self.shape) * item:
            raise _fail("sample", "data length does not match dtype and shape (or is too large)")

    def to_dict(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "shape": list(self.shape),
            "data_b64": base64.b64encode(self.data).decode("ascii"),
        }

    @classmethod
    def from_dict(cls, d: Any) -> ArraySample:
        d = _keys(d, "sample array", ("dtype", "shape", "data_b64"))
        try:
            raw = base64.b64decode(
                _str(d["data_b64"], "data_b64", MAX_SAMPLE_BYTES * 2), validate=True
            )
        except (binascii.Error, ValueError) as exc:
            raise _fail("sample", "data_b64 is not base64") from exc
        shape = tuple(_int(n, "sample.shape[]", 0, 1 << 30) for n in _list(d["shape"], "shape", 8))
        return cls(_str(d["dtype"], "sample.dtype", 16), shape, raw)


@dataclass(frozen=True)
class Sample:
    """A sampled prediction: its inputs and outputs (sampling is off by default)."""

    prediction_id: int
    inputs: Mapping[str, ArraySample]
    outputs: tuple[ArraySample, ...]
    inclusion_probability: float | None = None  # added later, optional: in (0, 1]
    exploration: bool = False  # added later, optional

    def to_dict(self) -> dict[str, Any]:
        return {
            "prediction_id": self.prediction_id,
            "inputs": {k: v.to_dict() for k, v in self.inputs.items()},
            "outputs": [o.to_dict() for o in self.outputs],
            "inclusion_probability": self.inclusion_probability,
            "exploration": self.exploration,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Sample:
        d = _keys(
            d, "samples[]", ("prediction_id", "inputs", "outputs"),
            ("inclusion_probability", "exploration"),
        )  # fmt: skip
        inputs = d["inputs"]
        if not isinstance(inputs, dict) or len(inputs) > 64:
            raise _fail("samples[]", "inputs must be an object of at most 64 arrays")
        p = _opt_num(d.get("inclusion_probability"), "samples[].inclusion_probability", 0, 1)
        if p == 0:
            raise _fail("samples[].inclusion_probability", "must be in (0, 1]")
        exploration = d.get("exploration", False)
        if type(exploration) is not bool:
            raise _fail("samples[].exploration", "must be a boolean")
        return cls(
            _int(d["prediction_id"], "samples[].prediction_id"),
            {_str(k, "input name"): ArraySample.from_dict(v) for k, v in inputs.items()},
            tuple(ArraySample.from_dict(o) for o in _list(d["outputs"], "outputs", 64)),
            p,
            exploration,
        )


Label = int | float | str | bool


@dataclass(frozen=True)
class Feedback:
    """A ground-truth label for a prediction, with what the model predicted if known."""

    prediction_id: int
    label: Label
    predicted: int | None = None  # argmax of output 0's first row, when it was still known
    exploration: bool | None = None  # added later, optional, as the next two
    predicted_at: float | None = None
    labelled_at: float | None = None

    def __post_init__(self) -> None:
        lab = self.label
        if isinstance(lab, str):
            _str(lab, "feedback.label", 256)
        elif isinstance(lab, float) and not math.isfinite(lab):
            raise _fail("feedback", "label must be finite")
        elif not isinstance(lab, (int, float)):
            raise _fail("feedback", "label must be a number, string or boolean")

    def to_dict(self) -> dict[str, Any]:
        return {
            "prediction_id": self.prediction_id,
            "label": self.label,
            "predicted": self.predicted,
            "exploration": self.exploration,
            "predicted_at": self.predicted_at,
            "labelled_at": self.labelled_at,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Feedback:
        d = _keys(
            d, "feedback[]", ("prediction_id", "label", "predicted"),
            ("exploration", "predicted_at", "labelled_at"),
        )  # fmt: skip
        exploration = d.get("exploration")
        if exploration is not None and type(exploration) is not bool:
            raise _fail("feedback[].exploration", "must be a boolean or null")
        return cls(
            _int(d["prediction_id"], "feedback[].prediction_id"),
            d["label"],
            _opt_int(d["predicted"], "feedback[].predicted"),
            exploration,
            _opt_num(d.get("predicted_at"), "feedback[].predicted_at", 0, MAX_UNIX_TS),
            _opt_num(d.get("labelled_at"), "feedback[].labelled_at", 0, MAX_UNIX_TS),
        )


@dataclass(frozen=True)
class TelemetryRecord:
    """One telemetry window of one device.

    ``seq`` increases by at least one per record of a device, across agent
    restarts; a receiver dedupes on ``(device_id, seq)`` (a record may arrive
    twice when a PUBACK was lost) and may detect loss from gaps together with
    the ``spool`` counters.
    """

    device_id: str
    seq: int
    window_start: float  # unix seconds
    window_end: float  # unix seconds
    model: ModelRef | None = None
    predictions: int = 0
    errors: int = 0
    error_kinds: Mapping[str, int] = field(default_factory=dict)
    latency_ms: LatencySummary | None = None
    outputs: tuple[OutputSummary, ...] = ()
    features: tuple[FeatureCounts, ...] = ()
    channels: tuple[ChannelCounts, ...] = ()
    shadow: ShadowSummary | None = None
    health: Health = field(default_factory=Health)
    events: tuple[UpdateEvent, ...] = ()
    spool: SpoolCounters = field(default_factory=SpoolCounters)
    dropped_observations: int = 0  # hot-path buffer overflows in this window
    samples: tuple[Sample, ...] = ()
    feedback: tuple[Feedback, ...] = ()

    def __post_init__(self) -> None:
        _str(self.device_id, "telemetry.device_id", 64, _DEVICE_RE)
        _int(self.seq, "telemetry.seq", 1)
        _num(self.window_start, "telemetry.window_start", 0, MAX_UNIX_TS)
        if _num(self.window_end, "telemetry.window_end", 0, MAX_UNIX_TS) < self.window_start:
            raise _fail("telemetry", "window_end is before window_start")
        if len(self.error_kinds) > 32:
            raise _fail("telemetry", "at most 32 error kinds")
        for k, v in self.error_kinds.items():
            _str(k, "telemetry.error_kinds key", 32, _KIND_RE)
            _int(v, "telemetry.error_kinds value")

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "telemetry",
            "spec_version": 1,
            "device_id": self.device_id,
            "seq": self.seq,
            "window_start": self.window_start,
            "window_end": self.window_end,
            "model": None if self.model is None else self.model.to_dict(),
            "predictions": self.predictions,
            "errors": self.errors,
            "error_kinds": dict(self.error_kinds),
            "latency_ms": None if self.latency_ms is None else self.latency_ms.to_dict(),
            "outputs": [o.to_dict() for o in self.outputs],
            "features": [f.to_dict() for f in self.features],
            "channels": [c.to_dict() for c in self.channels],
            "shadow": None if self.shadow is None else self.shadow.to_dict(),
            "health": self.health.to_dict(),
            "events": [e.to_dict() for e in self.events],
            "spool": self.spool.to_dict(),
            "dropped_observations": self.dropped_observations,
            "samples": [s.to_dict() for s in self.samples],
            "feedback": [f.to_dict() for f in self.feedback],
        }

    def to_bytes(self) -> bytes:
        return canonical.encode(self.to_dict())

    _KEYS = (
        "type", "spec_version", "device_id", "seq", "window_start", "window_end", "model",
        "predictions", "errors", "error_kinds", "latency_ms", "outputs", "features",
        "channels", "shadow", "health", "events", "spool", "dropped_observations", "samples",
        "feedback",
    )  # fmt: skip

    @classmethod
    def from_dict(cls, d: Any) -> TelemetryRecord:
        """Parse a decoded record.

        Raises:
            MalformedMessageError: any problem.
        """
        d = _keys(d, "telemetry", cls._KEYS)
        if d["type"] != "telemetry" or not _is_one(d["spec_version"]):
            raise _fail("telemetry", "type must be 'telemetry' with spec_version 1")
        kinds = d["error_kinds"]
        if not isinstance(kinds, dict):
            raise _fail("telemetry", "error_kinds must be an object")
        return cls(
            device_id=d["device_id"],
            seq=d["seq"],
            window_start=_num(d["window_start"], "window_start", 0, MAX_UNIX_TS),
            window_end=_num(d["window_end"], "window_end", 0, MAX_UNIX_TS),
            model=None if d["model"] is None else ModelRef.from_dict(d["model"]),
            predictions=_int(d["predictions"], "predictions"),
            errors=_int(d["errors"], "errors"),
            error_kinds=kinds,
            latency_ms=None
            if d["latency_ms"] is None
            else LatencySummary.from_dict(d["latency_ms"]),
            outputs=tuple(OutputSummary.from_dict(o) for o in _list(d["outputs"], "outputs", 64)),
            features=tuple(FeatureCounts.from_dict(f) for f in _list(d["features"], "features")),
            channels=tuple(ChannelCounts.from_dict(c) for c in _list(d["channels"], "channels")),
            shadow=None if d["shadow"] is None else ShadowSummary.from_dict(d["shadow"]),
            health=Health.from_dict(d["health"]),
            events=tuple(UpdateEvent.from_dict(e) for e in _list(d["events"], "events", 256)),
            spool=SpoolCounters.from_dict(d["spool"]),
            dropped_observations=_int(d["dropped_observations"], "dropped_observations"),
            samples=tuple(Sample.from_dict(s) for s in _list(d["samples"], "samples", 256)),
            feedback=tuple(Feedback.from_dict(f) for f in _list(d["feedback"], "feedback")),
        )

    @classmethod
    def from_bytes(cls, data: bytes, *, max_bytes: int = MAX_TELEMETRY_BYTES) -> TelemetryRecord:
        """Parse a record payload.

        Raises:
            MalformedMessageError: oversized or malformed.
        """
        # Telemetry is not signed, so its spelling need not be canonical: skipping
        # the re-encoding check halves the parse cost on the server's ingest path.
        return cls.from_dict(_decode(data, "telemetry", max_bytes, require_canonical=False))


# ---------------------------------------------------------------- status, facts


@dataclass(frozen=True)
class StatusMessage:
    """Retained device status: online/offline plus the latest update step.

    The agent publishes ``online`` on every connect and after every update
    step; the broker publishes the ``offline`` last will (set at connect) when
    the connection dies without a DISCONNECT.
    """

    device_id: str
    state: str  # "online" | "offline"
    ts: float  # unix seconds
    agent_version: str | None = None
    model: ModelRef | None = None
    desired_version: int | None = None
    update: UpdateEvent | None = None

    STATES = ("online", "offline")

    def __post_init__(self) -> None:
        _str(self.device_id, "status.device_id", 64, _DEVICE_RE)
        if self.state not in self.STATES:
            raise _fail("status", f"state must be one of {self.STATES}")
        _num(self.ts, "status.ts", 0, MAX_UNIX_TS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "status",
            "device_id": self.device_id,
            "state": self.state,
            "ts": self.ts,
            "agent_version": self.agent_version,
            "model": None if self.model is None else self.model.to_dict(),
            "desired_version": self.desired_version,
            "update": None if self.update is None else self.update.to_dict(),
        }

    def to_bytes(self) -> bytes:
        return canonical.encode(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> StatusMessage:
        """Parse a status payload.

        Raises:
            MalformedMessageError: oversized or malformed.
        """
        d = _keys(
            _decode(data, "status", MAX_SMALL_BYTES),
            "status",
            ("type", "device_id", "state", "ts", "agent_version", "model", "desired_version",
             "update"),
        )  # fmt: skip
        if d["type"] != "status":
            raise _fail("status", "type must be 'status'")
        return cls(
            d["device_id"],
            d["state"],
            _num(d["ts"], "status.ts", 0, MAX_UNIX_TS),
            _opt_str(d["agent_version"], "status.agent_version", 32),
            None if d["model"] is None else ModelRef.from_dict(d["model"]),
            _opt_int(d["desired_version"], "status.desired_version", 1),
            None if d["update"] is None else UpdateEvent.from_dict(d["update"]),
        )


@dataclass(frozen=True)
class DeviceFactsMessage:
    """Retained hardware and software facts, published on every connect."""

    device_id: str
    device_class: str
    arch: str
    ram_bytes: int | None
    cpu_count: int | None
    onnxruntime_version: str | None
    agent_version: str
    max_opset: int | None
    python_version: str
    os: str

    _KEYS = (
        "device_id", "device_class", "arch", "ram_bytes", "cpu_count", "onnxruntime_version",
        "agent_version", "max_opset", "python_version", "os",
    )  # fmt: skip

    def __post_init__(self) -> None:
        _str(self.device_id, "facts.device_id", 64, _DEVICE_RE)
        _str(self.device_class, "facts.device_class", 64, _DEVICE_RE)
        _str(self.arch, "facts.arch", 64)
        _opt_int(self.ram_bytes, "facts.ram_bytes")
        _opt_int(self.cpu_count, "facts.cpu_count", 1, 1 << 16)
        _opt_str(self.onnxruntime_version, "facts.onnxruntime_version", 32)
        _str(self.agent_version, "facts.agent_version", 32)
        _opt_int(self.max_opset, "facts.max_opset", 1, 1000)
        _str(self.python_version, "facts.python_version", 32)
        _str(self.os, "facts.os", 128)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "facts", **{k: getattr(self, k) for k in self._KEYS}}

    def to_bytes(self) -> bytes:
        return canonical.encode(self.to_dict())

    def to_device_facts(self) -> DeviceFacts:
        """The subset matched against a bundle's targets."""
        return DeviceFacts(
            device_class=self.device_class,
            arch=self.arch,
            agent_version=self.agent_version,
            onnxruntime_version=self.onnxruntime_version,
            max_opset=self.max_opset,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> DeviceFactsMessage:
        """Parse a facts payload.

        Raises:
            MalformedMessageError: oversized or malformed.
        """
        d = _keys(_decode(data, "facts", MAX_SMALL_BYTES), "facts", ("type", *cls._KEYS))
        if d["type"] != "facts":
            raise _fail("facts", "type must be 'facts'")
        return cls(**{k: d[k] for k in cls._KEYS})
