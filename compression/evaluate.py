"""Evaluation of candidate models with onnxruntime: metric and latency.

Flow: :func:`run_model` feeds EVAL through a CPU session in batches and
returns every output concatenated; :func:`score` turns the first output into
the gate metric (against labels, or against the fp32 model's outputs);
:func:`degradation` expresses the difference in the metric's units with the
sign chosen so that positive always means worse; :func:`latency_p50_ms` times
repeated single-batch calls.

Invariants: predictions follow one rule everywhere (argmax over the last axis,
or ``logit > binary_threshold`` for a single column), so ``accuracy`` and
``agreement`` can never disagree about what a prediction is. Pure numpy apart
from the onnxruntime session it is handed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np
import onnxruntime as ort

from compression.config import Metric
from compression.data import batch_size_of, take_rows


def run_model(
    session: ort.InferenceSession,
    inputs: Mapping[str, np.ndarray],
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Run every row of ``inputs`` through ``session``.

    Args:
        session: A CPU session.
        inputs: Validated arrays keyed by input name.
        batch_size: Rows per call.
        on_batch: Called with the row count of each finished call.

    Returns:
        One array per model output, rows concatenated in order.
    """
    rows = batch_size_of(inputs)
    chunks: list[list[np.ndarray]] = []
    for start in range(0, rows, batch_size):
        stop = min(start + batch_size, rows)
        outputs = session.run(None, take_rows(inputs, start, stop))
        chunks.append([np.asarray(o) for o in outputs])
        if on_batch is not None:
            on_batch(stop - start)
    return [np.concatenate([chunk[i] for chunk in chunks]) for i in range(len(chunks[0]))]


def predictions(output: np.ndarray, binary_threshold: float) -> np.ndarray:
    """Top-1 class per row.

    Args:
        output: Model output with rows on axis 0.
        binary_threshold: Threshold for single-column (logit) outputs.

    Returns:
        Integer class ids, one per row.
    """
    flat = output.reshape(output.shape[0], -1) if output.ndim != 2 else output
    if flat.ndim == 1 or flat.shape[1] == 1:
        return (flat.reshape(-1) > binary_threshold).astype(np.int64)
    return np.argmax(flat, axis=1).astype(np.int64)


def score(
    metric: Metric,
    output: np.ndarray,
    reference: np.ndarray,
    labels: np.ndarray | None,
    binary_threshold: float,
) -> float:
    """Compute the metric of one model's first output.

    Args:
        metric: Which metric.
        output: The model's first output on EVAL.
        reference: The fp32 model's first output on EVAL.
        labels: EVAL labels (required for ``accuracy``).
        binary_threshold: Threshold for single-column outputs.

    Returns:
        The metric value (accuracy/agreement in [0, 1], cosine in [-1, 1],
        mse >= 0).

    Raises:
        ValueError: ``accuracy`` without labels.
    """
    if metric is Metric.ACCURACY:
        if labels is None:
            raise ValueError("accuracy needs labels")
        return float(np.mean(predictions(output, binary_threshold) == labels))
    if metric is Metric.AGREEMENT:
        return float(
            np.mean(
                predictions(output, binary_threshold) == predictions(reference, binary_threshold)
            )
        )
    a = output.reshape(output.shape[0], -1).astype(np.float64)
    b = reference.reshape(reference.shape[0], -1).astype(np.float64)
    if metric is Metric.COSINE:
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        dots = np.sum(a * b, axis=1)
        safe = np.where(norms > 0, norms, 1.0)
        # Two all-zero rows are identical; one zero row shares no direction.
        both_zero = ~np.any(a, axis=1) & ~np.any(b, axis=1)
        cos = np.where(norms > 0, dots / safe, np.where(both_zero, 1.0, 0.0))
        return float(np.mean(cos))
    return float(np.mean((a - b) ** 2))


def degradation(metric: Metric, fp32_value: float, value: float) -> float:
    """How much worse ``value`` is than ``fp32_value``, in the metric's units.

    For higher-is-better metrics this is ``fp32 - value``; for ``mse`` it is
    ``value - fp32`` so that a positive drop always means a worse model.

    Args:
        metric: Which metric.
        fp32_value: The reference model's metric.
        value: The candidate's metric.

    Returns:
        The drop (may be negative when the candidate is better).
    """
    return fp32_value - value if metric.higher_is_better else value - fp32_value


def latency_p50_ms(
    session: ort.InferenceSession, feed: Mapping[str, np.ndarray], runs: int, warmup: int
) -> float:
    """Median wall time of ``session.run`` on one feed, in milliseconds.

    Args:
        session: A CPU session.
        feed: One batch of inputs.
        runs: Timed calls.
        warmup: Untimed calls first (allocations, kernel selection).

    Returns:
        p50 latency in ms.
    """
    for _ in range(warmup):
        session.run(None, dict(feed))
    times = np.empty(runs, dtype=np.float64)
    for i in range(runs):
        start = time.perf_counter()
        session.run(None, dict(feed))
        times[i] = time.perf_counter() - start
    return float(np.median(times) * 1000.0)
