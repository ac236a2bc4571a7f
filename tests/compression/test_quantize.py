"""Quantization by typed config: op types, int8 initializers, closeness to fp32."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from compression.config import (
    CalibrationMethod,
    DynamicInt8,
    Float16,
    NoQuantization,
    StaticInt8,
)
from compression.errors import QuantizationError
from compression.modelio import make_session
from compression.progress import ProgressReporter
from compression.quantize import (
    CalibrationData,
    NpzCalibrationReader,
    output_error,
    quantizable_nodes,
    quantize,
    rank_sensitivity,
)

OFF = ProgressReporter(False)


@pytest.fixture
def calibration(tmp_path, mlp_arrays):
    return CalibrationData({"x": mlp_arrays["calib"]}, 32, 1024, tmp_path)


def _outputs(path, x):
    return make_session(path.read_bytes()).run(None, {"x": x})[0]


def _cosine(a, b):
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(
        np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    )


def _op_types(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _initializer_types(path):
    return {t.name: t.data_type for t in onnx.load(str(path)).graph.initializer}


def test_static_int8_is_qdq_with_int8_per_channel_weights(
    tmp_path, mlp_onnx, mlp_arrays, calibration
):
    dst = tmp_path / "static.onnx"
    quantize(mlp_onnx, dst, StaticInt8(), calibration, OFF)
    ops = _op_types(dst)
    assert ops.count("QuantizeLinear") >= 3 and ops.count("DequantizeLinear") >= 6
    model = onnx.load(str(dst))
    inits = {t.name: t for t in model.graph.initializer}
    weights = [t for t in model.graph.initializer if t.name.endswith("weight_quantized")]
    assert len(weights) == 3 and all(t.data_type == TensorProto.INT8 for t in weights)
    # per-channel: one scale per output row of the first layer (64)
    assert list(inits["fc1.weight_scale"].dims) == [64]
    x = mlp_arrays["eval"]
    ref = _outputs(mlp_onnx, x)
    got = _outputs(dst, x)
    assert _cosine(got, ref) > 0.995
    assert np.mean(np.abs(got - ref)) < 0.02 * np.max(np.abs(ref))


def test_dynamic_int8_has_integer_matmuls(tmp_path, mlp_onnx, mlp_arrays):
    dst = tmp_path / "dynamic.onnx"
    quantize(mlp_onnx, dst, DynamicInt8(), None, OFF)
    ops = set(_op_types(dst))
    assert "DynamicQuantizeLinear" in ops or "DynamicQuantizeMatMul" in ops
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}
    assert TensorProto.INT8 in set(_initializer_types(dst).values())
    x = mlp_arrays["eval"]
    assert _cosine(_outputs(dst, x), _outputs(mlp_onnx, x)) > 0.995


def test_fp16_keeps_float32_io(tmp_path, mlp_onnx, mlp_arrays):
    dst = tmp_path / "fp16.onnx"
    quantize(mlp_onnx, dst, Float16(), None, OFF)
    model = onnx.load(str(dst))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    big = [t for t in model.graph.initializer if len(t.dims) == 2]
    assert big and all(t.data_type == TensorProto.FLOAT16 for t in big)
    x = mlp_arrays["eval"]
    np.testing.assert_allclose(_outputs(dst, x), _outputs(mlp_onnx, x), rtol=1e-2, atol=1e-2)
    assert dst.stat().st_size < 0.6 * mlp_onnx.stat().st_size


def test_no_quantization_is_a_faithful_copy(tmp_path, mlp_onnx, mlp_arrays):
    dst = tmp_path / "copy.onnx"
    quantize(mlp_onnx, dst, NoQuantization(), None, OFF)
    x = mlp_arrays["eval"]
    np.testing.assert_array_equal(_outputs(dst, x), _outputs(mlp_onnx, x))


def test_static_without_calibration_raises(tmp_path, mlp_onnx):
    with pytest.raises(QuantizationError, match="CALIB"):
        quantize(mlp_onnx, tmp_path / "s.onnx", StaticInt8(), None, OFF)


def test_excluded_node_keeps_float_weight(tmp_path, mlp_onnx, calibration):
    first = quantizable_nodes(onnx.load(str(mlp_onnx)))[0]
    dst = tmp_path / "excl.onnx"
    quantize(mlp_onnx, dst, StaticInt8(exclude_nodes=(first,)), calibration, OFF)
    types = _initializer_types(dst)
    assert types.get("fc1.weight") == TensorProto.FLOAT
    assert "fc1.weight_quantized" not in types
    assert types["fc2.weight_quantized"] == TensorProto.INT8


@pytest.mark.parametrize("method", [CalibrationMethod.ENTROPY, CalibrationMethod.PERCENTILE])
def test_histogram_calibrations_run(tmp_path, mlp_onnx, mlp_arrays, calibration, method):
    dst = tmp_path / f"{method.value}.onnx"
    quantize(mlp_onnx, dst, StaticInt8(calibration=method), calibration, OFF)
    x = mlp_arrays["eval"]
    assert _cosine(_outputs(dst, x), _outputs(mlp_onnx, x)) > 0.99


def test_percentile_clips_ranges_compared_to_minmax(tmp_path, mlp_onnx, calibration):
    scales = {}
    for method in (CalibrationMethod.MINMAX, CalibrationMethod.PERCENTILE):
        dst = tmp_path / f"{method.value}.onnx"
        config = StaticInt8(calibration=method, percentile=99.0)
        quantize(mlp_onnx, dst, config, calibration, OFF)
        inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(dst)).graph.initializer}
        scales[method] = float(inits["x_scale"])
    assert scales[CalibrationMethod.PERCENTILE] < scales[CalibrationMethod.MINMAX]


def test_calibration_reader_hands_out_equal_batches():
    data = {"x": np.arange(70, dtype=np.float32).reshape(70, 1)}
    seen = []
    reader = NpzCalibrationReader(data, batch_size=32, max_rows=1000, on_batch=seen.append)
    batches = []
    while (feed := reader.get_next()) is not None:
        batches.append(feed["x"].shape[0])
    assert batches == [32, 32] and seen == [32, 32]
    reader.rewind()
    assert reader.get_next() is not None


def test_calibration_reader_caps_rows():
    data = {"x": np.zeros((100, 2), dtype=np.float32)}
    reader = NpzCalibrationReader(data, batch_size=64, max_rows=10)
    assert reader.rows == 10 and reader.get_next()["x"].shape == (10, 2)


def test_sensitivity_ranks_every_node(tmp_path, mlp_onnx, mlp_arrays, calibration):
    probe = {"x": mlp_arrays["eval"][:64]}
    reference = [_outputs(mlp_onnx, probe["x"])]
    ranking = rank_sensitivity(
        mlp_onnx, StaticInt8(), calibration, probe, reference, tmp_path, OFF, "mlp"
    )
    names = quantizable_nodes(onnx.load(str(mlp_onnx)))
    assert sorted(n for n, _ in ranking) == sorted(names)
    errors = [e for _, e in ranking]
    assert errors == sorted(errors, reverse=True) and all(e >= 0 for e in errors)


def test_output_error_is_zero_for_identical():
    a = [np.random.default_rng(0).normal(size=(5, 3))]
    assert output_error(a, a) == 0.0
    assert output_error([a[0] + 1.0], a) > 0.5
