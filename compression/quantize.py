"""Quantization with ``onnxruntime.quantization``, dispatched by config type.

Flow: :func:`quantize` takes an fp32 model file and one of the typed configs
from :mod:`compression.config` and writes the quantized model:

* :class:`~compression.config.NoQuantization` -- copy;
* :class:`~compression.config.Float16` -- ``convert_float_to_float16`` with fp32 I/O;
* :class:`~compression.config.DynamicInt8` -- ``DynamicQuantConfig``;
* :class:`~compression.config.StaticInt8` -- ``StaticQuantConfig`` in QDQ format
  with per-channel int8 weights and a :class:`NpzCalibrationReader` over CALIB
  (MinMax, Entropy or Percentile). Ranges are cached per (model, method) so the
  sensitivity analysis does not re-calibrate for every node.

:func:`rank_sensitivity` quantizes one node at a time and scores the damage to
the outputs, so the pipeline can keep the most sensitive nodes in float when
the full quantization fails the gate.

Invariants: every written model is self-contained and passes the checker;
onnxruntime's exceptions become :class:`~compression.errors.QuantizationError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime import quantization as ortq
from onnxruntime.transformers.float16 import convert_float_to_float16

from compression.config import (
    ActivationType,
    CalibrationMethod,
    DynamicInt8,
    Float16,
    NoQuantization,
    QuantConfig,
    StaticInt8,
)
from compression.data import batch_size_of
from compression.errors import QuantizationError
from compression.modelio import finalize_onnx, make_session, save_onnx
from compression.progress import ProgressReporter

#: Operator types whose weights the int8 quantizers convert.
QUANTIZABLE_OPS = ("Conv", "Gemm", "MatMul")

_CALIBRATION = {
    CalibrationMethod.MINMAX: ortq.CalibrationMethod.MinMax,
    CalibrationMethod.ENTROPY: ortq.CalibrationMethod.Entropy,
    CalibrationMethod.PERCENTILE: ortq.CalibrationMethod.Percentile,
}
_ACTIVATION = {
    ActivationType.UINT8: ortq.QuantType.QUInt8,
    ActivationType.INT8: ortq.QuantType.QInt8,
}


class NpzCalibrationReader(ortq.CalibrationDataReader):
    """Feeds CALIB to onnxruntime's calibrator in fixed-size batches.

    Keeps data loading out of the calibration algorithm: the calibrator only
    sees ``get_next()``; this reader owns batching, the row cap and progress.
    """

    def __init__(
        self,
        inputs: Mapping[str, np.ndarray],
        batch_size: int,
        max_rows: int,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        """Create the reader.

        Args:
            inputs: Validated CALIB arrays keyed by model input name.
            batch_size: Rows per feed.
            max_rows: Rows used at most (the first ones).
            on_batch: Called with the row count of each batch handed out.
        """
        self._inputs = dict(inputs)
        rows = min(batch_size_of(inputs), max_rows)
        self._batch = min(batch_size, rows)
        # onnxruntime's histogram collectors stack batches with np.asarray, so
        # every batch must have the same size: the ragged tail is dropped.
        self._rows = (rows // self._batch) * self._batch
        self._on_batch = on_batch
        self._start = 0

    @property
    def rows(self) -> int:
        """Rows this reader hands out per pass."""
        return self._rows

    def get_next(self) -> dict[str, np.ndarray] | None:
        """Next batch, or ``None`` at the end of the pass."""
        if self._start >= self._rows:
            return None
        stop = min(self._start + self._batch, self._rows)
        feed = {name: array[self._start : stop] for name, array in self._inputs.items()}
        if self._on_batch is not None:
            self._on_batch(stop - self._start)
        self._start = stop
        return feed

    def rewind(self) -> None:
        """Start the next pass from the first row."""
        self._start = 0


@dataclass(frozen=True)
class CalibrationData:
    """What static quantization needs besides the model.

    Attributes:
        inputs: Validated CALIB arrays.
        batch_size: Rows per calibration feed.
        max_rows: Rows used at most.
        cache_dir: Directory for per-(model, method) range caches.
    """

    inputs: Mapping[str, np.ndarray]
    batch_size: int
    max_rows: int
    cache_dir: Path


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    """Silence onnxruntime.quantization's root-logger warnings and stdout prints."""
    # onnxruntime.quantization logs "consider pre-processing" through the root
    # logger and prints histogram progress to stdout, which would corrupt --json.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def quantize(
    src: Path,
    dst: Path,
    config: QuantConfig,
    calibration: CalibrationData | None,
    reporter: ProgressReporter,
    cache_key: str = "model",
) -> None:
    """Quantize ``src`` into ``dst`` according to the config's type.

    Args:
        src: fp32 model file.
        dst: Output model file (self-contained).
        config: One of the quantization configs.
        calibration: CALIB data; required for :class:`StaticInt8`.
        reporter: Progress bars (calibration).
        cache_key: Identifies ``src`` among models sharing the cache directory.

    Raises:
        QuantizationError: The quantizer failed or static config lacks CALIB.
        TypeError: ``config`` is not a quantization config.
    """
    try:
        with quiet_quantizer():
            _dispatch(config, src, dst, calibration, reporter, cache_key)
    except (QuantizationError, TypeError):
        raise
    except Exception as exc:  # onnxruntime/onnx raise assorted types
        raise QuantizationError(f"{config.label} quantization failed: {exc}") from exc
    # Re-save through the hygiene step: one file, checked, no debug metadata.
    model = onnx.load_model(str(dst), load_external_data=True)
    save_onnx(finalize_onnx(model), dst)
    for leftover in dst.parent.glob(f"{dst.name}.data"):
        leftover.unlink()


