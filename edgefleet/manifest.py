"""The bundle manifest: the signed description of one model release.

Flow: ``Manifest.build(...)`` -> ``to_bytes()`` (canonical JSON, what release
keys sign) -> inside the bundle -> ``Manifest.from_bytes()`` on the device,
*after* the signatures over those very bytes were verified.

Invariants enforced by ``from_dict``: every field has the declared type and
bounds; names and payload paths are plain, safe identifiers (no path
traversal); payload paths are unique; the health-check arrays decode to exactly
the declared shape; the drift reference has monotone edges and proportions
summing to 1. The manifest covers the payload by hash: ``sha256`` of the stored
member bytes and ``uncompressed_sha256`` of the model file.

Drift binning contract (the device computes histograms this way): with the
``bins - 1`` interior cut points ``edges`` of a feature, value ``v`` falls in bin
``numpy.searchsorted(edges, v, side="right")``; outer bins are open-ended.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from edgefleet import canonical
from edgefleet.errors import (
    DuplicateMemberError,
    MalformedBundleError,
    PathTraversalError,
    WrongTargetError,
)
from edgefleet.ids import HEX64_RE, ID_RE, MAX_VERSION, MODEL_NAME_RE, NAME_RE
from edgefleet.timeutil import format_utc, parse_utc

__all__ = [
    "COMPRESSIONS",
    "DTYPE_SIZES",
    "FORMAT_VERSION",
    "DeviceFacts",
    "Manifest",
    "PayloadEntry",
    "Targets",
    "TensorSpec",
    "parse_version",
    "validate_drift_reference",
    "validate_health_check",
    "validate_model_name",
    "validate_payload_path",
]

FORMAT_VERSION = 1
COMPRESSIONS = ("none", "zstd")
MAX_MODEL_VERSION = MAX_VERSION
_NAME_RE = MODEL_NAME_RE
_PATH_RE = ID_RE  # payload paths: one plain file name
_HEX64 = HEX64_RE
_CLASS_RE = NAME_RE
DTYPE_SIZES = {
    "float32": 4, "float16": 2, "float64": 8, "int8": 1, "uint8": 1, "int16": 2,
    "int32": 4, "int64": 8, "bool": 1,
}  # fmt: skip

_TOP_KEYS = {
    "format_version", "model", "created", "expires", "targets", "payload", "io",
    "health_check", "drift_reference", "lineage", "model_card",
}  # fmt: skip


def _fail(msg: str) -> MalformedBundleError:
    return MalformedBundleError(f"manifest: {msg}")


def validate_model_name(name: Any) -> str:
    """Return ``name`` if it is a safe model name (lowercase, digits, ``._-``, <= 64).

    Raises:
        MalformedBundleError: otherwise.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise _fail(f"model name {name!r} must match {_NAME_RE.pattern}")
    return name


def validate_payload_path(path: Any) -> str:
    """Return ``path`` if it is a plain file name.

    Raises:
        PathTraversalError: absolute, contains a separator or ``..``, or odd characters.
    """
    if not isinstance(path, str) or not _PATH_RE.fullmatch(path) or ".." in path:
        raise PathTraversalError(f"payload path {path!r} is not a plain file name")
    return path


def parse_version(text: str) -> tuple[int, ...]:
    """Parse a dotted release version (``1.17.3``; suffixes like ``rc1`` ignored).

    Raises:
        ValueError: no leading numeric components.
    """
    parts = []
    for piece in str(text).split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
        if m.end() != len(piece):
            break
    if not parts:
        raise ValueError(f"not a version: {text!r}")
    return tuple(parts)


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _fail(f"{what} must be an integer in [{lo}, {hi}]")
    return value


