"""Models and signed bundles made in code for simulations, tests and benchmarks.

Flow: ``Release(dir)`` creates a key directory (``KeyStore.init``) and builds
bundles with the real ``edgefleet.build.build_bundle``; golden health checks
are computed by running the model with onnxruntime (what the release side
does). ``craft_bundle`` writes a bundle whose manifest is made by hand (with a
payload the builder would refuse, e.g. bytes that are not ONNX but still
hash-verify), signed by the release key. The ``*_model`` functions build small
ONNX graphs with ``onnx.helper``: good ones, and each kind of bad model the
agent must roll back.

This module imports onnx (a release-side package) inside functions only; the
agent never imports it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.build import BuildOptions, build_bundle
from edgefleet.keys import SigningKey
from edgefleet.keystore import KeyStore
from edgefleet.manifest import Manifest, PayloadEntry, Targets, TensorSpec
from edgefleet.release import sign_manifest, write_bundle_file
from edgefleet.timeutil import utcnow

__all__ = [
    "GOLDEN_X",
    "BundleSet",
    "Release",
    "cnn_model",
    "encode_array",
    "golden_health_check",
    "linear_model",
    "mlp_model",
    "nan_model",
    "unknown_op_model",
    "wrong_shape_model",
]


def encode_array(array: np.ndarray) -> dict[str, Any]:
    """A manifest array: ``{"dtype", "shape", "data_b64"}`` (little-endian)."""
    arr = np.ascontiguousarray(array)
    le = arr.astype(arr.dtype.newbyteorder("<"))
    return {
        "dtype": str(arr.dtype),
        "shape": list(arr.shape),
        "data_b64": base64.b64encode(le.tobytes()).decode("ascii"),
    }


def golden_health_check(
    model: bytes,
    inputs: Mapping[str, np.ndarray],
    *,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    latency_budget_ms: float = 1000.0,
    expected_from: bytes | None = None,
) -> dict[str, Any]:
    """A manifest ``health_check`` whose expected outputs come from running a model.

    Args:
        model: the model the check is for.
        inputs: golden inputs.
        atol, rtol: tolerance.
        latency_budget_ms: median latency allowed on the device.
        expected_from: compute the expected outputs with this other model
            instead (to make a check the model fails).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(expected_from or model, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(names, dict(inputs))
    return {
        "inputs": {k: encode_array(v) for k, v in inputs.items()},
        "expected_outputs": {n: encode_array(v) for n, v in zip(names, outputs, strict=True)},
        "tolerance": {"atol": atol, "rtol": rtol},
        "latency_budget_ms": latency_budget_ms,
    }


def _finish(graph: Any, opset: int = 17) -> bytes:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def linear_model(features: int = 8, classes: int = 3, seed: int = 0, opset: int = 17) -> bytes:
    """``softmax(x @ W + b)`` for ``x`` (batch, features): the tiny classifier.

    ``examples/tiny_model.py`` (the demo's and the wire tests' model) uses this too.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.normal(size=(features, classes)).astype(np.float32)
    b = rng.normal(size=(classes,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "tiny_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    return _finish(graph, opset)


def mlp_model(sizes: Sequence[int] = (32, 256, 128, 2), seed: int = 0) -> bytes:
    """An MLP ``Gemm -> Relu -> ... -> Gemm -> Softmax`` (the fraud model's size by default)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "x"
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        w = (rng.normal(size=(n_in, n_out)) / np.sqrt(n_in)).astype(np.float32)
        b = (rng.normal(size=(n_out,)) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Gemm", [prev, f"W{i}", f"b{i}"], [f"h{i}"]))
        prev = f"h{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [prev], [f"r{i}"]))
            prev = f"r{i}"
    nodes.append(helper.make_node("Softmax", [prev], ["probs"], axis=-1))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", sizes[-1]])],
        initializer=inits,
    )
    return _finish(graph)


def cnn_model(seed: int = 0, channels: int = 16, classes: int = 10) -> bytes:
    """A digits-sized CNN on ``[batch, 1, 8, 8]``.

    Conv 3x3 -> Relu -> MaxPool 2 -> Flatten -> Gemm -> Softmax.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    conv_w = (rng.normal(size=(channels, 1, 3, 3)) / 3.0).astype(np.float32)
    conv_b = np.zeros(channels, np.float32)
    flat = channels * 4 * 4
    fc_w = (rng.normal(size=(flat, classes)) / np.sqrt(flat)).astype(np.float32)
    fc_b = np.zeros(classes, np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Flatten", ["p"], ["f"], axis=1),
            helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "digits_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])],
        initializer=[
            numpy_helper.from_array(conv_w, "cw"),
            numpy_helper.from_array(conv_b, "cb"),
            numpy_helper.from_array(fc_w, "fw"),
            numpy_helper.from_array(fc_b, "fb"),
        ],
    )
    return _finish(graph)


def unknown_op_model(features: int = 8, classes: int = 3) -> bytes:
    """A well-formed ONNX file onnxruntime refuses to load (an operator that does not exist)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("NoSuchOperator", ["x"], ["probs"])],
        "unknown_op",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.shape_inference.infer_shapes(model)  # parses; the checker would refuse the op
    return bytes(model.SerializeToString())


def nan_model(features: int = 8, classes: int = 3) -> bytes:
    """A model whose outputs are NaN for every input (``x @ W`` with a NaN weight)."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.full((features, classes), np.nan, np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["probs"])],
        "nan_out",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    return _finish(graph)


def wrong_shape_model(features: int = 8, declared: int = 3, actual: int = 4) -> bytes:
    """A model that declares ``[batch, declared]`` outputs but computes ``[batch, actual]``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.ones((features, actual), np.float32) / features
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["probs"])],
        "wrong_shape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", declared])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


