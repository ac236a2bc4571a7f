"""Health-check spec and drift reference in the bundle manifest's shapes."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from compression.config import HealthCheckConfig
from compression.profiles import (
    bin_proportions,
    decode_array,
    drift_reference,
    encode_array,
    health_check,
)


def test_encode_is_little_endian_c_order():
    a = np.arange(6, dtype=np.float32).reshape(2, 3).T  # F-ordered view
    enc = encode_array(a)
    assert enc["dtype"] == "float32" and enc["shape"] == [3, 2]
    raw = base64.b64decode(enc["data_b64"])
    assert raw == np.ascontiguousarray(a).astype("<f4").tobytes()
    np.testing.assert_array_equal(decode_array(enc), a)


def test_decode_rejects_wrong_byte_count():
    enc = encode_array(np.zeros(3, dtype=np.float32))
    enc["shape"] = [4]
    with pytest.raises(ValueError, match="bytes"):
        decode_array(enc)


def test_health_check_tolerance_and_budget():
    out = {"output": np.array([[4.0, -2.0]], dtype=np.float32)}
    spec = health_check({"x": np.zeros((1, 2), np.float32)}, out, 1.0, True, HealthCheckConfig())
    assert spec["tolerance"]["atol"] == pytest.approx(0.02 * 4.0)
    assert spec["latency_budget_ms"] == 50.0  # floor beats 10 x 1 ms
    slow = health_check({"x": np.zeros((1, 2), np.float32)}, out, 9.0, False, HealthCheckConfig())
    assert slow["tolerance"]["atol"] == pytest.approx(1e-3 * 4.0)
    assert slow["latency_budget_ms"] == pytest.approx(90.0)
    assert set(spec) == {"inputs", "expected_outputs", "tolerance", "latency_budget_ms"}


def test_drift_features_for_2d_input():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 3)).astype(np.float32)
    ref = drift_reference({"x": x}, ["a", "b", "c"])
    assert ref["bins"] == 10 and ref["channels"] == []
    first = ref["features"][0]
    assert (first["input"], first["index"], first["name"]) == ("x", 0, "a")
    assert len(first["edges"]) == 9 and first["edges"] == sorted(first["edges"])
    assert sum(first["expected"]) == pytest.approx(1.0)
    assert first["expected"] == pytest.approx([0.1] * 10, abs=0.002)


def test_drift_default_names_and_wrong_count():
    ref = drift_reference({"x": np.zeros((10, 2), np.float32)})
    assert [f["name"] for f in ref["features"]] == ["f0", "f1"]
    with pytest.raises(ValueError, match="feature_names"):
        drift_reference({"x": np.zeros((10, 2), np.float32)}, ["only_one"])


def test_drift_channels_for_images():
    rng = np.random.default_rng(1)
    x = rng.random((50, 3, 4, 4)).astype(np.float32)
    x[:, 1] *= 10.0
    ref = drift_reference({"image": x})
    assert ref["features"] == [] and len(ref["channels"]) == 3
    ch = ref["channels"][1]
    assert ch["input"] == "image" and ch["channel"] == 1
    assert ch["mean"] == pytest.approx(float(x[:, 1].mean()), rel=1e-5)
    assert ch["std"] == pytest.approx(float(x[:, 1].std()), rel=1e-4)
    assert len(ch["edges"]) == 9 and sum(ch["expected"]) == pytest.approx(1.0)


def test_drift_discrete_feature_edges_follow_device_rule():
    # 70% zeros: several edges equal 0, values equal to an edge go to the upper bin.
    x = np.array([0.0] * 70 + [1.0] * 20 + [2.0] * 10, dtype=np.float32)[:, None]
    feature = drift_reference({"x": x})["features"][0]
    edges = np.array(feature["edges"])
    idx = np.searchsorted(edges, x[:, 0], side="right")
    counts = np.bincount(idx, minlength=10) / len(x)
    assert feature["expected"] == pytest.approx(counts.tolist())
    assert sum(feature["expected"]) == pytest.approx(1.0)
    assert 0.0 in feature["expected"]  # duplicate edges leave empty bins


@settings(max_examples=60, deadline=None)
@given(
    arrays(
        np.float64,
        st.integers(1, 300),
        elements=st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False),
    )
)
def test_drift_expected_always_matches_rule(values):
    feature = drift_reference({"x": values[:, None]})["features"][0]
    edges = np.array(feature["edges"])
    assert len(edges) == 9 and np.all(np.diff(edges) >= 0)
    np.testing.assert_allclose(feature["expected"], bin_proportions(values, edges))
    assert sum(feature["expected"]) == pytest.approx(1.0)


def test_drift_reference_records_its_counts_for_the_drift_statistics():
    x = np.random.default_rng(0).normal(size=(777, 3)).astype(np.float32)
    x[:7, 1] = np.nan  # not binned, not counted
    img = np.random.default_rng(1).random((20, 2, 4, 4)).astype(np.float32)
    profile = drift_reference({"x": x, "img": img})
    for entry in profile["features"] + profile["channels"]:
        assert len(entry["counts"]) == 10 and sum(entry["counts"]) == entry["n"]
        assert entry["expected"] == pytest.approx([c / entry["n"] for c in entry["counts"]])
    assert [f["n"] for f in profile["features"]] == [777, 770, 777]
    assert [c["n"] for c in profile["channels"]] == [320, 320]
    from edgefleet.manifest import validate_drift_reference

    assert validate_drift_reference(profile) is profile


def test_output_reference_counts_predicted_classes_like_the_device():
    from compression.profiles import output_reference

    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], np.float32)
    regression = np.zeros((3, 1), np.float32)
    labels = np.array([1, 0, 1])
    ref = output_reference([("probs", scores), ("value", regression), ("ids", labels)])
    assert ref == [{"index": 0, "name": "probs", "kind": "classes", "counts": [1, 2], "n": 3}]


def test_other_outputs_are_profiled_by_value_as_devices_count_them():
    from compression.profiles import output_reference
    from edgefleet.manifest import validate_drift_reference

    rng = np.random.default_rng(0)
    score = rng.normal(size=(500, 1)).astype(np.float32)
    score[:5] = np.nan  # left out, as on the device
    (ref,) = output_reference([("score", score)])
    assert ref["kind"] == "values" and ref["index"] == 0 and len(ref["edges"]) == 9
    assert ref["n"] == 495 and sum(ref["counts"]) == 495
    assert max(ref["counts"]) - min(ref["counts"]) <= 2  # equal-frequency bins
    finite = score[np.isfinite(score)].astype(np.float64)
    want = np.bincount(np.searchsorted(ref["edges"], finite, side="right"), minlength=10)
    assert ref["counts"] == want.tolist()
    assert validate_drift_reference({"bins": 10, "features": [], "outputs": [ref]})


def test_calibration_table_bins_confidence_and_accuracy():
    from compression.profiles import calibration_table

    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.45, 0.55], [0.6, 0.4]], np.float64)
    labels = np.array([0, 1, 1, 0])
    table = calibration_table(probs, labels)
    assert table is not None and table["output"] == 0
    by_bin = {b["lo"]: b for b in table["bins"] if b["n"]}
    assert by_bin[0.9]["n"] == 2 and by_bin[0.9]["accuracy"] == 0.5  # 0.95 right, 0.9 wrong
    assert by_bin[0.5]["n"] == 1 and by_bin[0.5]["accuracy"] == 1.0
    assert by_bin[0.6]["n"] == 1 and by_bin[0.6]["confidence"] == pytest.approx(0.6)
    logits = np.log(probs)  # not probabilities: softmax recovers them
    assert calibration_table(logits, labels) == table
    assert calibration_table(probs, labels[:3]) is None
    assert calibration_table(np.zeros((4, 1)), labels) is None