@functools.singledispatch
def _dispatch(
    config: object,
    src: Path,
    dst: Path,
    calibration: CalibrationData | None,
    reporter: ProgressReporter,
    cache_key: str,
) -> None:
    raise TypeError(f"not a quantization config: {type(config).__name__}")


@_dispatch.register
def _(
    config: NoQuantization,
    src: Path,
    dst: Path,
    calibration: CalibrationData | None,
    reporter: ProgressReporter,
    cache_key: str,
) -> None:
    shutil.copyfile(src, dst)


@_dispatch.register
def _(
    config: Float16,
    src: Path,
    dst: Path,
    calibration: CalibrationData | None,
    reporter: ProgressReporter,
    cache_key: str,
) -> None:
    model = onnx.load_model(str(src))
    converted = convert_float_to_float16(model, keep_io_types=config.keep_io_types)
    onnx.save_model(converted, str(dst))


@_dispatch.register
def _(
    config: DynamicInt8,
    src: Path,
    dst: Path,
    calibration: CalibrationData | None,
    reporter: ProgressReporter,
    cache_key: str,
) -> None:
    ort_config = ortq.DynamicQuantConfig(
        weight_type=ortq.QuantType.QInt8,
        per_channel=config.per_channel,
        reduce_range=config.reduce_range,
        nodes_to_exclude=list(config.exclude_nodes),
    )
    ortq.quantize(str(src), str(dst), ort_config)