class Release:
    """A release side in a directory: keys, trust root, and bundle building."""

    def __init__(self, directory: Path, *, now: datetime | None = None) -> None:
        self.dir = Path(directory)
        self.keys = KeyStore(self.dir / "keys")
        if not self.keys.trust_root_path.exists():
            self.keys.init(now=(now or utcnow()) - timedelta(days=1))
        self.trust_root_path = self.keys.trust_root_path
        self.now = now

    @property
    def trust_root_bytes(self) -> bytes:
        return self.trust_root_path.read_bytes()

    def release_keys(self) -> list[SigningKey]:
        root = self.keys.trust_root()
        return self.keys.signing_keys(root.role("release").keyids)

    def build(
        self, model: bytes, *, name: str = "tiny", version: int, out: Path | None = None, **kw: Any
    ) -> Path:
        """Build and sign a bundle with the real builder; return its path."""
        out = out or self.dir / f"{name}-v{version}.bundle"
        build_bundle(
            model,
            BuildOptions(name=name, version=version, **kw),
            self.release_keys(),
            out,
            now=(self.now - timedelta(hours=1)) if self.now else None,
        )
        return out

    def craft(
        self,
        payload: bytes,
        *,
        name: str = "tiny",
        version: int,
        inputs: Sequence[TensorSpec] = (TensorSpec("x", "float32", ("batch", 8)),),
        outputs: Sequence[TensorSpec] = (TensorSpec("probs", "float32", ("batch", 3)),),
        health_check: Mapping[str, Any] | None = None,
        out: Path | None = None,
    ) -> Path:
        """Sign a bundle around any payload bytes (no ONNX checks): a release mistake."""
        out = out or self.dir / f"{name}-v{version}-crafted.bundle"
        sha = hashlib.sha256(payload).hexdigest()
        entry = PayloadEntry("model.onnx", len(payload), sha, "none", len(payload), sha)
        created = (self.now or utcnow()) - timedelta(hours=1)
        manifest = Manifest(
            name=name,
            version=version,
            created=created,
            expires=created + timedelta(days=30),
            targets=Targets(),
            payload=(entry,),
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            health_check=dict(health_check or {}),
        )
        data = Manifest.from_dict(manifest.to_dict()).to_bytes()
        write_bundle_file(
            out, data, sign_manifest(data, self.release_keys()), [(entry, io.BytesIO(payload))]
        )
        return out


GOLDEN_X = np.linspace(-1.0, 1.0, 16, dtype=np.float32).reshape(2, 8)


@dataclass(frozen=True)
class BundleSet:
    """Signed bundles of the tiny model ``tiny`` for tests and campaigns.

    ``v1``..``v3`` are good releases (golden health checks included). Every bad
    one is version 5 so that it is above any good one: ``unknown_op`` (onnxruntime
    cannot load it), ``garbage`` (not ONNX at all, but hash-verifies),
    ``wrong_shape`` (outputs ``[batch, 4]``, manifest says 3), ``nan`` (NaN
    outputs), ``slow`` (latency budget of 1 µs), ``golden_wrong`` (expected
    outputs from another model), ``wrong_target`` (device class ``other``).
    """

    release: Release
    v1: Path
    v2: Path
    v3: Path
    unknown_op: Path
    garbage: Path
    wrong_shape: Path
    nan: Path
    slow: Path
    golden_wrong: Path
    wrong_target: Path

    @property
    def bad(self) -> dict[str, Path]:
        """Bad bundles that pass verification but must fail the health check."""
        return {
            "unknown_op": self.unknown_op,
            "garbage": self.garbage,
            "wrong_shape": self.wrong_shape,
            "nan": self.nan,
            "slow": self.slow,
            "golden_wrong": self.golden_wrong,
        }

    @classmethod
    def build(cls, directory: Path) -> BundleSet:
        """Create keys and every bundle under ``directory``."""
        rel = Release(directory)
        x = {"x": GOLDEN_X}
        good = {}
        for v in (1, 2, 3):
            model = linear_model(seed=v)
            good[v] = rel.build(model, version=v, health_check=golden_health_check(model, x))
        tiny = linear_model(seed=9)
        shape_model = wrong_shape_model()
        return cls(
            release=rel,
            v1=good[1],
            v2=good[2],
            v3=good[3],
            unknown_op=rel.build(unknown_op_model(), version=5, out=rel.dir / "unknown-op.bundle"),
            garbage=rel.craft(
                b"\x08\x07this is not an onnx model" * 8, version=5, out=rel.dir / "garbage.bundle"
            ),
            wrong_shape=rel.build(shape_model, version=5, out=rel.dir / "wrong-shape.bundle"),
            nan=rel.build(nan_model(), version=5, out=rel.dir / "nan.bundle"),
            slow=rel.build(
                tiny,
                version=5,
                health_check=golden_health_check(tiny, x, latency_budget_ms=0.001),
                out=rel.dir / "slow.bundle",
            ),
            golden_wrong=rel.build(
                tiny,
                version=5,
                health_check=golden_health_check(tiny, x, expected_from=linear_model(seed=10)),
                out=rel.dir / "golden-wrong.bundle",
            ),
            wrong_target=rel.build(
                linear_model(seed=4),
                version=5,
                device_classes=("other",),
                out=rel.dir / "wrong-target.bundle",
            ),
        )
