"""Building bundles from a model file on the release side.

Flow: ONNX model (+ optional compression outputs beside it: ``report.json``,
``health_check.json``, ``drift_reference.json``, ``model_card.json``) ->
``describe_model`` (inputs/outputs, opset, self-containedness) -> payload entry
(zstd or raw, hashed) -> ``Manifest`` -> signatures by the release keys ->
``write_bundle`` (atomic).

Guarantees: the manifest's hashes are computed from the exact bytes written;
the model is refused if it references external tensor data (a bundle carries
one self-contained model); nothing is written at ``out`` unless the whole
bundle was.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import zstandard

from edgefleet.errors import EdgefleetError, MalformedBundleError
from edgefleet.keys import SigningKey
from edgefleet.manifest import (
    DTYPE_SIZES,
    Manifest,
    PayloadEntry,
    Targets,
    TensorSpec,
    validate_drift_reference,
    validate_health_check,
    validate_model_name,
)
from edgefleet.release import sign_manifest, write_bundle_file
from edgefleet.timeutil import utcnow
from edgefleet.trust import VerifierLimits

__all__ = [
    "BuildOptions",
    "ModelDescription",
    "ModelFileError",
    "build_bundle",
    "check_metadata_fits",
    "describe_model",
    "load_compression_outputs",
    "min_onnxruntime_for_opset",
    "opset_supported_by",
]

# Minimum onnxruntime release implementing each ONNX opset (conservative, from
# onnxruntime's version matrix). Used for defaults; the manifest states the
# constraint explicitly and ``--min-onnxruntime-version`` overrides it.
_ORT_FOR_OPSET = {
    15: "1.10.0", 16: "1.11.0", 17: "1.12.0", 18: "1.14.0", 19: "1.15.0",
    20: "1.17.0", 21: "1.18.0", 22: "1.20.0", 23: "1.22.0", 24: "1.23.0",
}  # fmt: skip


class ModelFileError(EdgefleetError, ValueError):
    """The model file cannot go into a bundle (not ONNX, external data, ...)."""


def min_onnxruntime_for_opset(opset: int) -> str:
    """The lowest onnxruntime release that implements ``opset``."""
    if opset <= 15:
        return _ORT_FOR_OPSET[15]
    return _ORT_FOR_OPSET.get(opset, "99.0.0")


def opset_supported_by(onnxruntime_version: str) -> int:
    """The highest ONNX opset a given onnxruntime release implements."""
    from edgefleet.manifest import parse_version

    have = parse_version(onnxruntime_version)
    best = 15
    for opset, ver in _ORT_FOR_OPSET.items():
        if parse_version(ver) <= have:
            best = max(best, opset)
    return best


@dataclass(frozen=True)
class ModelDescription:
    """What the manifest states about the model file."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int


def describe_model(data: bytes) -> ModelDescription:
    """Read inputs, outputs and opset from ONNX bytes.

    Raises:
        ModelFileError: not an ONNX model, external tensor data, or an
            unsupported element type.
    """
    try:
        import onnx
        from onnx import helper
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelFileError(
            "building bundles needs the onnx package: pip install 'edgefleet[compression]'"
        ) from exc
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise ModelFileError(f"not an ONNX model: {exc}") from exc
    graph = model.graph
    if not graph.node and not graph.output:
        raise ModelFileError("not an ONNX model: the graph is empty")
    for tensor in graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            where = {e.key: e.value for e in tensor.external_data}.get("location", "?")
            raise ModelFileError(
                f"initializer {tensor.name!r} lives in external file {where!r}: save the model "
                "self-contained (onnx.save_model(m, path, save_as_external_data=False))"
            )
    opsets = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not opsets:
        raise ModelFileError("model declares no default-domain opset")
    init_names = {t.name for t in graph.initializer}

    def spec(value: Any) -> TensorSpec:
        ttype = value.type.tensor_type
        try:
            dtype = str(helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        except Exception as exc:
            raise ModelFileError(f"tensor {value.name!r} has an unsupported type") from exc
        if dtype not in DTYPE_SIZES:
            raise ModelFileError(f"tensor {value.name!r} has unsupported dtype {dtype}")
        dims: list[int | str] = []
        for i, d in enumerate(ttype.shape.dim):
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or f"d{i}")
        return TensorSpec(value.name, dtype, tuple(dims))

    inputs = tuple(spec(v) for v in graph.input if v.name not in init_names)
    outputs = tuple(spec(v) for v in graph.output)
    if not inputs or not outputs:
        raise ModelFileError("model has no inputs or no outputs")
    return ModelDescription(inputs, outputs, max(opsets))