def _str(value: Any, what: str, *, max_len: int = 256, allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or len(value) > max_len:
        raise _fail(f"{what} must be a string of at most {max_len} characters")
    return value


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(f"{what} must be an object")
    return value


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: name, element type, shape (ints or symbolic names)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Any, what: str) -> TensorSpec:
        d = _obj(d, what)
        if set(d) != {"name", "dtype", "shape"}:
            raise _fail(f"{what} needs exactly name, dtype, shape")
        name = _str(d["name"], f"{what}.name")
        dtype = d["dtype"]
        if dtype not in DTYPE_SIZES:
            raise _fail(f"{what}.dtype {dtype!r} is not one of {sorted(DTYPE_SIZES)}")
        shape = d["shape"]
        if not isinstance(shape, list) or len(shape) > 8:
            raise _fail(f"{what}.shape must be a list of at most 8 dimensions")
        for dim in shape:
            ok_int = isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0
            if not ok_int and not (isinstance(dim, str) and 0 < len(dim) <= 64):
                raise _fail(f"{what}.shape has an invalid dimension {dim!r}")
        return cls(name, dtype, tuple(shape))


@dataclass(frozen=True)
class DeviceFacts:
    """What a device says about itself, matched against ``Targets``.

    A field left ``None`` is not checked: the agent always fills every field;
    an operator's ``bundle verify`` on a workstation may leave some out.
    """

    device_class: str | None = None
    arch: str | None = None
    agent_version: str | None = None
    onnxruntime_version: str | None = None
    max_opset: int | None = None


@dataclass(frozen=True)
class Targets:
    """Which devices a bundle is for. Empty ``device_classes``/``archs`` mean any."""

    device_classes: tuple[str, ...] = ()
    archs: tuple[str, ...] = ()
    min_agent_version: str = "0.1.0"
    min_onnxruntime_version: str = "1.14.0"
    opset: int = 17

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_classes": list(self.device_classes),
            "archs": list(self.archs),
            "min_agent_version": self.min_agent_version,
            "min_onnxruntime_version": self.min_onnxruntime_version,
            "opset": self.opset,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Targets:
        d = _obj(d, "targets")
        expected = {
            "device_classes",
            "archs",
            "min_agent_version",
            "min_onnxruntime_version",
            "opset",
        }
        if set(d) != expected:
            raise _fail(f"targets needs exactly {sorted(expected)}")
        lists = []
        for key in ("device_classes", "archs"):
            val = d[key]
            if not isinstance(val, list) or len(val) > 64:
                raise _fail(f"targets.{key} must be a list of at most 64 names")
            for item in val:
                if not isinstance(item, str) or not _CLASS_RE.fullmatch(item):
                    raise _fail(f"targets.{key} has an invalid name {item!r}")
            lists.append(tuple(val))
        for key in ("min_agent_version", "min_onnxruntime_version"):
            try:
                parse_version(_str(d[key], f"targets.{key}", max_len=32))
            except ValueError as exc:
                raise _fail(f"targets.{key}: {exc}") from exc
        return cls(
            lists[0], lists[1], d["min_agent_version"], d["min_onnxruntime_version"],
            _int(d["opset"], "targets.opset", 1, 1000),
        )  # fmt: skip

    def check(self, device: DeviceFacts) -> None:
        """Refuse a device this bundle is not for (mix-and-match protection).

        Raises:
            WrongTargetError: naming the first constraint the device fails.
        """
        if (
            self.device_classes
            and device.device_class is not None
            and device.device_class not in self.device_classes
        ):
            raise WrongTargetError(
                f"bundle is for device class(es) {', '.join(self.device_classes)}, "
                f"not {device.device_class}"
            )
        if self.archs and device.arch is not None and device.arch not in self.archs:
            raise WrongTargetError(
                f"bundle is for CPU arch(s) {', '.join(self.archs)}, not {device.arch}"
            )
        if device.agent_version is not None and parse_version(device.agent_version) < parse_version(
            self.min_agent_version
        ):
            raise WrongTargetError(
                f"bundle needs agent >= {self.min_agent_version}, device has {device.agent_version}"
            )
        if device.onnxruntime_version is not None and parse_version(
            device.onnxruntime_version
        ) < parse_version(self.min_onnxruntime_version):
            raise WrongTargetError(
                f"bundle needs onnxruntime >= {self.min_onnxruntime_version}, "
                f"device has {device.onnxruntime_version}"
            )
        if device.max_opset is not None and self.opset > device.max_opset:
            raise WrongTargetError(
                f"model uses opset {self.opset}, device runtime supports up to {device.max_opset}"
            )


