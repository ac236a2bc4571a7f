"""Pure binning of feature values over the drift reference's edges (no I/O, no state).

bin = ``searchsorted(edges, v, side="right")`` per feature, non-finite values
counted apart; ``bin_matrix`` is the reference definition and ``_bin_matrix``
the vectorized path the recorder uses, which gives the same counts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["CONFIDENCE_BINS", "bin_matrix", "confidence_counts"]

CONFIDENCE_BINS = 10  # equal-width bins of [0, 1] for the top-class probability

_BROADCAST_LIMIT = 1 << 22  # booleans per vectorized comparison chunk (4 MiB)
_TILE_BYTES = 1 << 20  # bytes of edges laid out for one block of rows (_bin_sorted), at most


@dataclass
class _Layout:
    """How one input's features are binned (see ``_bin_sorted``)."""

    ascending: bool  # every row of edges ascends (no NaN): _bin_sorted applies
    leading: bool  # the columns are 0..F-1: a row's first F values, no gather
    edges32: np.ndarray | None  # _round_up_to_float32(edges) when ascending
    # (rows, dtype) -> edges laid out for a block of that many rows of that dtype
    tiles: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)

    @classmethod
    def of(cls, columns: np.ndarray, edges: np.ndarray, bins: int) -> _Layout:
        ascending = _ascending(edges, bins)
        leading = bool((columns == np.arange(len(columns))).all())
        return cls(ascending, leading, _round_up_to_float32(edges) if ascending else None)


@dataclass
class _Profile:
    """Drift-reference edges compiled for vectorized binning."""

    bins: int
    # input -> (column indexes, names, edges matrix (F, bins-1))
    features: dict[str, tuple[np.ndarray, list[str], np.ndarray]]
    # input -> list of (channel, edges)
    channels: dict[str, list[tuple[int, np.ndarray]]]
    # input -> its features' layout
    layouts: dict[str, _Layout] = field(default_factory=dict)
    # output index -> edges, for outputs profiled by value (not class scores)
    outputs: dict[int, np.ndarray] = field(default_factory=dict)

    @classmethod
    def compile(cls, ref: Mapping[str, Any] | None) -> _Profile | None:
        if not ref:
            return None
        bins = int(ref["bins"])
        feats: dict[str, list[tuple[int, str, list[float]]]] = {}
        for f in ref.get("features", []):
            feats.setdefault(str(f["input"]), []).append(
                (int(f["index"]), str(f.get("name", f["index"])), list(f["edges"]))
            )
        chans: dict[str, list[tuple[int, np.ndarray]]] = {}
        for c in ref.get("channels", []):
            chans.setdefault(str(c["input"]), []).append(
                (int(c["channel"]), np.asarray(c["edges"], dtype=np.float64))
            )
        features = {
            name: (
                np.asarray([i for i, _, _ in items], dtype=np.intp),
                [n for _, n, _ in items],
                np.asarray([e for _, _, e in items], dtype=np.float64).reshape(len(items), -1),
            )
            for name, items in feats.items()
        }
        layouts = {
            name: _Layout.of(columns, edges, bins) for name, (columns, _, edges) in features.items()
        }
        outputs = {
            int(o["index"]): np.asarray(o["edges"], dtype=np.float64)
            for o in ref.get("outputs", [])
            if o.get("edges") is not None and len(o["edges"]) == bins - 1
        }
        return cls(bins, features, chans, layouts, outputs)