@dataclass(frozen=True)
class BuildOptions:
    """Release-time choices for one bundle."""

    name: str
    version: int
    expires_in: timedelta = timedelta(days=90)
    device_classes: tuple[str, ...] = ()
    archs: tuple[str, ...] = ()
    min_agent_version: str = "0.1.0"
    min_onnxruntime_version: str | None = None  # None: derived from the opset
    compression: str = "zstd"  # "zstd" or "none"; zstd falls back to none if it does not shrink
    zstd_level: int = 19  # 1..22
    health_check: Mapping[str, Any] = field(default_factory=dict)
    drift_reference: Mapping[str, Any] | None = None
    lineage: Mapping[str, Any] = field(default_factory=dict)
    model_card: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_model_name(self.name)
        if self.compression not in ("zstd", "none"):
            raise ValueError("compression must be 'zstd' or 'none'")
        if not 1 <= self.zstd_level <= 22:
            raise ValueError("zstd_level must be in [1, 22]")
        if self.expires_in <= timedelta(0):
            raise ValueError("expires_in must be positive")


def load_compression_outputs(model_dir: Path) -> dict[str, Any]:
    """Read the JSON files ``edgefleet compress`` leaves beside a model.

    Returns a dict with any of ``health_check``, ``drift_reference``,
    ``model_card`` and ``report_sha256`` (digest of report.json, for lineage).

    Raises:
        ModelFileError: a file exists but is not a JSON object.
    """
    found: dict[str, Any] = {}
    for key in ("health_check", "drift_reference", "model_card"):
        path = model_dir / f"{key}.json"
        if path.exists():
            try:
                value = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ModelFileError(f"{path}: not readable JSON ({exc})") from exc
            if not isinstance(value, dict):
                raise ModelFileError(f"{path}: must hold a JSON object")
            found[key] = value
    report = model_dir / "report.json"
    if report.exists():
        found["report_sha256"] = hashlib.sha256(report.read_bytes()).hexdigest()
    return found


def check_metadata_fits(
    desc: ModelDescription,
    health_check: Mapping[str, Any],
    drift_reference: Mapping[str, Any] | None,
) -> None:
    """The health check and drift reference must be made for this model.

    Call it on metadata that passed ``validate_health_check`` /
    ``validate_drift_reference``. Golden inputs must be exactly the model's
    inputs, with their element types, ranks and fixed dimensions; expected
    outputs must be outputs of the model, likewise; drift entries must name
    model inputs. A device would otherwise fail every install of the bundle.

    Raises:
        ModelFileError: they were made for another model (e.g. a stale
            ``health_check.json`` beside the model file).
    """
    inputs = {t.name: t for t in desc.inputs}
    outputs = {t.name: t for t in desc.outputs}
    if health_check:
        golden = health_check["inputs"]
        if sorted(golden) != sorted(inputs):
            raise ModelFileError(
                f"health_check inputs {sorted(golden)} are not the model's inputs "
                f"{sorted(inputs)}: the health check was made for another model"
            )
        expected = health_check["expected_outputs"]
        if not set(expected) <= set(outputs):
            raise ModelFileError(
                f"health_check expected_outputs {sorted(set(expected) - set(outputs))} are not "
                f"outputs of the model ({sorted(outputs)})"
            )
        for group, specs, arrays in (("inputs", inputs, golden), ("expected_outputs", outputs,
                                                                 expected)):  # fmt: skip
            for name, array in arrays.items():
                _check_array_fits(f"health_check.{group}.{name}", array, specs[name])
    for group in ("features", "channels"):
        for entry in (drift_reference or {}).get(group) or ():
            if entry["input"] not in inputs:
                raise ModelFileError(
                    f"drift_reference {group} entry for input {entry['input']!r}: "
                    f"the model's inputs are {sorted(inputs)}"
                )


