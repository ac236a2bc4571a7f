"""A bundle's health check and drift reference must be made for its model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgefleet.build import BuildOptions, ModelFileError, build_bundle, describe_model
from firmware_sim.models import linear_model as make_linear_model


def _array(n: int) -> dict[str, object]:
    import base64

    return {
        "dtype": "float32",
        "shape": [1, n],
        "data_b64": base64.b64encode(b"\0" * 4 * n).decode(),
    }


@pytest.fixture(scope="module")
def model() -> bytes:
    return make_linear_model(features=8, classes=3, seed=1)


def _health(inputs: dict[str, object], outputs: dict[str, object]) -> dict[str, object]:
    return {
        "inputs": inputs,
        "expected_outputs": outputs,
        "tolerance": {"atol": 1e-4, "rtol": 1e-3},
        "latency_budget_ms": 50.0,
    }


def _drift(input_name: str) -> dict[str, object]:
    entry = {"input": input_name, "index": 0, "name": "f0", "edges": [float(i) for i in range(9)],
             "expected": [0.1] * 10}  # fmt: skip
    return {"bins": 10, "features": [entry], "channels": []}


def test_matching_metadata_builds(model: bytes, tmp_path: Path) -> None:
    desc = describe_model(model)
    x, y = desc.inputs[0].name, desc.outputs[0].name
    opts = BuildOptions(
        name="tiny", version=1, health_check=_health({x: _array(8)}, {y: _array(3)}),
        drift_reference=_drift(x),
    )  # fmt: skip
    manifest = build_bundle(model, opts, [], tmp_path / "ok.efb")
    assert manifest.drift_reference is not None and manifest.health_check["inputs"]


@pytest.mark.parametrize("which", ["inputs", "outputs", "drift"])
def test_metadata_for_another_model_is_refused(model: bytes, tmp_path: Path, which: str) -> None:
    desc = describe_model(model)
    x, y = desc.inputs[0].name, desc.outputs[0].name
    health = _health(
        {"other": _array(8)} if which == "inputs" else {x: _array(8)},
        {"other": _array(3)} if which == "outputs" else {y: _array(3)},
    )
    opts = BuildOptions(
        name="tiny", version=1, health_check=health,
        drift_reference=_drift("other" if which == "drift" else x),
    )  # fmt: skip
    out = tmp_path / "bad.efb"
    with pytest.raises(ModelFileError, match="other"):
        build_bundle(model, opts, [], out)
    assert not out.exists()


@pytest.mark.parametrize(
    ("golden", "needle"),
    [
        ({"dtype": "float64", "shape": [1, 8]}, "float64"),  # the model takes float32
        ({"dtype": "float32", "shape": [1, 5]}, "[1, 5]"),  # 8 features
        ({"dtype": "float32", "shape": [8]}, "[8]"),  # rank 1 for a rank-2 input
    ],
)
def test_golden_arrays_must_match_the_declared_inputs(
    model: bytes, tmp_path: Path, golden: dict[str, object], needle: str
) -> None:
    import base64
    import math

    desc = describe_model(model)
    x, y = desc.inputs[0].name, desc.outputs[0].name
    size = math.prod(golden["shape"]) * (8 if golden["dtype"] == "float64" else 4)  # type: ignore[arg-type]
    array = {**golden, "data_b64": base64.b64encode(b"\0" * size).decode()}
    opts = BuildOptions(name="tiny", version=1, health_check=_health({x: array}, {y: _array(3)}))
    with pytest.raises(ModelFileError, match=re.escape(needle)):
        build_bundle(model, opts, [], tmp_path / "bad.efb")


def test_schema_is_checked_before_fit(model: bytes, tmp_path: Path) -> None:
    from edgefleet.errors import MalformedBundleError

    opts = BuildOptions(name="tiny", version=1, drift_reference={"bins": 10, "features": 5})
    with pytest.raises(MalformedBundleError, match="features must be a list"):
        build_bundle(model, opts, [], tmp_path / "bad.efb")


def _entry(**changes: object) -> dict[str, object]:
    entry = _drift("x")["features"][0]  # type: ignore[index]
    entry = {**entry, **changes}  # type: ignore[dict-item]
    return {k: v for k, v in entry.items() if v is not _DROP}


_DROP = object()


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        (_entry(expected=[10**400] + [0] * 9), "finite number"),  # was an OverflowError
        (_entry(edges=[float("nan")] * 9), "finite number"),
        (_entry(edges=[float("inf")] + [1.0] * 8), "finite number"),
        (_entry(index=_DROP), "needs exactly"),  # the agent reads it
        (_entry(index="zz"), "index must be an integer"),
        (_entry(name="n" * 257), "name must be a string"),  # telemetry carries it
        (_entry(extra={"deep": [[[]]]}), "needs exactly"),
        (_entry(expected=[0.5, 0.5, 0.5] + [0.0] * 7), "summing to 1"),
        (_entry(counts=[10] * 10), "counts and n go together"),
        (_entry(n=100), "counts and n go together"),
        (_entry(counts=[10] * 9, n=90), "counts must be 10 non-negative integers"),
        (_entry(counts=[10] * 10, n=99), "summing to n"),
        (_entry(counts=[-1] + [11] * 9, n=98), "counts"),
        (_entry(counts=[1.5] * 10, n=15), "counts"),
    ],
)
def test_drift_reference_entries_are_strict(entry: dict[str, object], needle: str) -> None:
    from edgefleet.errors import MalformedBundleError
    from edgefleet.manifest import validate_drift_reference

    with pytest.raises(MalformedBundleError, match=needle):
        validate_drift_reference({"bins": 10, "features": [entry], "channels": []})


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"outputs": [{"index": 0, "name": "p", "kind": "scores", "counts": [1, 1], "n": 2}]},
         "'classes'"),
        ({"outputs": [{"index": 0, "name": "p", "kind": "classes", "counts": [1], "n": 1}]},
         "2-1024"),
        ({"outputs": [{"index": 0, "name": "p", "kind": "classes", "counts": [1, 2], "n": 4}]},
         "summing to n"),
        ({"outputs": [{"index": 64, "name": "p", "kind": "classes", "counts": [1, 1], "n": 2}]},
         "index"),
        ({"outputs": [{"index": 1, "name": "v", "kind": "values", "edges": [0.0] * 8,
                       "counts": [1] * 10, "n": 10}]}, "9 ascending"),
        ({"outputs": [{"index": 1, "name": "v", "kind": "values", "edges": [2.0] + [1.0] * 8,
                       "counts": [1] * 10, "n": 10}]}, "9 ascending"),
        ({"outputs": [{"index": 1, "name": "v", "kind": "values", "edges": [0.0] * 9,
                       "counts": [1] * 9, "n": 9}]}, "must be 10 non-negative"),
        ({"outputs": [{"index": 1, "name": "v", "kind": "values", "counts": [1] * 10,
                       "n": 10}]}, "edges"),
        ({"calibration": {"output": 0, "bins": []}}, "1-100 bins"),
        ({"calibration": {"output": 0, "bins": [
            {"lo": 0.5, "hi": 0.4, "n": 1, "confidence": 0.45, "accuracy": 1.0}]}}, "hi"),
        ({"calibration": {"output": 0, "bins": [
            {"lo": 0.0, "hi": 0.1, "n": 3, "confidence": None, "accuracy": 1.0}]}}, "null"),
        ({"calibration": {"output": 0, "bins": [
            {"lo": 0.0, "hi": 0.1, "n": 3, "confidence": 0.05, "accuracy": 1.5}]}}, "accuracy"),
        ({"extra": 1}, "has only"),
    ],
)  # fmt: skip
def test_drift_reference_outputs_and_calibration_are_strict(extra: dict, needle: str) -> None:
    from edgefleet.errors import MalformedBundleError
    from edgefleet.manifest import validate_drift_reference

    with pytest.raises(MalformedBundleError, match=needle):
        validate_drift_reference({"bins": 10, "features": [_entry()], **extra})


def test_drift_reference_entries_may_carry_their_counts() -> None:
    from edgefleet.manifest import validate_drift_reference

    entry = _entry(counts=[10] * 10, n=100)
    assert validate_drift_reference({"bins": 10, "features": [entry], "channels": []})


@pytest.mark.parametrize(
    ("key", "value"),
    [("atol", float("nan")), ("rtol", float("inf")), ("atol", 10**400), ("atol", -1)],
)
def test_health_check_tolerances_are_finite(key: str, value: object) -> None:
    from edgefleet.errors import MalformedBundleError
    from edgefleet.manifest import validate_health_check

    hc = _health({"x": _array(8)}, {"y": _array(3)})
    hc["tolerance"] = {"atol": 1e-4, "rtol": 1e-3, key: value}
    with pytest.raises(MalformedBundleError, match="finite number"):
        validate_health_check(hc)


def test_a_manifest_devices_would_refuse_for_size_is_not_written(
    model: bytes, tmp_path: Path
) -> None:
    from edgefleet.errors import MalformedBundleError

    card = {"notes": "x" * (1 << 20)}  # a model card alone over the 1 MiB manifest limit
    out = tmp_path / "big.efb"
    with pytest.raises(MalformedBundleError, match="above the 1048576 devices accept"):
        build_bundle(model, BuildOptions(name="tiny", version=1, model_card=card), [], out)
    assert not out.exists()
