"""The example training scripts: deterministic data and the three output files."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _example(name: str):
    spec = importlib.util.spec_from_file_location(
        f"edgefleet_example_{name}", ROOT / "examples" / name / "train.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fraud():
    return _example("fraud")


@pytest.fixture(scope="module")
def digits():
    return _example("digits")


def test_fraud_data_is_deterministic_and_imbalanced(fraud):
    x1, y1 = fraud.make_transactions(5000)
    x2, y2 = fraud.make_transactions(5000)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert x1.shape == (5000, len(fraud.FEATURE_NAMES)) and x1.dtype == np.float32
    assert 0.015 < y1.mean() < 0.06
    onehot = x1[:, len(fraud.NUMERIC_FEATURES) :]
    np.testing.assert_array_equal(onehot.sum(axis=1), 1.0)


def test_fraud_model_size_is_a_few_hundred_k(fraud):
    model = fraud.FraudMLP(np.zeros(20), np.ones(20))
    assert 300_000 < sum(p.numel() for p in model.parameters()) < 600_000


def test_fraud_train_writes_three_files(tmp_path, fraud):
    assert fraud.main(["--out", str(tmp_path), "--epochs", "1"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "eval.npz", "model.pt2"]
    evald = np.load(tmp_path / "eval.npz")
    assert set(evald.files) == {"x", "labels"} and len(evald["labels"]) == len(evald["x"])
    assert set(np.load(tmp_path / "calib.npz").files) == {"x"}


def test_digits_split_is_deterministic(digits):
    a = digits.load_split()
    b = digits.load_split()
    for left, right in zip(a, b, strict=True):
        np.testing.assert_array_equal(left, right)
    x_train, _, x_eval, y_eval = a
    assert x_train.shape[1:] == (1, 8, 8) and x_eval.shape == (360, 1, 8, 8)
    assert x_train.min() >= 0.0 and x_train.max() <= 1.0
    assert set(np.unique(y_eval)) == set(range(10))


def test_digits_train_writes_three_files(tmp_path, digits):
    assert digits.main(["--out", str(tmp_path), "--epochs", "2"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "eval.npz", "model.pt2"]
    assert np.load(tmp_path / "calib.npz")["x"].shape[1:] == (1, 8, 8)
