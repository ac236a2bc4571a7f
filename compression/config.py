"""Typed, bounded configuration for the compression pipeline.

Flow: the CLI (or a Python caller) builds one :class:`CompressConfig`; the
pipeline turns it into a list of :class:`Candidate` specs, each pairing an
optional pruning config with exactly one quantization config. Quantization
configs are distinct classes dispatched by type (like onnxruntime's
``StaticQuantConfig`` / ``DynamicQuantConfig``); there are no string-keyed
option dicts anywhere in the public API.

Invariants: every dataclass is frozen and validates its bounds in
``__post_init__`` (raising :class:`~compression.errors.ConfigError`), so an
object that exists is usable. Units are in the field comments. This module is
pure Python (no numpy/torch/onnx) so the CLI can import it cheaply.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from compression.errors import ConfigError

#: Number of equal-frequency bins in the drift reference (device contract).
DRIFT_BINS = 10


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{name}={value!r} is outside [{low}, {high}]")


class Metric(str, enum.Enum):
    """How a candidate's outputs are scored on EVAL.

    ``accuracy`` compares top-1 predictions with EVAL's ``labels``;
    ``agreement`` is the top-1 agreement with the fp32 model; ``cosine`` the
    mean per-row cosine similarity of outputs to fp32; ``mse`` the mean squared
    error of outputs against fp32 (lower is better).
    """

    ACCURACY = "accuracy"
    AGREEMENT = "agreement"
    COSINE = "cosine"
    MSE = "mse"

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger value of the metric is better."""
        return self is not Metric.MSE

    @property
    def needs_labels(self) -> bool:
        """Whether the metric needs EVAL's ``labels`` array."""
        return self is Metric.ACCURACY


class CalibrationMethod(str, enum.Enum):
    """Activation range estimators of ``onnxruntime.quantization``."""

    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"


class ActivationType(str, enum.Enum):
    """Integer type of quantized activations in static QDQ models."""

    UINT8 = "uint8"  # asymmetric: best for post-ReLU activations on x86
    INT8 = "int8"  # symmetric: often preferred by ARM kernels


class QuantMode(str, enum.Enum):
    """The ``--quant`` choice: which quantization families become candidates."""

    AUTO = "auto"
    NONE = "none"
    DYNAMIC = "dynamic"
    STATIC = "static"
    FP16 = "fp16"


# --- pruning -----------------------------------------------------------------


@dataclass(frozen=True)
class GlobalMagnitudePruning:
    """Global unstructured L1-magnitude pruning over the hidden conv/linear weights.

    The layer producing the model output stays dense (see :mod:`compression.prune`).

    Attributes:
        amount: Fraction of the pooled weights set to zero, in (0, 0.99].
    """

    amount: float

    def __post_init__(self) -> None:
        _check_range("amount", self.amount, 1e-6, 0.99)

    @property
    def label(self) -> str:
        """Short name used in candidate tables."""
        return f"prune{self.amount:g}"


@dataclass(frozen=True)
class StructuredChannelPruning:
    """Per-layer Ln-structured pruning of output channels (conv) / rows (linear).

    The layer producing the model output is never pruned, so no output
    feature is zeroed. Channels are zeroed in place, not removed: the tensor
    shapes stay the same and the zeros are paid for only until entropy coding.

    Attributes:
        amount: Fraction of each layer's output channels zeroed, in (0, 0.9].
        norm: Norm used to rank channels: 1 or 2.
    """

    amount: float
    norm: int = 2

    def __post_init__(self) -> None:
        _check_range("amount", self.amount, 1e-6, 0.9)
        if self.norm not in (1, 2):
            raise ConfigError(f"norm={self.norm!r} must be 1 or 2")

    @property
    def label(self) -> str:
        """Short name used in candidate tables."""
        return f"chprune{self.amount:g}"


PruneConfig = GlobalMagnitudePruning | StructuredChannelPruning


# --- quantization -------------------------------------------------------------


@dataclass(frozen=True)
class NoQuantization:
    """Keep fp32 weights (the pruned model, if pruning is on)."""

    @property
    def label(self) -> str:
        """Short name used in candidate tables."""
        return "fp32"


@dataclass(frozen=True)
class Float16:
    """Convert weights and compute to fp16, keeping fp32 model inputs/outputs.

    Attributes:
        keep_io_types: Keep graph inputs/outputs fp32 (casts inserted inside),
            so the device feeds the same arrays as for the fp32 model.
    """

    keep_io_types: bool = True

    @property
    def label(self) -> str:
        """Short name used in candidate tables."""
        return "fp16"


