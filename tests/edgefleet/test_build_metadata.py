"""A bundle's health check and drift reference must be made for its model."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet.build import BuildOptions, ModelFileError, build_bundle, describe_model
from examples.tiny_model import make_linear_model


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