@_dispatch.register
def _(
    config: StaticInt8,
    src: Path,
    dst: Path,
    calibration: CalibrationData | None,
    reporter: ProgressReporter,
    cache_key: str,
) -> None:
    if calibration is None:
        raise QuantizationError("static int8 quantization needs CALIB data")
    cache = calibration.cache_dir / f"{cache_key}-{config.calibration.value}.json"
    extra: dict[str, object] = {}
    if config.calibration is CalibrationMethod.PERCENTILE:
        extra["CalibPercentile"] = config.percentile
    if config.calibration in (CalibrationMethod.ENTROPY, CalibrationMethod.PERCENTILE):
        extra["CalibNumBins"] = config.num_bins
    reader = NpzCalibrationReader(calibration.inputs, calibration.batch_size, calibration.max_rows)
    # With a cached range file the calibrator reads no data: no bar to show.
    bars = ProgressReporter(False) if cache.exists() else reporter
    description = f"calibrate {cache_key} ({config.calibration.value})"
    with bars.task(description, total=reader.rows) as advance:
        reader = NpzCalibrationReader(
            calibration.inputs, calibration.batch_size, calibration.max_rows, advance
        )
        ortq.quantize_static(
            str(src),
            str(dst),
            calibration_data_reader=reader,
            quant_format=ortq.QuantFormat.QDQ,
            per_channel=config.per_channel,
            reduce_range=config.reduce_range,
            activation_type=_ACTIVATION[config.activation_type],
            weight_type=ortq.QuantType.QInt8,
            nodes_to_exclude=list(config.exclude_nodes),
            calibrate_method=_CALIBRATION[config.calibration],
            extra_options=extra,
            calibration_cache_path=cache,
        )


def quantizable_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of conv/gemm/matmul nodes whose weight is an initializer.

    Args:
        model: fp32 model (nodes must be named, as the exporter does).

    Returns:
        Node names in graph order.
    """
    inits = {t.name for t in model.graph.initializer}
    return [
        node.name
        for node in model.graph.node
        if node.op_type in QUANTIZABLE_OPS
        and node.name
        and len(node.input) > 1
        and node.input[1] in inits
    ]


def output_error(outputs: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """Mean squared error normalised by the reference's variance (0 is exact).

    Args:
        outputs: Candidate outputs.
        reference: fp32 outputs on the same rows.

    Returns:
        Sum over outputs of ``mse / (var(reference) + 1e-12)``.
    """
    total = 0.0
    for out, ref in zip(outputs, reference, strict=True):
        ref64 = ref.astype(np.float64)
        total += float(np.mean((out.astype(np.float64) - ref64) ** 2) / (np.var(ref64) + 1e-12))
    return total


def rank_sensitivity(
    src: Path,
    base: StaticInt8,
    calibration: CalibrationData,
    probe_inputs: Mapping[str, np.ndarray],
    reference: list[np.ndarray],
    workdir: Path,
    reporter: ProgressReporter,
    cache_key: str,
    max_nodes: int = 64,
) -> list[tuple[str, float]]:
    """Score each quantizable node by the output error of quantizing it alone.

    Args:
        src: fp32 model file.
        base: Static config whose calibration method is reused.
        calibration: CALIB data (its range cache makes this cheap).
        probe_inputs: A few EVAL rows to compare outputs on.
        reference: fp32 outputs on ``probe_inputs``.
        workdir: Scratch directory.
        reporter: Progress bars.
        cache_key: Range-cache key of ``src``.
        max_nodes: Score at most this many nodes (graph order).

    Returns:
        ``(node name, error)`` pairs, most sensitive first.

    Raises:
        QuantizationError: A single-node quantization fails.
    """
    model = onnx.load_model(str(src))
    nodes = quantizable_nodes(model)[:max_nodes]
    scores: list[tuple[str, float]] = []
    with reporter.task("sensitivity", total=len(nodes)) as advance:
        for i, node in enumerate(nodes):
            others = tuple(n for n in nodes if n != node)
            config = dataclasses.replace(base, exclude_nodes=others)
            dst = workdir / f"sensitivity-{i}.onnx"
            quantize(src, dst, config, calibration, ProgressReporter(False), cache_key)
            session = make_session(dst.read_bytes())
            outputs = session.run(None, dict(probe_inputs))
            scores.append((node, output_error([np.asarray(o) for o in outputs], reference)))
            dst.unlink()
            advance(1)
    scores.sort(key=lambda item: item[1], reverse=True)
    return scores
