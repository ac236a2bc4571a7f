"""CALIB/EVAL loading and binding of arrays to model inputs.

Flow: ``load_npz`` reads a ``.npz`` into a plain ``{key: ndarray}`` dict;
``bind_inputs`` maps its keys onto the model's input names (a single-input
model may use the key ``x``); ``check_against_specs`` validates each bound array
against the ONNX input spec and casts it to the input's dtype.

Invariants: after ``check_against_specs`` every model input has exactly one
C-contiguous array of the model's dtype, all arrays share the same (non-zero)
batch size, and every non-batch dimension that the model fixes matches. The key
``labels`` is reserved for EVAL's ground truth and never bound to an input.
Errors are :class:`~compression.errors.DataError` subclasses that name the file,
the input and both shapes.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from compression.errors import (
    DataError,
    MissingInputError,
    MissingLabelsError,
    ShapeMismatchError,
)

#: Reserved key for ground-truth labels in EVAL.
LABELS_KEY = "labels"
#: Alias accepted for the only input of a single-input model.
SINGLE_INPUT_ALIAS = "x"

Dim = int | str | None


@dataclass(frozen=True)
class InputSpec:
    """What one model input accepts.

    Attributes:
        name: Graph input name.
        dtype: numpy dtype name, e.g. ``"float32"``.
        shape: One entry per axis: an int when fixed, a string (symbolic) or
            ``None`` when free. Axis 0 is the batch axis.
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def describe(self) -> str:
        """Render the shape like ``[batch, 24]``."""
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"[{dims}]"


def load_npz(path: str | os.PathLike[str], role: str) -> dict[str, np.ndarray]:
    """Read every array of a ``.npz`` file.

    Args:
        path: File to read.
        role: ``"CALIB"`` or ``"EVAL"``, used in error messages.

    Returns:
        The arrays keyed as in the file.

    Raises:
        DataError: The file is missing, not an ``.npz`` archive, empty, or
            holds object arrays (which would need pickle to load).
    """
    if not os.path.isfile(path):
        raise DataError(f"{role} file not found: {os.fspath(path)}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: np.asarray(archive[key]) for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{role} file {os.fspath(path)} is not a readable .npz: {exc}") from exc
    if not arrays:
        raise DataError(f"{role} file {os.fspath(path)} holds no arrays")
    return arrays


def bind_inputs(
    arrays: Mapping[str, np.ndarray], input_names: Sequence[str], role: str
) -> dict[str, np.ndarray]:
    """Map ``.npz`` keys onto model input names.

    Args:
        arrays: Arrays from :func:`load_npz` (or a caller's dict).
        input_names: The model's input names, in order.
        role: ``"CALIB"`` or ``"EVAL"``, used in error messages.

    Returns:
        ``{input name: array}`` for every model input, in model order.

    Raises:
        MissingInputError: An input has no array, or an array matches no input.
        ShapeMismatchError: The arrays disagree on the batch size or have no rows.
    """
    keys = [k for k in arrays if k != LABELS_KEY]
    bound: dict[str, np.ndarray] = {}
    if len(input_names) == 1 and input_names[0] not in arrays and SINGLE_INPUT_ALIAS in arrays:
        bound[input_names[0]] = np.asarray(arrays[SINGLE_INPUT_ALIAS])
        extra = [k for k in keys if k != SINGLE_INPUT_ALIAS]
    else:
        missing = [n for n in input_names if n not in arrays]
        if missing:
            raise MissingInputError(
                f"{role} has no array for model input(s) {missing}; "
                f"it has {sorted(arrays)} (a single-input model may use key "
                f"{SINGLE_INPUT_ALIAS!r})"
            )
        bound = {n: np.asarray(arrays[n]) for n in input_names}
        extra = [k for k in keys if k not in input_names]
    if extra:
        raise MissingInputError(
            f"{role} array(s) {sorted(extra)} match no model input; inputs are {list(input_names)}"
        )
    batch_sizes = {name: (a.shape[0] if a.ndim else 0) for name, a in bound.items()}
    sizes = set(batch_sizes.values())
    if len(sizes) != 1:
        raise ShapeMismatchError(f"{role} inputs disagree on the batch size: {batch_sizes}")
    if 0 in sizes:
        raise ShapeMismatchError(f"{role} inputs have no rows: {batch_sizes}")
    return bound