@dataclass(frozen=True)
class PayloadEntry:
    """One payload file: how it is stored in the bundle and what it decodes to."""

    path: str
    size: int
    sha256: str
    compression: str
    uncompressed_size: int
    uncompressed_sha256: str

    @property
    def member_name(self) -> str:
        return f"payload/{self.path}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "compression": self.compression,
            "uncompressed_size": self.uncompressed_size,
            "uncompressed_sha256": self.uncompressed_sha256,
        }

    @classmethod
    def from_dict(cls, d: Any, max_size: int) -> PayloadEntry:
        d = _obj(d, "payload entry")
        expected = {
            "path",
            "size",
            "sha256",
            "compression",
            "uncompressed_size",
            "uncompressed_sha256",
        }
        if set(d) != expected:
            raise _fail(f"payload entry needs exactly {sorted(expected)}")
        path = validate_payload_path(d["path"])
        size = _int(d["size"], f"payload {path} size", 1, max_size)
        usize = _int(d["uncompressed_size"], f"payload {path} uncompressed_size", 1, max_size)
        for key in ("sha256", "uncompressed_sha256"):
            if not isinstance(d[key], str) or not _HEX64.fullmatch(d[key]):
                raise _fail(f"payload {path} {key} must be 64 lowercase hex digits")
        if d["compression"] not in COMPRESSIONS:
            raise _fail(f"payload {path} compression must be one of {COMPRESSIONS}")
        if d["compression"] == "none" and (
            usize != size or d["uncompressed_sha256"] != d["sha256"]
        ):
            raise _fail(f"payload {path} is uncompressed but declares different sizes or hashes")
        return cls(path, size, d["sha256"], d["compression"], usize, d["uncompressed_sha256"])