def bin_matrix(values: np.ndarray, edges: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Histogram every column of ``values`` (N, F) over its own edges (F, bins-1).

    Equivalent to ``np.searchsorted(edges[f], values[:, f], side="right")`` per
    column (the count of edges <= v), done with vectorized comparisons in row
    chunks (see ``_bin_sorted`` for ascending edges). Non-finite values are not
    binned.

    Returns:
        ``(counts (F, bins) int64, nonfinite (F,) int64)``.
    """
    return _bin_matrix(values, edges, bins, None)


def confidence_counts(rows: np.ndarray, winners: np.ndarray) -> np.ndarray:
    """Counts of the rows' top-class probability in ``CONFIDENCE_BINS`` bins of [0, 1].

    The probability is the winning score when every row is a probability
    vector (non-negative, summing to 1 within 1e-3), else the winner's
    softmax; rows with a non-finite score are left out. This is the rule of
    the bundle's calibration table (``compression.profiles.calibration_table``),
    so the two histograms pair bin by bin.
    """
    x = rows.astype(np.float64, copy=False)
    counts = np.zeros(CONFIDENCE_BINS, dtype=np.int64)
    if not len(x):
        return counts
    top = x[np.arange(len(x)), winners]
    if x.min() >= 0 and np.allclose(x.sum(axis=1), 1.0, atol=1e-3):
        confidence = top
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            confidence = 1.0 / np.exp(x - top[:, None]).sum(axis=1)
    confidence = confidence[np.isfinite(confidence)]
    which = np.minimum((confidence * CONFIDENCE_BINS).astype(np.int64), CONFIDENCE_BINS - 1)
    counts += np.bincount(np.maximum(which, 0), minlength=CONFIDENCE_BINS)
    return counts


def _ascending(edges: np.ndarray, bins: int) -> bool:
    """Whether ``edges`` is (F, bins-1), bins >= 2, with every row ascending (so no NaN)."""
    return (
        edges.ndim == 2
        and edges.shape[1] == bins - 1
        and bins >= 2
        and bool((edges[:, 1:] >= edges[:, :-1]).all())
    )


def _bin_matrix(
    values: np.ndarray, edges: np.ndarray, bins: int, layout: _Layout | None
) -> tuple[np.ndarray, np.ndarray]:
    """``bin_matrix``; ``layout`` (of these edges) keeps the laid-out edges between calls."""
    n, f = values.shape
    counts = np.zeros((f, bins), dtype=np.int64)
    finite = np.isfinite(values)
    all_finite = bool(finite.all())
    if all_finite:
        nonfinite = np.zeros(f, dtype=np.int64)
    else:
        nonfinite = (~finite).sum(axis=0).astype(np.int64)
    if n == 0 or f == 0:
        return counts, nonfinite
    if layout is None and edges.shape[0] == f and _ascending(edges, bins):
        layout = _Layout.of(np.arange(f), edges, bins)
    if layout is not None and layout.ascending and edges.shape[0] == f:
        _bin_sorted(values, None if all_finite else finite, edges, counts, layout)
        return counts, nonfinite
    step = max(1, _BROADCAST_LIMIT // max(1, f * max(1, bins - 1)))
    offsets = np.arange(f, dtype=np.int64) * (bins + 1)
    for lo in range(0, n, step):
        block = values[lo : lo + step]
        idx = (block[:, :, None] >= edges[None, :, :]).sum(axis=2, dtype=np.int64)
        idx[~finite[lo : lo + step]] = bins  # an extra, discarded bin
        flat = np.bincount((idx + offsets).ravel(), minlength=f * (bins + 1))
        counts += flat.reshape(f, bins + 1)[:, :bins]
    return counts, nonfinite


def _round_up_to_float32(edges: np.ndarray) -> np.ndarray:
    """The smallest float32 >= each edge: for a float32 v, ``v >= e`` iff ``v >= that``."""
    with np.errstate(over="ignore"):  # beyond float32's range: -max or inf, as intended
        up = edges.astype(np.float32)
        low = up.astype(np.float64) < edges
        up[low] = np.nextafter(up[low], np.float32(np.inf))
    return up


def _bin_sorted(
    values: np.ndarray,
    finite: np.ndarray | None,
    edges: np.ndarray,
    counts: np.ndarray,
    layout: _Layout,
) -> None:
    """``bin_matrix`` for rows of ascending edges: add the histograms to ``counts``.

    With ascending edges, "at least k+1 edges <= v" is the same as
    "v >= edges[k]", so each histogram is the difference of how many values
    reach each edge: one comparison of every value with its column's edge,
    both laid out contiguously (several times faster than a broadcast), and
    one sum; no per-value bin index. ``finite`` is ``None`` when every value
    is finite; otherwise non-finite values are compared as NaN (which reaches
    no edge, so lands in bin 0) and taken out of bin 0 again. Float32 values
    are compared in float32 with the edges rounded up (the same outcomes, half
    the memory traffic); others as numpy promotes them with float64 edges.
    ``layout.tiles`` keeps the laid-out edges for the last block sizes (a
    steady rate repeats them).
    """
    f, cuts = edges.shape
    if values.dtype == np.float32 and layout.edges32 is not None:
        edges = layout.edges32
    # Rows per block: the laid-out edges stay within _TILE_BYTES, and the uint16
    # sums below cannot overflow.
    step = max(1, min(0xFFFF, _TILE_BYTES // (edges.itemsize * f * cuts)))
    for lo in range(0, len(values), step):
        rows = values[lo : lo + step]
        m = len(rows)
        missing = None
        if finite is None:
            block = np.ascontiguousarray(rows.T)  # (F, m)
        else:
            ok = finite[lo : lo + step].T
            missing = m - np.count_nonzero(ok, axis=1)
            block = np.ascontiguousarray(np.where(ok, rows.T, np.nan))
        key = (m, edges.dtype.char)
        tiled = layout.tiles.get(key)
        if tiled is None:
            tiled = np.repeat(edges.T, m, axis=1)  # (cuts, F*m): [k, j*m + i] = edges[j, k]
            if len(layout.tiles) >= 2:
                layout.tiles.clear()
            layout.tiles[key] = tiled
        reached = block.reshape(1, f * m) >= tiled
        # reaching[k + 1, j]: values of column j >= edge k; row 0 all of them, the last none.
        reaching = np.zeros((cuts + 2, f), dtype=np.int64)
        reaching[0] = m
        reaching[1:-1] = reached.view(np.uint8).reshape(cuts, f, m).sum(axis=2, dtype=np.uint16)
        hist = (reaching[:-1] - reaching[1:]).T  # (F, bins)
        if missing is not None:
            hist[:, 0] -= missing
        counts += hist