def check_against_specs(
    bound: Mapping[str, np.ndarray], specs: Sequence[InputSpec], role: str
) -> dict[str, np.ndarray]:
    """Validate bound arrays against the model's inputs and cast their dtype.

    Floats may be cast to another float width and integers/bools to floats
    or wider integers; anything else (e.g. floats into an int64 input) is a
    mismatch rather than a silent truncation.

    Args:
        bound: Output of :func:`bind_inputs`.
        specs: The model's input specs.
        role: ``"CALIB"`` or ``"EVAL"``, used in error messages.

    Returns:
        C-contiguous arrays of each input's dtype, keyed by input name.

    Raises:
        ShapeMismatchError: Rank, a fixed dimension or the dtype kind does not fit.
        MissingInputError: A spec has no bound array.
    """
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name not in bound:
            raise MissingInputError(f"{role} has no array for model input {spec.name!r}")
        array = bound[spec.name]
        if array.ndim != len(spec.shape):
            raise ShapeMismatchError(
                f"{role} array for input {spec.name!r} has shape {tuple(array.shape)} "
                f"(rank {array.ndim}) but the model expects {spec.describe()} "
                f"(rank {len(spec.shape)})"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape, strict=True)):
            if axis > 0 and isinstance(want, int) and want != got:
                raise ShapeMismatchError(
                    f"{role} array for input {spec.name!r} has shape {tuple(array.shape)} "
                    f"but the model expects {spec.describe()} (axis {axis}: {got} != {want})"
                )
        target = np.dtype(spec.dtype)
        if not np.can_cast(array.dtype, target, casting="same_kind"):
            raise ShapeMismatchError(
                f"{role} array for input {spec.name!r} has dtype {array.dtype} which "
                f"cannot be cast safely to the model's {target}"
            )
        out[spec.name] = np.ascontiguousarray(array, dtype=target)
    return out


def extract_labels(
    arrays: Mapping[str, np.ndarray], rows: int, required: bool
) -> np.ndarray | None:
    """Return EVAL's labels as a 1-D int64 array, or ``None`` when absent.

    Args:
        arrays: EVAL arrays.
        rows: EVAL's batch size, which the labels must match.
        required: Whether the metric needs labels.

    Returns:
        The labels, or ``None`` if EVAL has none and they are not required.

    Raises:
        MissingLabelsError: ``required`` and EVAL has no ``labels`` array.
        ShapeMismatchError: The labels are not one per row, or not integers.
    """
    if LABELS_KEY not in arrays:
        if required:
            raise MissingLabelsError(
                f"metric 'accuracy' needs a {LABELS_KEY!r} array in EVAL; "
                "use --metric agreement, cosine or mse for unlabeled data"
            )
        return None
    labels = np.asarray(arrays[LABELS_KEY])
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.shape[0] != rows:
        raise ShapeMismatchError(
            f"EVAL labels have shape {tuple(labels.shape)}; expected ({rows},), one per row"
        )
    if labels.dtype.kind not in "biu" and not (
        labels.dtype.kind == "f" and np.all(np.equal(np.mod(labels, 1), 0))
    ):
        raise ShapeMismatchError(f"EVAL labels must be integer class ids, got {labels.dtype}")
    return labels.astype(np.int64)


def take_rows(inputs: Mapping[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    """Slice the same rows out of every input."""
    return {name: array[start:stop] for name, array in inputs.items()}


def batch_size_of(inputs: Mapping[str, np.ndarray]) -> int:
    """Number of rows shared by the inputs (they were validated to agree)."""
    return int(next(iter(inputs.values())).shape[0])