@dataclass(frozen=True)
class DynamicInt8:
    """Dynamic int8 quantization (int8 weights, activations quantized at run time).

    Attributes:
        per_channel: Per-output-channel weight scales.
        reduce_range: 7-bit weights (for x86 CPUs without VNNI).
        exclude_nodes: Node names left in float.
    """

    per_channel: bool = False
    reduce_range: bool = False
    exclude_nodes: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """Short name used in candidate tables."""
        suffix = f"-excl{len(self.exclude_nodes)}" if self.exclude_nodes else ""
        return f"dynamic{'-pc' if self.per_channel else ''}{suffix}"


@dataclass(frozen=True)
class StaticInt8:
    """Static int8 quantization in QDQ format with a calibration pass over CALIB.

    Attributes:
        calibration: Activation range estimator.
        per_channel: Per-output-channel weight scales.
        activation_type: Integer type of activations.
        reduce_range: 7-bit weights (for x86 CPUs without VNNI).
        percentile: Percentile kept by the ``percentile`` method, in [90, 100].
        num_bins: Histogram bins for ``entropy``/``percentile``, in [128, 65536].
        exclude_nodes: Node names left in float (the most sensitive ones).
    """

    calibration: CalibrationMethod = CalibrationMethod.MINMAX
    per_channel: bool = True
    activation_type: ActivationType = ActivationType.UINT8
    reduce_range: bool = False
    percentile: float = 99.999
    num_bins: int = 2048
    exclude_nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_range("percentile", self.percentile, 90.0, 100.0)
        _check_range("num_bins", self.num_bins, 128, 65536)

    @property
    def label(self) -> str:
        """Short name used in candidate tables."""
        suffix = f"-excl{len(self.exclude_nodes)}" if self.exclude_nodes else ""
        return f"static-{self.calibration.value}{suffix}"


QuantConfig = NoQuantization | Float16 | DynamicInt8 | StaticInt8


@dataclass(frozen=True)
class Candidate:
    """One point in the search: an optional pruning step, then one quantization."""

    quant: QuantConfig
    prune: PruneConfig | None = None

    @property
    def name(self) -> str:
        """Stable human-readable name, e.g. ``prune0.7+static-minmax``."""
        if self.prune is None:
            return self.quant.label
        return f"{self.prune.label}+{self.quant.label}"


# --- run-time knobs -----------------------------------------------------------


@dataclass(frozen=True)
class LatencyConfig:
    """How p50 latency is measured with onnxruntime (CPU provider).

    Attributes:
        runs: Timed runs per model, in [5, 10000].
        warmup: Untimed runs before timing, in [0, 1000].
        batch_size: Rows per timed call, in [1, 4096].
        threads: ``intra_op_num_threads``; 0 lets onnxruntime decide, in [0, 64].
    """

    runs: int = 50
    warmup: int = 5
    batch_size: int = 1
    threads: int = 1

    def __post_init__(self) -> None:
        _check_range("runs", self.runs, 5, 10000)
        _check_range("warmup", self.warmup, 0, 1000)
        _check_range("batch_size", self.batch_size, 1, 4096)
        _check_range("threads", self.threads, 0, 64)


@dataclass(frozen=True)
class HealthCheckConfig:
    """How ``health_check.json`` is derived from the final model.

    The tolerance must survive a different CPU (other SIMD paths, other int8
    kernels), so ``atol`` scales with the outputs' magnitude:
    ``atol = max(atol_floor, fraction * max|expected|)`` where ``fraction`` is
    ``atol_fraction_int8`` for int8 models and ``atol_fraction_float`` otherwise.

    Attributes:
        golden_rows: EVAL rows used as golden inputs, in [1, 64].
        golden_max_bytes: Fewer golden rows when their inputs would exceed this
            many bytes (at least one row): golden data travels base64-encoded in
            the manifest, which devices cap at 1 MiB. In [1 KiB, 512 KiB].
        atol_fraction_float: Fraction of the output scale for fp32/fp16 models.
        atol_fraction_int8: Fraction of the output scale for int8 models.
        atol_floor: Smallest atol (absolute output units).
        rtol: Relative tolerance, in [0, 1].
        budget_multiple: Latency budget as a multiple of the measured p50, in [1, 1000].
        budget_floor_ms: Smallest latency budget in milliseconds.
    """

    golden_rows: int = 8
    golden_max_bytes: int = 256 << 10
    atol_fraction_float: float = 1e-3
    atol_fraction_int8: float = 2e-2
    atol_floor: float = 1e-4
    rtol: float = 1e-2
    budget_multiple: float = 10.0
    budget_floor_ms: float = 50.0

    def __post_init__(self) -> None:
        _check_range("golden_rows", self.golden_rows, 1, 64)
        _check_range("golden_max_bytes", self.golden_max_bytes, 1 << 10, 512 << 10)
        _check_range("atol_fraction_float", self.atol_fraction_float, 0.0, 1.0)
        _check_range("atol_fraction_int8", self.atol_fraction_int8, 0.0, 1.0)
        _check_range("atol_floor", self.atol_floor, 0.0, 1.0)
        _check_range("rtol", self.rtol, 0.0, 1.0)
        _check_range("budget_multiple", self.budget_multiple, 1.0, 1000.0)
        _check_range("budget_floor_ms", self.budget_floor_ms, 0.0, 60000.0)


