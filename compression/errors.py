"""Exceptions raised by the compression subsystem.

Flow: every failure the pipeline can diagnose is raised as an
``edgefleet.errors.EdgefleetError``: a subclass of :class:`CompressionError`,
grouped by cause, or the project's shared :class:`ConfigError` (a bad setting),
so that callers (the CLI, the bundle builder) can map them to one-line messages
and exit codes:

* :class:`ModelLoadError` (shared) -- the MODEL argument is missing
  (:class:`ModelNotFoundError`), not a model (:class:`NotAModelError`), or cannot
  be exported (:class:`ExportError`, :class:`UnsupportedOperatorError`); each of
  those is also a :class:`CompressionError`.
* :class:`DataError` -- CALIB/EVAL do not fit the model (:class:`ShapeMismatchError`,
  :class:`MissingInputError`, :class:`MissingLabelsError`).
* :class:`QuantizationError` -- a quantizer failed on a valid model.
* :class:`GateError` -- every candidate was tried and none met ``max_drop``; it
  carries the candidate rows so the caller can print the table.

Invariant: foreign exceptions (torch, onnx, onnxruntime, numpy) are converted at
the boundary with ``raise ... from``, so the cause stays inspectable. This module
imports nothing heavy; the CLI imports it before torch is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgefleet.errors import ConfigError as ConfigError
from edgefleet.errors import EdgefleetError
from edgefleet.errors import ModelLoadError as ModelLoadError

# ``ConfigError`` and ``ModelLoadError`` are edgefleet's shared classes (one
# of each for the whole project); they are re-exported here for callers of
# this package.


class CompressionError(EdgefleetError):
    """Root of every error the compression subsystem raises on purpose."""


class ModelNotFoundError(ModelLoadError, CompressionError):
    """The MODEL path does not exist."""


class NotAModelError(ModelLoadError, CompressionError):
    """The file exists but is neither ONNX, a ``torch.export`` program nor TorchScript."""


class ExportError(ModelLoadError, CompressionError):
    """Converting a torch model to ONNX failed for a reason other than unsupported ops."""


class UnsupportedOperatorError(ExportError):
    """The model uses operators that cannot be exported to ONNX or run by onnxruntime.

    Attributes:
        operators: Names of the offending operators, e.g. ``["mylib::wobble"]``.
    """

    def __init__(self, operators: Sequence[str], detail: str = "") -> None:
        self.operators = sorted(set(operators))
        names = ", ".join(self.operators) if self.operators else "<unknown>"
        message = f"unsupported operator(s): {names}"
        if detail:
            message = f"{message} ({detail})"
        super().__init__(message)


class DataError(CompressionError):
    """CALIB or EVAL data is unusable with the model."""


class ShapeMismatchError(DataError):
    """An array's shape or dtype does not fit the model input it is bound to."""


class MissingInputError(DataError):
    """A model input has no array in the ``.npz`` file (or an array names no input)."""


class MissingLabelsError(DataError):
    """The ``accuracy`` metric was asked for but EVAL carries no ``labels`` array."""


class QuantizationError(CompressionError):
    """onnxruntime's quantizer (or the fp16 converter) failed on a valid model."""


class GateError(CompressionError):
    """No candidate met the accuracy gate.

    Attributes:
        candidates: One JSON-ready row per candidate tried (the report's
            ``candidates`` rows), so the caller can print the table.
        max_drop: The gate that every candidate failed.
    """

    def __init__(self, candidates: Sequence[dict[str, Any]], max_drop: float) -> None:
        self.candidates = list(candidates)
        self.max_drop = max_drop
        super().__init__(
            f"no candidate met the gate: all {len(self.candidates)} candidate(s) "
            f"dropped more than max_drop={max_drop:g} or failed"
        )
