"""Session fixtures for the compression tests: tiny models exported once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from compression_testkit import TinyMLP, make_mlp, mlp_data

from compression.modelio import export_onnx, from_module, module_for_export, save_onnx
from compression.progress import ProgressReporter


@pytest.fixture(scope="session")
def mlp() -> TinyMLP:
    return make_mlp()


@pytest.fixture(scope="session")
def mlp_arrays(mlp):
    x, y = mlp_data(mlp)
    return {"calib": x[:200], "eval": x[200:], "labels": y[200:]}


@pytest.fixture(scope="session")
def mlp_onnx(tmp_path_factory, mlp, mlp_arrays) -> Path:
    """The tiny MLP exported once (fp32 ONNX file) for the per-step tests."""
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    example = (torch.from_numpy(mlp_arrays["calib"][:2]),)
    module = module_for_export(from_module(mlp), example)
    model = export_onnx(module, example, ["x"], ["output"], 18, ProgressReporter(False))
    save_onnx(model, path)
    return path


@pytest.fixture(scope="session")
def mlp_pt2(tmp_path_factory, mlp, mlp_arrays) -> Path:
    path = tmp_path_factory.mktemp("mlp_pt2") / "model.pt2"
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(
        mlp, (torch.from_numpy(mlp_arrays["calib"][:2]),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, str(path))
    return path


@pytest.fixture(scope="session")
def mlp_npz(tmp_path_factory, mlp_arrays) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("npz")
    calib, evald = root / "calib.npz", root / "eval.npz"
    np.savez(calib, x=mlp_arrays["calib"])
    np.savez(evald, x=mlp_arrays["eval"], labels=mlp_arrays["labels"])
    return calib, evald