def _all_calibration_methods() -> tuple[CalibrationMethod, ...]:
    return tuple(CalibrationMethod)


@dataclass(frozen=True)
class CompressConfig:
    """Everything ``compress()`` needs besides the model and the data.

    Attributes:
        metric: Gate metric; ``None`` picks ``accuracy`` when EVAL has labels,
            else ``agreement``.
        max_drop: Largest allowed degradation in the metric's units (0.01 is
            one point of accuracy), in [0, 1000].
        quant: Which quantization families to try.
        prune: Optional pruning; with ``quant=AUTO`` both the unpruned and the
            pruned model are tried.
        calibration_methods: Estimators tried for static int8.
        opset: ONNX default-domain opset of the exported model, in [17, 21].
        max_excluded_nodes: Most float-kept nodes when a full static
            quantization fails the gate, in [0, 64].
        zstd_level: zstd level used to measure on-wire size, in [1, 22].
        tie_tolerance: On-wire sizes within this relative gap count as a tie,
            broken by latency, in [0, 0.5].
        eval_batch_size: Rows per onnxruntime call during evaluation, in [1, 65536].
        calibration_batch_size: Rows per calibration call, in [1, 65536].
        max_calibration_rows: CALIB rows used for calibration, in [1, 1_000_000].
        binary_threshold: For single-column outputs, logits above this are
            class 1 (accuracy/agreement).
        latency: Latency measurement settings.
        health: Health-check derivation settings.
        show_progress: Draw rich progress bars on stderr.
    """

    metric: Metric | None = None
    max_drop: float = 0.01
    quant: QuantMode = QuantMode.AUTO
    prune: PruneConfig | None = None
    calibration_methods: tuple[CalibrationMethod, ...] = field(
        default_factory=_all_calibration_methods
    )
    opset: int = 18
    max_excluded_nodes: int = 4
    zstd_level: int = 19
    tie_tolerance: float = 0.01
    eval_batch_size: int = 512
    calibration_batch_size: int = 64
    max_calibration_rows: int = 1024
    binary_threshold: float = 0.0
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    health: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    show_progress: bool = True

    def __post_init__(self) -> None:
        _check_range("max_drop", self.max_drop, 0.0, 1000.0)
        _check_range("opset", self.opset, 17, 21)
        _check_range("max_excluded_nodes", self.max_excluded_nodes, 0, 64)
        _check_range("zstd_level", self.zstd_level, 1, 22)
        _check_range("tie_tolerance", self.tie_tolerance, 0.0, 0.5)
        _check_range("eval_batch_size", self.eval_batch_size, 1, 65536)
        _check_range("calibration_batch_size", self.calibration_batch_size, 1, 65536)
        _check_range("max_calibration_rows", self.max_calibration_rows, 1, 1_000_000)
        if not self.calibration_methods:
            raise ConfigError("calibration_methods must name at least one method")

    def candidates(self) -> list[Candidate]:
        """Expand ``quant``/``prune`` into the ordered list of first-round candidates.

        Static candidates with excluded nodes are added later by the pipeline,
        only when every full static quantization fails the gate.

        Returns:
            Candidates in the order they are tried.
        """
        prune_levels: list[PruneConfig | None]
        if self.prune is None:
            prune_levels = [None]
        elif self.quant is QuantMode.AUTO:
            prune_levels = [None, self.prune]
        else:
            prune_levels = [self.prune]
        quants: list[QuantConfig] = []
        if self.quant in (QuantMode.AUTO, QuantMode.NONE):
            quants.append(NoQuantization())
        if self.quant in (QuantMode.AUTO, QuantMode.FP16):
            quants.append(Float16())
        if self.quant in (QuantMode.AUTO, QuantMode.DYNAMIC):
            quants.append(DynamicInt8())
        if self.quant in (QuantMode.AUTO, QuantMode.STATIC):
            quants.extend(StaticInt8(calibration=m) for m in self.calibration_methods)
        out: list[Candidate] = []
        for prune in prune_levels:
            for quant in quants:
                # The untouched fp32 model is the reference, not a compression
                # result: auto must never "pass" by returning it unchanged.
                if (
                    prune is None
                    and isinstance(quant, NoQuantization)
                    and (self.quant is QuantMode.AUTO)
                ):
                    continue
                out.append(Candidate(quant=quant, prune=prune))
        return out
