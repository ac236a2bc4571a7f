"""The public face of ``compression``: pinned exports, lazy heavy imports."""

from __future__ import annotations

import subprocess
import sys

import compression

EXPECTED = {
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
}


def test_exported_members_are_pinned():
    assert set(compression.__all__) == EXPECTED


def test_every_export_resolves():
    for name in compression.__all__:
        assert getattr(compression, name) is not None


def test_errors_share_one_root():
    """Every exported error is an ``EdgefleetError``; the package's own are ``CompressionError``s.

    ``ConfigError`` and ``ModelLoadError`` are the project's one class of each
    (``edgefleet.errors``), re-exported; the model-loading errors compression
    raises are both a ``ModelLoadError`` and a ``CompressionError``.
    """
    from edgefleet import errors as shared

    for name in EXPECTED:
        obj = getattr(compression, name)
        if isinstance(obj, type) and name.endswith("Error"):
            assert issubclass(obj, shared.EdgefleetError), name
            if name in ("ConfigError", "ModelLoadError"):
                assert obj is getattr(shared, name)
            else:
                assert issubclass(obj, compression.CompressionError), name
    for name in ("NotAModelError", "ExportError", "UnsupportedOperatorError"):
        assert issubclass(getattr(compression, name), compression.ModelLoadError)


def test_package_import_is_light():
    code = "import sys, compression; print('torch' in sys.modules, 'onnx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