def _check_array_fits(what: str, array: Mapping[str, Any], spec: TensorSpec) -> None:
    shape = array["shape"]
    fixed = [
        (i, dim) for i, dim in enumerate(spec.shape) if isinstance(dim, int) and dim > 0
    ]  # symbolic or unknown dimensions accept any size
    if (
        array["dtype"] != spec.dtype
        or len(shape) != len(spec.shape)
        or any(shape[i] != dim for i, dim in fixed)
    ):
        declared = [d if isinstance(d, int) and d > 0 else "?" for d in spec.shape]
        raise ModelFileError(
            f"{what} is {array['dtype']} {shape}, but the model declares {spec.dtype} "
            f"{declared}: the health check was made for another model"
        )


def build_bundle(
    model: bytes,
    options: BuildOptions,
    keys: Sequence[SigningKey],
    out: Path,
    *,
    now: datetime | None = None,
) -> Manifest:
    """Build, sign and atomically write one bundle.

    Args:
        model: the ONNX model bytes (self-contained).
        options: name, version, targets and optional metadata.
        keys: release keys to sign with (may be empty: sign later with
            ``bundle sign``).
        out: destination file.
        now: creation time (defaults to the current UTC time).

    Returns:
        The manifest written.

    Raises:
        ModelFileError: the model cannot be bundled.
        MalformedBundleError: the metadata (health check, drift reference,
            lineage) does not fit the manifest schema.
        OSError: writing failed; ``out`` is untouched.
    """
    desc = describe_model(model)
    check_metadata_fits(
        desc,
        validate_health_check(dict(options.health_check)),
        validate_drift_reference(
            None if options.drift_reference is None else dict(options.drift_reference)
        ),
    )
    created = now or utcnow()
    raw_sha = hashlib.sha256(model).hexdigest()
    stored = model
    compression = options.compression
    if compression == "zstd":
        cctx = zstandard.ZstdCompressor(level=options.zstd_level, write_content_size=True)
        packed = cctx.compress(model)
        if len(packed) < len(model):
            stored = packed
        else:
            compression = "none"
    entry = PayloadEntry(
        path="model.onnx",
        size=len(stored),
        sha256=hashlib.sha256(stored).hexdigest(),
        compression=compression,
        uncompressed_size=len(model),
        uncompressed_sha256=raw_sha,
    )
    targets = Targets(
        device_classes=tuple(options.device_classes),
        archs=tuple(options.archs),
        min_agent_version=options.min_agent_version,
        min_onnxruntime_version=options.min_onnxruntime_version
        or min_onnxruntime_for_opset(desc.opset),
        opset=desc.opset,
    )
    manifest_dict = Manifest(
        name=options.name,
        version=options.version,
        created=created,
        expires=created + options.expires_in,
        targets=targets,
        payload=(entry,),
        inputs=desc.inputs,
        outputs=desc.outputs,
        health_check=dict(options.health_check),
        drift_reference=None if options.drift_reference is None else dict(options.drift_reference),
        lineage=dict(options.lineage),
        model_card=dict(options.model_card),
    ).to_dict()
    # Round-trip through the validator so a bundle is never written with a
    # manifest the device would refuse.
    manifest = Manifest.from_dict(manifest_dict)
    manifest_bytes = manifest.to_bytes()
    limit = VerifierLimits().max_manifest_bytes
    if len(manifest_bytes) > limit:
        raise MalformedBundleError(
            f"manifest: {len(manifest_bytes)} bytes, above the {limit} devices accept: the "
            "health check's golden arrays, the drift reference or the model card are too large"
        )
    with tempfile.SpooledTemporaryFile(max_size=64 << 20) as spool:
        spool.write(stored)
        spool.seek(0)
        write_bundle_file(
            out, manifest_bytes, sign_manifest(manifest_bytes, keys), [(entry, spool)]
        )
    return manifest
