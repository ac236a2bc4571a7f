"""edgefleet compression: prune + quantize models for edge devices.

Flow: :func:`compress` takes a model (ONNX, ``torch.export`` ``.pt2``,
TorchScript, or an ``nn.Module``), CALIB and EVAL arrays, and writes one
self-contained ``model.onnx`` plus ``report.json``, ``health_check.json`` and
``drift_reference.json`` into an output directory, keeping the smallest
on-wire candidate whose metric drop stays within the gate.

Invariant: importing this package (or :mod:`compression.cli`) loads neither
torch nor onnx; the heavy modules are imported on first use of a name that
needs them, so ``edgefleet --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from compression.config import (
    ActivationType,
    CalibrationMethod,
    Candidate,
    CompressConfig,
    DynamicInt8,
    Float16,
    GlobalMagnitudePruning,
    HealthCheckConfig,
    LatencyConfig,
    Metric,
    NoQuantization,
    QuantMode,
    StaticInt8,
    StructuredChannelPruning,
)
from compression.errors import (
    CompressionError,
    ConfigError,
    DataError,
    ExportError,
    GateError,
    MissingInputError,
    MissingLabelsError,
    ModelLoadError,
    NotAModelError,
    QuantizationError,
    ShapeMismatchError,
    UnsupportedOperatorError,
)

if TYPE_CHECKING:
    from compression.gate import CandidateResult
    from compression.pipeline import CompressionResult, compress

_LAZY = {
    "compress": "compression.pipeline",
    "CompressionResult": "compression.pipeline",
    "CandidateResult": "compression.gate",
}

__all__ = [
    "ActivationType",
    "CalibrationMethod",
    "Candidate",
    "CandidateResult",
    "CompressConfig",
    "CompressionError",
    "CompressionResult",
    "ConfigError",
    "DataError",
    "DynamicInt8",
    "ExportError",
    "Float16",
    "GateError",
    "GlobalMagnitudePruning",
    "HealthCheckConfig",
    "LatencyConfig",
    "Metric",
    "MissingInputError",
    "MissingLabelsError",
    "ModelLoadError",
    "NoQuantization",
    "NotAModelError",
    "QuantMode",
    "QuantizationError",
    "ShapeMismatchError",
    "StaticInt8",
    "StructuredChannelPruning",
    "UnsupportedOperatorError",
    "compress",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'compression' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
