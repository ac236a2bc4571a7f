"""Health-check spec and drift reference profile, in the bundle manifest's shapes.

Flow: :func:`health_check` takes golden EVAL rows and the FINAL model's outputs
on them and produces ``health_check.json``; :func:`drift_reference` bins every
input feature (2-D inputs) or channel (inputs of rank >= 3) of CALIB into
``DRIFT_BINS`` equal-frequency bins and produces ``drift_reference.json``.

Binning contract (shared with the device): edges are the 10%, 20%, ... 90%
quantiles of CALIB; a value ``v`` falls in bin
``numpy.searchsorted(edges, v, side="right")``, so the outer bins are open and a
value equal to an edge goes to the upper bin. ``expected`` is computed with that
very rule (:func:`bin_proportions`), so ties and discrete features are handled
consistently, and duplicate edges simply leave empty bins.

Arrays are carried as base64 of their C-contiguous little-endian bytes
(:func:`encode_array` / :func:`decode_array`). Pure numpy.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from compression.config import DRIFT_BINS, HealthCheckConfig


def encode_array(array: np.ndarray) -> dict[str, Any]:
    """Encode an array as ``{"dtype", "shape", "data_b64"}`` (little-endian, C order).

    Args:
        array: Any numeric array.

    Returns:
        The JSON-ready encoding.
    """
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return {
        "dtype": array.dtype.name,
        "shape": [int(d) for d in array.shape],
        "data_b64": base64.b64encode(little.tobytes()).decode("ascii"),
    }


def decode_array(encoded: Mapping[str, Any]) -> np.ndarray:
    """Inverse of :func:`encode_array`.

    Args:
        encoded: ``{"dtype", "shape", "data_b64"}``.

    Returns:
        The array in native byte order.

    Raises:
        ValueError: The byte count does not match dtype and shape.
    """
    dtype = np.dtype(encoded["dtype"]).newbyteorder("<")
    raw = base64.b64decode(encoded["data_b64"])
    shape = tuple(int(d) for d in encoded["shape"])
    if len(raw) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
        raise ValueError(f"{len(raw)} bytes do not hold a {encoded['dtype']} array of {shape}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def health_check(
    golden_inputs: Mapping[str, np.ndarray],
    expected_outputs: Mapping[str, np.ndarray],
    latency_p50_ms: float,
    int8: bool,
    config: HealthCheckConfig,
) -> dict[str, Any]:
    """Build ``health_check.json``.

    ``atol = max(atol_floor, fraction * max|expected|)`` with the int8 or float
    fraction from ``config``: int8 kernels differ between CPUs (VNNI, ARM dot
    products) by up to a quantization step, float kernels only by rounding.

    Args:
        golden_inputs: A few EVAL rows keyed by input name.
        expected_outputs: The final model's outputs on them, keyed by output name.
        latency_p50_ms: Measured p50 of one golden batch.
        int8: Whether the final model is int8-quantized.
        config: Tolerance and budget settings.

    Returns:
        The JSON-ready spec.
    """
    scale = max(
        (float(np.max(np.abs(v))) for v in expected_outputs.values() if v.size), default=0.0
    )
    fraction = config.atol_fraction_int8 if int8 else config.atol_fraction_float
    atol = max(config.atol_floor, fraction * scale)
    budget = max(config.budget_floor_ms, config.budget_multiple * latency_p50_ms)
    return {
        "inputs": {name: encode_array(a) for name, a in golden_inputs.items()},
        "expected_outputs": {name: encode_array(a) for name, a in expected_outputs.items()},
        "tolerance": {"atol": float(atol), "rtol": float(config.rtol)},
        "latency_budget_ms": float(round(budget, 3)),
    }


def quantile_edges(values: np.ndarray, bins: int = DRIFT_BINS) -> np.ndarray:
    """Interior cut points: the 1/bins, 2/bins, ... quantiles (``bins - 1`` of them)."""
    qs = np.arange(1, bins) / bins
    return np.quantile(values.astype(np.float64), qs)


def bin_proportions(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Share of ``values`` per bin under the device rule ``searchsorted(side="right")``."""
    idx = np.searchsorted(edges, values.astype(np.float64), side="right")
    counts = np.bincount(idx, minlength=len(edges) + 1)
    return counts / max(int(values.size), 1)


def bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Values per bin under the device rule ``searchsorted(side="right")``."""
    idx = np.searchsorted(edges, values.astype(np.float64), side="right")
    return np.bincount(idx, minlength=len(edges) + 1)


def _profile(values: np.ndarray) -> tuple[list[float], list[float], list[int]]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        finite = np.zeros(1)
    edges = quantile_edges(finite)
    counts = bin_counts(finite, edges)
    expected = counts / max(int(finite.size), 1)
    return [float(e) for e in edges], [float(p) for p in expected], [int(c) for c in counts]


def drift_reference(
    calib_inputs: Mapping[str, np.ndarray], feature_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Build ``drift_reference.json`` from CALIB.

    Rank-1 and rank-2 inputs ``(batch[, features])`` give one ``features``
    entry per column; inputs of rank >= 3 ``(batch, C, ...)`` give one
    ``channels`` entry per channel over all its values (with mean and std).

    Args:
        calib_inputs: Validated CALIB arrays keyed by input name.
        feature_names: Names for the columns of the 2-D inputs, in input then
            column order; default ``f0``, ``f1``, ...

    Returns:
        The JSON-ready profile.

    Raises:
        ValueError: ``feature_names`` has the wrong length.
    """
    features: list[dict[str, Any]] = []
    channels: list[dict[str, Any]] = []
    columns = [
        (name, array.reshape(array.shape[0], -1))
        for name, array in calib_inputs.items()
        if array.ndim <= 2
    ]
    total_columns = sum(a.shape[1] for _, a in columns)
    if feature_names is not None and len(feature_names) != total_columns:
        raise ValueError(
            f"feature_names has {len(feature_names)} names for {total_columns} feature column(s)"
        )
    counter = 0
    for name, matrix in columns:
        for index in range(matrix.shape[1]):
            edges, expected, counts = _profile(matrix[:, index])
            label = feature_names[counter] if feature_names is not None else f"f{counter}"
            features.append(
                {"input": name, "index": index, "name": label, "edges": edges,
                 "expected": expected, "counts": counts, "n": sum(counts)}
            )  # fmt: skip
            counter += 1
    for name, array in calib_inputs.items():
        if array.ndim < 3:
            continue
        for channel in range(array.shape[1]):
            values = array[:, channel].reshape(-1).astype(np.float64)
            edges, expected, counts = _profile(values)
            channels.append(
                {
                    "input": name,
                    "channel": channel,
                    "mean": float(np.mean(values)),
                    "std": float(np.std(values)),
                    "edges": edges,
                    "expected": expected,
                    "counts": counts,
                    "n": sum(counts),
                }
            )
    return {"bins": DRIFT_BINS, "features": features, "channels": channels}


CALIBRATION_BINS = 10  # equal-width confidence bins of the calibration table


def _class_scores(array: np.ndarray) -> np.ndarray | None:
    """Rows of class scores, as the device counts them: rank >= 2, 2-1024 columns."""
    a = np.asarray(array)
    if a.ndim < 2 or not 2 <= a.shape[-1] <= 1024 or a.dtype.kind not in "biuf":
        return None
    return a.reshape(-1, a.shape[-1])


def output_reference(outputs: Sequence[tuple[str, np.ndarray]]) -> list[dict[str, Any]]:
    """The reference distribution of the model's outputs on evaluation data.

    For every output that looks like class scores (rank >= 2, 2-1024 columns:
    the rule by which devices count ``classes`` in telemetry), the counts of
    the predicted class (argmax of the last axis per row), ``kind: "classes"``.
    Any other numeric output (scores, regressions, embeddings) is profiled by
    value like a feature, ``kind: "values"``: ``DRIFT_BINS`` equal-frequency
    bins over all its finite values, whose counts devices then send.
    """
    out: list[dict[str, Any]] = []
    for index, (name, array) in enumerate(outputs):
        if index > 63:
            break
        rows = _class_scores(array)
        if rows is not None:
            counts = np.bincount(np.argmax(rows, axis=1), minlength=rows.shape[1])
            out.append({"index": index, "name": name, "kind": "classes",
                        "counts": [int(c) for c in counts], "n": int(counts.sum())})  # fmt: skip
            continue
        a = np.asarray(array)
        if a.dtype.kind not in "biuf":
            continue
        values = a.astype(np.float64).ravel()
        values = values[np.isfinite(values)]
        if values.size < DRIFT_BINS:
            continue
        edges = quantile_edges(values)
        counts = bin_counts(values, edges)
        out.append({"index": index, "name": name, "kind": "values",
                    "edges": [float(e) for e in edges], "counts": [int(c) for c in counts],
                    "n": int(counts.sum())})  # fmt: skip
    return out


def calibration_table(
    scores: np.ndarray, labels: np.ndarray, output_index: int = 0
) -> dict[str, Any] | None:
    """Confidence bin -> accuracy on the evaluation data, for confidence-based estimation.

    Confidence is the top class probability: the scores when every row is a
    probability vector (non-negative, summing to 1 within 1e-3), else their
    softmax. ``CALIBRATION_BINS`` equal-width bins on [0, 1]; each records
    its count, mean confidence and accuracy (None when empty). Returns None
    when the output is not class scores or the labels do not fit.
    """
    rows = _class_scores(scores)
    labels = np.asarray(labels).reshape(-1)
    if rows is None or labels.shape[0] != rows.shape[0] or labels.dtype.kind not in "biu":
        return None
    x = rows.astype(np.float64)
    if not (np.all(x >= 0) and np.allclose(x.sum(axis=1), 1.0, atol=1e-3)):
        z = np.exp(x - x.max(axis=1, keepdims=True))
        x = z / z.sum(axis=1, keepdims=True)
    confidence = x.max(axis=1)
    correct = np.argmax(x, axis=1) == labels
    which = np.minimum((confidence * CALIBRATION_BINS).astype(np.int64), CALIBRATION_BINS - 1)
    bins = []
    for b in range(CALIBRATION_BINS):
        mask = which == b
        n = int(mask.sum())
        bins.append({
            "lo": b / CALIBRATION_BINS,
            "hi": (b + 1) / CALIBRATION_BINS,
            "n": n,
            "confidence": float(confidence[mask].mean()) if n else None,
            "accuracy": float(correct[mask].mean()) if n else None,
        })  # fmt: skip
    return {"output": output_index, "bins": bins}