def _check_array(spec: Any, what: str, max_bytes: int) -> None:
    spec = _obj(spec, what)
    if set(spec) != {"dtype", "shape", "data_b64"}:
        raise _fail(f"{what} needs exactly dtype, shape, data_b64")
    if spec["dtype"] not in DTYPE_SIZES:
        raise _fail(f"{what}.dtype {spec['dtype']!r} is not supported")
    shape = spec["shape"]
    if not isinstance(shape, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise _fail(f"{what}.shape must be a list of non-negative integers")
    count = math.prod(shape) * DTYPE_SIZES[spec["dtype"]]
    if count > max_bytes:
        raise _fail(f"{what} is larger than {max_bytes} bytes")
    try:
        raw = base64.b64decode(
            _str(spec["data_b64"], f"{what}.data_b64", max_len=max_bytes * 2), validate=True
        )
    except (binascii.Error, ValueError) as exc:
        raise _fail(f"{what}.data_b64 is not base64") from exc
    if len(raw) != count:
        raise _fail(f"{what}: {len(raw)} data bytes for shape {shape} {spec['dtype']} ({count})")


def _finite(value: Any, what: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    """A JSON number that is finite and in ``[lo, hi]`` (an int too large for a float fails)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _fail(f"{what} must be a number")
    try:
        f = float(value)
    except OverflowError:
        f = math.inf
    if not math.isfinite(f) or not lo <= f <= hi:
        raise _fail(f"{what} must be a finite number in [{lo}, {hi}]")
    return f


def _check_health(d: Any, max_bytes: int) -> dict[str, Any]:
    d = _obj(d, "health_check")
    if not d:
        return d
    expected = {"inputs", "expected_outputs", "tolerance", "latency_budget_ms"}
    if set(d) != expected:
        raise _fail(f"health_check needs exactly {sorted(expected)} (or be empty)")
    for group in ("inputs", "expected_outputs"):
        arrays = _obj(d[group], f"health_check.{group}")
        if not arrays:
            raise _fail(f"health_check.{group} is empty")
        for name, spec in arrays.items():
            _check_array(spec, f"health_check.{group}.{name}", max_bytes)
    tol = _obj(d["tolerance"], "health_check.tolerance")
    if set(tol) != {"atol", "rtol"}:
        raise _fail("health_check.tolerance needs exactly atol and rtol")
    for key in ("atol", "rtol"):
        _finite(tol[key], f"health_check.tolerance.{key}", 0.0)
    if _finite(d["latency_budget_ms"], "health_check.latency_budget_ms", 0.0) <= 0:
        raise _fail("health_check.latency_budget_ms must be a positive number")
    return d


# The keys of one drift-reference entry (as ``edgefleet compress`` writes them); the
# bounds match what a telemetry record may carry (``edgefleet.wire``).
_PROFILE_KEYS = {
    "features": {"input", "index", "name", "edges", "expected"},
    "channels": {"input", "channel", "mean", "std", "edges", "expected"},
}


# Optional in every entry: the reference counts behind ``expected`` and their total
# (profiles written before counts were recorded have neither).
_PROFILE_OPTIONAL = {"counts", "n"}


def _check_profile_entry(e: Any, what: str, group: str, bins: int) -> None:
    e = _obj(e, what)
    keys = set(e)
    if not _PROFILE_KEYS[group] <= keys <= _PROFILE_KEYS[group] | _PROFILE_OPTIONAL:
        raise _fail(
            f"{what} needs exactly {sorted(_PROFILE_KEYS[group])} "
            f"(and optionally {sorted(_PROFILE_OPTIONAL)})"
        )
    if ("counts" in keys) != ("n" in keys):
        raise _fail(f"{what}: counts and n go together")
    if "counts" in keys:
        n = _int(e["n"], f"{what}.n", 1, 1 << 50)
        counts = e["counts"]
        if not isinstance(counts, list) or len(counts) != bins:
            raise _fail(f"{what}.counts must be {bins} non-negative integers summing to n")
        tallies = [_int(c, f"{what}.counts[]", 0, 1 << 50) for c in counts]
        if sum(tallies) != n:
            raise _fail(f"{what}.counts must be {bins} non-negative integers summing to n")
    _str(e["input"], f"{what}.input")
    if group == "features":
        _int(e["index"], f"{what}.index", 0, 1 << 30)
        _str(e["name"], f"{what}.name")
    else:
        _int(e["channel"], f"{what}.channel", 0, 1 << 20)
        _finite(e["mean"], f"{what}.mean")
        _finite(e["std"], f"{what}.std", 0.0)
    edges, expected = e["edges"], e["expected"]
    if not isinstance(edges, list) or len(edges) != bins - 1:
        raise _fail(f"{what}.edges must be {bins - 1} ascending numbers")
    values = [_finite(x, f"{what}.edges[]") for x in edges]
    if any(b < a for a, b in itertools.pairwise(values)):
        raise _fail(f"{what}.edges must be {bins - 1} ascending numbers")
    if not isinstance(expected, list) or len(expected) != bins:
        raise _fail(f"{what}.expected must be {bins} non-negative proportions summing to 1")
    shares = [_finite(x, f"{what}.expected[]", 0.0, 1.0) for x in expected]
    if abs(math.fsum(shares) - 1.0) > 1e-6:
        raise _fail(f"{what}.expected must be {bins} non-negative proportions summing to 1")


def _check_outputs(items: Any, bins: int) -> None:
    """``outputs``: the reference distribution of the model's outputs.

    ``kind: "classes"`` (class-score outputs): the predicted-class counts;
    ``kind: "values"`` (any other numeric output): the counts of its values
    over ``bins - 1`` ascending ``edges``, as for a feature.
    """
    if not isinstance(items, list) or len(items) > 64:
        raise _fail("drift_reference.outputs must be a list of at most 64 entries")
    for i, e in enumerate(items):
        what = f"drift_reference.outputs[{i}]"
        e = _obj(e, what)
        kind = e.get("kind")
        if kind == "values":
            if set(e) != {"index", "name", "kind", "edges", "counts", "n"}:
                raise _fail(f"{what} needs exactly index, name, kind, edges, counts and n")
            edges = e["edges"]
            if not isinstance(edges, list) or len(edges) != bins - 1:
                raise _fail(f"{what}.edges must be {bins - 1} ascending numbers")
            values = [_finite(x, f"{what}.edges[]") for x in edges]
            if any(y < x for x, y in itertools.pairwise(values)):
                raise _fail(f"{what}.edges must be {bins - 1} ascending numbers")
            lo, hi = bins, bins
        elif kind == "classes":
            if set(e) != {"index", "name", "kind", "counts", "n"}:
                raise _fail(f"{what} needs exactly index, name, kind, counts and n")
            lo, hi = 2, 1024
        else:
            raise _fail(f"{what}.kind must be 'classes' or 'values'")
        _int(e["index"], f"{what}.index", 0, 63)
        _str(e["name"], f"{what}.name")
        counts = e["counts"]
        span = f"{lo}" if lo == hi else f"{lo}-{hi}"
        if not isinstance(counts, list) or not lo <= len(counts) <= hi:
            raise _fail(f"{what}.counts must be {span} non-negative integers summing to n")
        tallies = [_int(c, f"{what}.counts[]", 0, 1 << 50) for c in counts]
        if sum(tallies) != _int(e["n"], f"{what}.n", 1, 1 << 50):
            raise _fail(f"{what}.counts must be {span} non-negative integers summing to n")


def _check_calibration(d: Any) -> None:
    """``calibration``: confidence bin -> accuracy on the evaluation data."""
    d = _obj(d, "drift_reference.calibration")
    if set(d) != {"output", "bins"}:
        raise _fail("drift_reference.calibration needs exactly output and bins")
    _int(d["output"], "drift_reference.calibration.output", 0, 63)
    bins = d["bins"]
    if not isinstance(bins, list) or not 1 <= len(bins) <= 100:
        raise _fail("drift_reference.calibration.bins must be a list of 1-100 bins")
    for i, b in enumerate(bins):
        what = f"drift_reference.calibration.bins[{i}]"
        b = _obj(b, what)
        if set(b) != {"lo", "hi", "n", "confidence", "accuracy"}:
            raise _fail(f"{what} needs exactly lo, hi, n, confidence and accuracy")
        lo, hi = _finite(b["lo"], f"{what}.lo", 0.0, 1.0), _finite(b["hi"], f"{what}.hi", 0.0, 1.0)
        if hi < lo:
            raise _fail(f"{what}: hi must not be below lo")
        n = _int(b["n"], f"{what}.n", 0, 1 << 50)
        for key in ("confidence", "accuracy"):
            if b[key] is None:
                if n:
                    raise _fail(f"{what}.{key} is null for a bin with {n} rows")
            else:
                _finite(b[key], f"{what}.{key}", 0.0, 1.0)


def _check_drift(d: Any) -> dict[str, Any] | None:
    if d is None:
        return None
    d = _obj(d, "drift_reference")
    if not set(d) <= {"bins", "features", "channels", "outputs", "calibration"}:
        raise _fail("drift_reference has only bins, features, channels, outputs and calibration")
    bins = _int(d.get("bins"), "drift_reference.bins", 2, 100)
    _check_outputs(d.get("outputs", []), bins)
    if d.get("calibration") is not None:
        _check_calibration(d["calibration"])
    for group in ("features", "channels"):
        items = d.get(group, [])
        if not isinstance(items, list) or len(items) > 4096:
            raise _fail(f"drift_reference.{group} must be a list of at most 4096 entries")
        for i, item in enumerate(items):
            _check_profile_entry(item, f"drift_reference.{group}[{i}]", group, bins)
    return d


def validate_health_check(d: Any, *, max_golden_bytes: int = 2**20) -> dict[str, Any]:
    """Return ``d`` if it is a valid ``health_check`` (``{}`` means none).

    Raises:
        MalformedBundleError: naming the first problem.
    """
    return _check_health(d, max_golden_bytes)


def validate_drift_reference(d: Any) -> dict[str, Any] | None:
    """Return ``d`` if it is a valid ``drift_reference`` (``None`` means none).

    Raises:
        MalformedBundleError: naming the first problem.
    """
    return _check_drift(d)


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. ``raw`` is the dict it was parsed from (or built as)."""

    name: str
    version: int
    created: datetime
    expires: datetime
    targets: Targets
    payload: tuple[PayloadEntry, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    health_check: Mapping[str, Any] = field(default_factory=dict)
    drift_reference: Mapping[str, Any] | None = None
    lineage: Mapping[str, Any] = field(default_factory=dict)
    model_card: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model": {"name": self.name, "version": self.version},
            "created": format_utc(self.created),
            "expires": format_utc(self.expires),
            "targets": self.targets.to_dict(),
            "payload": [p.to_dict() for p in self.payload],
            "io": {
                "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs],
            },
            "health_check": dict(self.health_check),
            "drift_reference": None if self.drift_reference is None else dict(self.drift_reference),
            "lineage": dict(self.lineage),
            "model_card": dict(self.model_card),
        }

    def to_bytes(self) -> bytes:
        """The canonical bytes release keys sign."""
        return canonical.encode(self.to_dict())

    @property
    def model_entry(self) -> PayloadEntry:
        """The payload entry holding the ONNX model (the first one)."""
        return self.payload[0]

    @classmethod
    def from_bytes(
        cls, data: bytes, *, max_payload_bytes: int = 2**34, max_golden_bytes: int = 2**20
    ) -> Manifest:
        """Parse and validate canonical manifest bytes.

        Raises:
            MalformedBundleError: (or its PathTraversalError/DuplicateMemberError
                children) for any problem.
        """
        try:
            doc = canonical.decode_strict(data)
        except canonical.CanonicalError as exc:
            raise _fail(str(exc)) from exc
        return cls.from_dict(
            doc, max_payload_bytes=max_payload_bytes, max_golden_bytes=max_golden_bytes
        )

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], *, max_payload_bytes: int = 2**34, max_golden_bytes: int = 2**20
    ) -> Manifest:
        """Validate a decoded manifest (see the module invariants).

        Raises:
            MalformedBundleError: for any problem, naming the field.
        """
        if not isinstance(d, Mapping) or set(d) != _TOP_KEYS:
            have = set(d) if isinstance(d, Mapping) else set()
            raise _fail(
                f"top-level keys differ: missing {sorted(_TOP_KEYS - have)}, "
                f"unexpected {sorted(have - _TOP_KEYS)}"
            )
        if d["format_version"] != FORMAT_VERSION:
            raise _fail(
                f"format_version {d['format_version']!r} is not supported (want {FORMAT_VERSION})"
            )
        model = _obj(d["model"], "model")
        if set(model) != {"name", "version"}:
            raise _fail("model needs exactly name and version")
        name = validate_model_name(model["name"])
        version = _int(model["version"], "model.version", 1, MAX_MODEL_VERSION)
        try:
            created, expires = parse_utc(d["created"]), parse_utc(d["expires"])
        except ValueError as exc:
            raise _fail(str(exc)) from exc
        if expires <= created:
            raise _fail("expires must be after created")
        payload_raw = d["payload"]
        if not isinstance(payload_raw, list) or not 1 <= len(payload_raw) <= 16:
            raise _fail("payload must list 1 to 16 entries")
        payload = tuple(PayloadEntry.from_dict(p, max_payload_bytes) for p in payload_raw)
        paths = [p.path for p in payload]
        if len(set(paths)) != len(paths):
            raise DuplicateMemberError("manifest: payload lists the same path twice")
        if not paths[0].endswith(".onnx"):
            raise _fail("the first payload entry must be the .onnx model")
        io = _obj(d["io"], "io")
        if set(io) != {"inputs", "outputs"}:
            raise _fail("io needs exactly inputs and outputs")
        specs = []
        for key in ("inputs", "outputs"):
            items = io[key]
            if not isinstance(items, list) or not 1 <= len(items) <= 64:
                raise _fail(f"io.{key} must list 1 to 64 tensors")
            specs.append(
                tuple(TensorSpec.from_dict(t, f"io.{key}[{i}]") for i, t in enumerate(items))
            )
        lineage = _obj(d["lineage"], "lineage")
        for key, val in lineage.items():
            _str(val, f"lineage.{key}", max_len=1024, allow_none=True)
        return cls(
            name=name,
            version=version,
            created=created,
            expires=expires,
            targets=Targets.from_dict(d["targets"]),
            payload=payload,
            inputs=specs[0],
            outputs=specs[1],
            health_check=_check_health(d["health_check"], max_golden_bytes),
            drift_reference=_check_drift(d["drift_reference"]),
            lineage=lineage,
            model_card=_obj(d["model_card"], "model_card"),
        )
