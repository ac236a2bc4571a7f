"""Binding CALIB/EVAL arrays to model inputs, and the data errors."""

from __future__ import annotations

import numpy as np
import pytest

from compression.data import (
    InputSpec,
    bind_inputs,
    check_against_specs,
    extract_labels,
    load_npz,
)
from compression.errors import DataError, MissingInputError, MissingLabelsError, ShapeMismatchError

SPEC = InputSpec("input", "float32", ("batch", 3))


def test_single_input_model_accepts_x_alias():
    bound = bind_inputs({"x": np.zeros((4, 3))}, ["input"], "CALIB")
    assert list(bound) == ["input"]


def test_bind_missing_input_names_it():
    with pytest.raises(MissingInputError, match="'b'"):
        bind_inputs({"a": np.zeros((2, 3))}, ["a", "b"], "CALIB")


def test_bind_unknown_array_rejected():
    with pytest.raises(MissingInputError, match="stray"):
        bind_inputs({"x": np.zeros((2, 3)), "stray": np.zeros(2)}, ["input"], "EVAL")


def test_bind_batch_disagreement_is_shape_mismatch():
    with pytest.raises(ShapeMismatchError, match="batch size"):
        bind_inputs({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))}, ["a", "b"], "CALIB")


def test_check_wrong_feature_count_is_shape_mismatch():
    with pytest.raises(ShapeMismatchError, match=r"axis 1: 4 != 3"):
        check_against_specs({"input": np.zeros((2, 4))}, [SPEC], "CALIB")


def test_check_wrong_rank_is_shape_mismatch():
    with pytest.raises(ShapeMismatchError, match="rank"):
        check_against_specs({"input": np.zeros((2, 3, 1))}, [SPEC], "EVAL")


def test_check_float_into_int_input_is_rejected():
    spec = InputSpec("ids", "int64", ("batch", 5))
    with pytest.raises(ShapeMismatchError, match="dtype"):
        check_against_specs({"ids": np.zeros((2, 5), dtype=np.float32)}, [spec], "CALIB")


def test_check_casts_float64_to_model_dtype():
    out = check_against_specs({"input": np.ones((2, 3), dtype=np.float64)}, [SPEC], "CALIB")
    assert out["input"].dtype == np.float32 and out["input"].flags.c_contiguous


def test_labels_required_for_accuracy():
    with pytest.raises(MissingLabelsError, match="accuracy"):
        extract_labels({"x": np.zeros((3, 3))}, 3, required=True)


def test_labels_optional_otherwise():
    assert extract_labels({"x": np.zeros((3, 3))}, 3, required=False) is None


def test_labels_wrong_length_is_shape_mismatch():
    with pytest.raises(ShapeMismatchError, match="one per row"):
        extract_labels({"labels": np.zeros(2, dtype=np.int64)}, 3, required=True)


def test_load_npz_not_an_archive(tmp_path):
    bad = tmp_path / "calib.npz"
    bad.write_text("hello")
    with pytest.raises(DataError, match="not a readable"):
        load_npz(bad, "CALIB")


def test_load_npz_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_npz(tmp_path / "nope.npz", "EVAL")
