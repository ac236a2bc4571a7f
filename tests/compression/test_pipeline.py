"""End-to-end ``compress()`` on tiny models: artifacts, gate, fallbacks, errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from compression_testkit import OutlierMLP, TinyCNN, fast_config, make_mlp, outlier_data

from compression import (
    CalibrationMethod,
    ConfigError,
    GateError,
    GlobalMagnitudePruning,
    HealthCheckConfig,
    Metric,
    MissingLabelsError,
    QuantMode,
    compress,
)
from compression.modelio import make_session
from compression.profiles import decode_array

REPORT_KEYS = {
    "fp32_bytes",
    "bytes",
    "wire_bytes",
    "size_ratio",
    "wire_ratio",
    "metric_fp32",
    "metric",
    "metric_drop",
    "latency_p50_ms_fp32",
    "latency_p50_ms",
    "config",
    "candidates",
}


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory, mlp, mlp_arrays):
    out = tmp_path_factory.mktemp("auto")
    result = compress(
        mlp,
        {"x": mlp_arrays["calib"]},
        {"x": mlp_arrays["eval"], "labels": mlp_arrays["labels"]},
        out,
        config=fast_config(prune=GlobalMagnitudePruning(0.5), max_drop=0.05),
    )
    return out, result


def test_compress_writes_the_four_bundle_files(auto_run):
    out, _ = auto_run
    assert sorted(p.name for p in out.iterdir()) == [
        "drift_reference.json",
        "health_check.json",
        "model.onnx",
        "report.json",
    ]


def test_report_has_contract_keys_and_consistent_numbers(auto_run):
    out, result = auto_run
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= REPORT_KEYS
    assert report["bytes"] == (out / "model.onnx").stat().st_size
    assert report["size_ratio"] == pytest.approx(report["fp32_bytes"] / report["bytes"], rel=1e-3)
    assert report["metric_drop"] == pytest.approx(report["metric_fp32"] - report["metric"])
    assert report["metric_drop"] <= 0.05
    names = [c["name"] for c in report["candidates"]]
    assert report["config"]["name"] in names
    assert len(names) == 11 and "prune0.5+static-minmax" in names
    chosen = next(c for c in report["candidates"] if c["name"] == report["config"]["name"])
    passing = [c for c in report["candidates"] if c["passed"]]
    assert chosen["wire_bytes"] <= min(c["wire_bytes"] for c in passing) * 1.01
    assert result.chosen.name == report["config"]["name"]


def test_final_model_is_one_valid_self_contained_file(auto_run):
    out, _ = auto_run
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def test_health_check_reproduces_with_final_model(auto_run):
    out, _ = auto_run
    spec = json.loads((out / "health_check.json").read_text())
    session = make_session((out / "model.onnx").read_bytes())
    feeds = {name: decode_array(enc) for name, enc in spec["inputs"].items()}
    assert feeds["x"].shape == (8, 16)
    got = session.run(None, feeds)
    for value, (name, enc) in zip(got, spec["expected_outputs"].items(), strict=True):
        assert name == "output"
        np.testing.assert_allclose(
            value, decode_array(enc), atol=spec["tolerance"]["atol"], rtol=spec["tolerance"]["rtol"]
        )
    assert spec["latency_budget_ms"] >= 50.0


def test_drift_reference_profiles_each_feature(auto_run):
    out, _ = auto_run
    ref = json.loads((out / "drift_reference.json").read_text())
    assert ref["bins"] == 10 and len(ref["features"]) == 16 and ref["channels"] == []
    assert all(len(f["edges"]) == 9 for f in ref["features"])
    # The shipped model's predicted classes on EVAL, and its calibration table.
    (outputs,) = ref["outputs"]
    assert outputs["kind"] == "classes" and outputs["name"] == "output"
    assert sum(outputs["counts"]) == outputs["n"] > 0
    calibration = ref["calibration"]
    assert calibration["output"] == 0 and len(calibration["bins"]) == 10
    assert sum(b["n"] for b in calibration["bins"]) == outputs["n"]
    from edgefleet.manifest import validate_drift_reference

    assert validate_drift_reference(ref) == ref


def test_gate_rejects_candidate_that_drops_too_much(tmp_path, mlp, mlp_arrays):
    result = compress(
        mlp,
        {"x": mlp_arrays["calib"]},
        {"x": mlp_arrays["eval"], "labels": mlp_arrays["labels"]},
        tmp_path,
        config=fast_config(prune=GlobalMagnitudePruning(0.97), quant=QuantMode.AUTO, max_drop=0.02),
    )
    rows = {c["name"]: c for c in result.report["candidates"]}
    pruned = rows["prune0.97+fp32"]
    assert pruned["metric_drop"] > 0.02 and not pruned["passed"]
    assert not result.chosen.name.startswith("prune0.97")
    assert result.report["metric_drop"] <= 0.02


def test_nothing_passing_raises_gate_error_and_writes_nothing(tmp_path, mlp, mlp_arrays):
    out = tmp_path / "out"
    with pytest.raises(GateError) as info:
        compress(
            mlp,
            {"x": mlp_arrays["calib"]},
            {"x": mlp_arrays["eval"]},
            out,
            config=fast_config(metric=Metric.MSE, max_drop=0.0, quant=QuantMode.DYNAMIC),
        )
    assert [c["name"] for c in info.value.candidates] == ["dynamic"]
    assert info.value.candidates[0]["metric_drop"] > 0
    assert not out.exists()


def test_sensitive_node_is_excluded_when_full_static_fails(tmp_path):
    x = outlier_data()
    model = OutlierMLP().eval()
    result = compress(
        model,
        {"x": x[:150]},
        {"x": x[150:]},
        tmp_path,
        config=fast_config(
            metric=Metric.COSINE,
            max_drop=0.002,
            quant=QuantMode.STATIC,
            calibration_methods=(CalibrationMethod.MINMAX,),
        ),
    )
    rows = result.report["candidates"]
    assert rows[0]["name"] == "static-minmax" and not rows[0]["passed"]
    assert result.chosen.name == "static-minmax-excl1"
    excluded = result.report["config"]["quant"]["exclude_nodes"]
    first_gemm = next(
        n.name for n in onnx.load(str(result.model_path)).graph.node if n.op_type == "Gemm"
    )
    assert excluded == [first_gemm]
    types = {t.name: t.data_type for t in onnx.load(str(result.model_path)).graph.initializer}
    assert types["fc1.weight"] == onnx.TensorProto.FLOAT
    assert types["fc2.weight_quantized"] == onnx.TensorProto.INT8


def test_onnx_model_path_is_pruned_and_quantized(tmp_path, mlp_onnx, mlp_npz):
    calib, evald = mlp_npz
    result = compress(
        mlp_onnx,
        calib,
        evald,
        tmp_path,
        config=fast_config(
            prune=GlobalMagnitudePruning(0.5),
            quant=QuantMode.STATIC,
            calibration_methods=(CalibrationMethod.MINMAX,),
            max_drop=0.05,
        ),
    )
    assert result.report["source"]["kind"] == "onnx"
    assert result.chosen.name == "prune0.5+static-minmax"
    assert result.report["pruning"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert result.report["weight_sparsity"] > 0.3


def test_pt2_with_dynamic_int8(tmp_path, mlp_pt2, mlp_npz):
    calib, evald = mlp_npz
    result = compress(
        mlp_pt2, calib, evald, tmp_path, config=fast_config(quant=QuantMode.DYNAMIC, max_drop=0.05)
    )
    assert result.report["source"]["kind"] == "torch.export"
    assert result.report["metric_name"] == "accuracy"
    ops = {n.op_type for n in onnx.load(str(result.model_path)).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}


def test_image_model_gets_channel_drift_profile(tmp_path):
    torch.manual_seed(0)
    cnn = TinyCNN().eval()
    x = np.random.default_rng(0).random((120, 2, 6, 6)).astype(np.float32)
    # One row of x is 288 bytes: a 1 KiB golden budget keeps 3 of the 8 golden rows.
    health = HealthCheckConfig(golden_max_bytes=1 << 10)
    result = compress(
        cnn,
        {"x": x[:60]},
        {"x": x[60:]},
        tmp_path,
        config=fast_config(quant=QuantMode.FP16, health=health),
    )
    drift = json.loads(result.drift_reference_path.read_text())
    assert drift["features"] == [] and [c["channel"] for c in drift["channels"]] == [0, 1]
    assert result.report["metric_name"] == "agreement"
    golden = json.loads((tmp_path / "health_check.json").read_text())["inputs"]["x"]
    assert golden["shape"] == [3, 2, 6, 6]


def test_fine_tune_is_passed_the_pruned_module(tmp_path, mlp_arrays):
    model = make_mlp()
    seen = []

    def fine_tune(module: torch.nn.Module) -> None:
        seen.append(float((module.fc1.weight == 0).float().mean()))

    compress(
        model,
        {"x": mlp_arrays["calib"]},
        {"x": mlp_arrays["eval"], "labels": mlp_arrays["labels"]},
        tmp_path,
        fine_tune=fine_tune,
        config=fast_config(prune=GlobalMagnitudePruning(0.6), quant=QuantMode.NONE, max_drop=1.0),
    )
    assert len(seen) == 1 and seen[0] > 0.3


def test_fine_tune_with_onnx_model_is_config_error(tmp_path, mlp_onnx, mlp_npz):
    calib, evald = mlp_npz
    with pytest.raises(ConfigError, match="fine_tune"):
        compress(
            mlp_onnx,
            calib,
            evald,
            tmp_path,
            fine_tune=lambda m: None,
            config=fast_config(prune=GlobalMagnitudePruning(0.5)),
        )


def test_accuracy_without_labels_fails_before_export(tmp_path, mlp_arrays):
    with pytest.raises(MissingLabelsError):
        compress(
            make_mlp(),
            {"x": mlp_arrays["calib"]},
            {"x": mlp_arrays["eval"]},
            tmp_path,
            config=fast_config(metric=Metric.ACCURACY),
        )
