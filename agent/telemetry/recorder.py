"""The telemetry recorder: per-prediction observations -> windowed records in the spool.

See the package docstring (``agent.telemetry``) for the flow: an O(1) hot path,
vectorized aggregation off it, and one record per window written to the spool.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import logging
import math
import operator
import random
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from agent.telemetry.binning import _bin_matrix, _Profile, confidence_counts
from agent.telemetry.options import TelemetryOptions
from agent.telemetry.spool import Spool
from agent.telemetry.vitals import VitalsProbe
from edgefleet.ids import KIND_RE
from edgefleet.wire import (
    MAX_SAMPLE_BYTES,
    ArraySample,
    ChannelCounts,
    FeatureCounts,
    Feedback,
    LatencySummary,
    MalformedMessageError,
    ModelRef,
    OutputSummary,
    Sample,
    ShadowSummary,
    SpoolCounters,
    TelemetryRecord,
    UpdateEvent,
)

if TYPE_CHECKING:
    from edgefleet.wire.telemetry import DType

__all__ = ["TelemetryRecorder"]

log = logging.getLogger(__name__)

_RECENT_MAX = 4096  # predictions whose class is remembered for feedback


@dataclass
class _OutputAcc:
    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    lo: float = math.inf
    hi: float = -math.inf
    classes: np.ndarray | None = None
    class_dim: int | None = None
    confidence: np.ndarray | None = None  # top-class probability, CONFIDENCE_BINS bins
    counts: np.ndarray | None = None  # values over the reference's edges for this output


@dataclass
class _Window:
    start: float
    predictions: int = 0
    errors: int = 0
    error_kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies: list[np.ndarray] = field(default_factory=list)
    latency_count: int = 0
    features: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    channels: dict[tuple[str, int], list[Any]] = field(default_factory=dict)
    outputs: dict[int, _OutputAcc] = field(default_factory=dict)
    # sampled predictions: a uniform reservoir of the window's candidates
    # (pid, inputs, outputs, probability of being a candidate, exploration)
    reservoir: list[tuple[Any, Any, Any, float, bool]] = field(default_factory=list)
    candidates: int = 0
    feedback: list[Feedback] = field(default_factory=list)
    events: list[UpdateEvent] = field(default_factory=list)
    dropped: int = 0


def _stack(arrays: Sequence[Any]) -> np.ndarray | None:
    """``np.concatenate(arrays)`` when every item is an ndarray of one numeric dtype.

    The fast paths' precondition: anything else (``None``, lists, scalars,
    ndarray subclasses, mixed dtypes, 0-d arrays, differing trailing shapes)
    gives ``None`` and the per-observation path, which handles each case.
    """
    first = arrays[0]
    if type(first) is not np.ndarray or first.dtype.kind not in "biuf":
        return None
    if len(set(map(type, arrays))) != 1:
        return None
    try:  # checks the shapes; casting="no" refuses any other dtype (byte order too)
        return np.concatenate(arrays, dtype=first.dtype, casting="no")
    except (TypeError, ValueError):
        return None


class _InputStacks:
    """Per batch: each input name's arrays stacked by ``_stack`` (once per name)."""

    def __init__(self, inputs: Sequence[Any]) -> None:
        self._inputs = inputs
        # itemgetter on a plain dict is .get except for missing keys (-> the slow path).
        self._dicts = set(map(type, inputs)) == {dict}
        self._stacked: dict[str, np.ndarray | None] = {}

    def get(self, name: str) -> np.ndarray | None:
        if name not in self._stacked:
            stacked = None
            if self._dicts:
                try:
                    values = list(map(operator.itemgetter(name), self._inputs))
                except KeyError:
                    values = None
                if values is not None:
                    stacked = _stack(values)
            self._stacked[name] = stacked
        return self._stacked[name]


def _increasing_ints(pids: Sequence[Any]) -> np.ndarray | None:
    """``pids`` as a strictly increasing integer array, or ``None``."""
    try:
        keys = np.array(pids)
    except (OverflowError, TypeError, ValueError):
        return None
    if keys.ndim != 1 or keys.dtype.kind != "i":
        return None
    if len(keys) > 1 and not bool((keys[1:] > keys[:-1]).all()):
        return None
    return keys


def _count_over_edges(values: np.ndarray, edges: np.ndarray, bins: int) -> np.ndarray | None:
    """``bincount(searchsorted(edges, values, side="right"), minlength=bins)`` when cheap.

    With ascending edges, "at least k+1 edges <= v" is "v >= edges[k]", so the
    histogram is the difference of how many values reach each edge: one
    vectorized comparison per edge instead of a binary search per value (about
    ten times faster for the usual ten bins). Returns ``None`` (the caller
    searches) when a value is not finite, the edges do not ascend, or there
    are more than 32 of them.
    """
    cuts = len(edges)
    if not values.size or cuts != bins - 1 or cuts > 32:
        return None
    if not (math.isfinite(values.min()) and math.isfinite(values.max())):
        return None  # NaN propagates through min/max; infinities show
    if cuts > 1 and not bool((edges[1:] >= edges[:-1]).all()):
        return None
    reaching = np.empty(cuts + 2, dtype=np.int64)
    reaching[0] = values.size
    reaching[-1] = 0
    for k in range(cuts):
        reaching[k + 1] = np.count_nonzero(values >= edges[k])
    return reaching[:-1] - reaching[1:]


def _add_output_values(acc: _OutputAcc, flat: np.ndarray) -> None:
    finite = np.isfinite(flat)
    good = flat if finite.all() else flat[finite]
    acc.count += int(good.size)
    if good.size:
        acc.total += float(good.sum())
        acc.total_sq += float(np.square(good).sum())
        acc.lo = min(acc.lo, float(good.min()))
        acc.hi = max(acc.hi, float(good.max()))


def _add_confidence(acc: _OutputAcc, matrix: np.ndarray, winners: np.ndarray) -> None:
    counts = confidence_counts(matrix, winners)
    acc.confidence = counts if acc.confidence is None else acc.confidence + counts


def _add_output_counts(acc: _OutputAcc, flat: np.ndarray, edges: np.ndarray | None) -> None:
    """Count an output's finite values over its reference edges (outputs profiled by value)."""
    if edges is None:
        return
    bins = len(edges) + 1
    good = flat[np.isfinite(flat)]
    counts = _count_over_edges(good, edges, bins)
    if counts is None:
        counts = np.bincount(np.searchsorted(edges, good, side="right"), minlength=bins)
    acc.counts = counts if acc.counts is None else acc.counts + counts


def _encode_array(array: Any) -> ArraySample | None:
    try:
        a = np.asarray(array)
        name = a.dtype.name
        if a.dtype.kind not in "biuf":
            return None
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        data = a.tobytes()
    except (TypeError, ValueError):
        return None
    if len(data) > MAX_SAMPLE_BYTES:
        return None
    try:
        # An unsupported dtype name is refused by ArraySample's own validation.
        return ArraySample(cast("DType", name), tuple(int(n) for n in a.shape), data)
    except MalformedMessageError:
        return None


def _stat(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(round(value, 6))


class TelemetryRecorder:
    """Turns observations into windowed records in a ``Spool``.

    Thread model: ``observe``, ``feedback`` and ``observe_error`` may be called
    from any thread and never block; one background thread (``start``) drains
    and closes windows; ``aggregate``/``close_window`` may also be called
    directly (tests, shutdown).
    """

    def __init__(
        self,
        device_id: str,
        spool: Spool,
        options: TelemetryOptions | None = None,
        *,
        model: ModelRef | None = None,
        drift_reference: Mapping[str, Any] | None = None,
        shadow_stats: Callable[[], Mapping[str, Any] | None] | None = None,
        vitals: VitalsProbe | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.device_id = device_id
        self.spool = spool
        self.options = options or TelemetryOptions()
        self._clock = clock
        self._rng = rng or random.Random()
        self._random = self._rng.random
        self._buf: collections.deque[tuple[Any, Any, float, int]] = collections.deque(
            maxlen=self.options.buffer_max
        )
        self._seen = itertools.count()
        self._seen_value = 0
        self._drained = 0
        self._errors: collections.deque[str] = collections.deque(maxlen=10_000)
        self._labels: collections.deque[tuple[int, Any, float]]  # (pid, label, when given)
        self._labels = collections.deque(maxlen=10_000)
        sampling = self.options.samples_per_window > 0 and self.options.sample_rate > 0
        self._sample_rate = self.options.sample_rate if sampling else 0.0
        self._explore_share = self.options.explore_share if sampling else 0.0
        self._explore_salt = zlib.crc32(device_id.encode("utf-8"))
        self._np_rng: np.random.Generator | None = None  # made when sampling first draws
        # (first pid, last pid, drain time) of recent batches of increasing integer pids
        self._drains: collections.deque[tuple[int, int, float]] = collections.deque(maxlen=4096)
        # Predicted classes for joining feedback labels: see _remember.
        self._recent: collections.deque[tuple[Any, Any]] = collections.deque()
        self._recent_len = 0
        self._recent_top: float = -math.inf  # above every pid kept (inf: unknown)
        self._recent_map: dict[Any, int] | None = None  # built when feedback arrives
        self._lock = threading.RLock()
        self._model = model
        self._profile = _Profile.compile(drift_reference)
        self._shadow_stats = shadow_stats
        self._vitals = vitals or VitalsProbe(spool.dir)
        self._window = _Window(start=clock())
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.records_written = 0
        self.records_lost = 0

    # ---------------------------------------------------------------- hot path

    def observe(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[np.ndarray],
        latency_s: float,
        prediction_id: int,
    ) -> None:
        """Record one prediction: O(1), lock-free, keeps references only."""
        self._buf.append((inputs, outputs, latency_s, prediction_id))
        # Appended before counted, so aggregate() can under-count drops under
        # concurrent observers but never over-count them.
        self._seen_value = next(self._seen) + 1

    def observe_error(self, kind: str = "error") -> None:
        """Count a failed prediction (``kind``: a short lowercase word)."""
        self._errors.append(kind)

    def feedback(self, prediction_id: int, label: Any) -> None:
        """Attach a ground-truth label to an earlier prediction (reported with it)."""
        self._labels.append((prediction_id, label, self._clock()))

    def exploring(self, prediction_id: Any) -> bool:
        """Whether ``prediction_id`` is in the exploration share (always sampled, flagged).

        A fixed function of the id and the device (a SplitMix64 hash against
        ``explore_share``), so an application can ask before it decides
        whether to collect a label, and label exploration predictions
        whatever the model answered: their labels are the unbiased holdout
        of the feedback audit. False while sampling is off.
        """
        if not self._explore_share or type(prediction_id) is not int:
            return False
        if not 0 <= prediction_id < 1 << 63:
            return False
        return bool(self._explore_many(np.asarray([prediction_id], dtype=np.int64))[0])

    def _explore_many(self, pids: np.ndarray) -> np.ndarray:
        """``exploring`` of an array of non-negative integer ids."""
        with np.errstate(over="ignore"):
            z = pids.astype(np.uint64) + np.uint64(self._explore_salt * 0x9E3779B97F4A7C15 % 2**64)
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            z = z ^ (z >> np.uint64(31))
        return np.asarray((z >> np.uint64(11)) < np.uint64(int(self._explore_share * 2**53)))

    # ------------------------------------------------------------ bookkeeping

    def event(
        self,
        kind: str,
        *,
        desired_version: int | None = None,
        model: ModelRef | None = None,
        reason: str | None = None,
    ) -> UpdateEvent:
        """Record an update event in the current window and return it.

        Raises:
            MalformedMessageError: ``kind`` is not a short lowercase word.
        """
        ev = UpdateEvent(
            round(self._clock(), 3),
            kind,
            desired_version,
            model,
            None if reason is None else reason[:1024],
        )
        with self._lock:
            if len(self._window.events) < self.options.events_per_window:
                self._window.events.append(ev)
        return ev

    def set_model(self, model: ModelRef | None, drift_reference: Mapping[str, Any] | None) -> None:
        """Switch the model being observed; the current window is closed first."""
        with self._lock:
            self.aggregate()
            if self._window.predictions:
                self.close_window()
            self._model = model
            self._profile = _Profile.compile(drift_reference)
            self._forget_predictions()

    # ------------------------------------------------------------ aggregation

    def aggregate(self) -> int:
        """Drain the hot-path buffers into the current window; return observations drained."""
        with self._lock:  # the only consumer: drains never race each other
            pop = self._buf.popleft
            # What is there now; observations appended meanwhile wait for the next drain.
            batch: list[tuple[Any, Any, float, int]] = [pop() for _ in range(len(self._buf))]
            w = self._window
            seen = self._seen_value
            self._drained += len(batch)
            lost = seen - self._drained - len(self._buf)
            if lost > 0:
                w.dropped += lost
                self._drained += lost
            while self._errors:
                kind = self._errors.popleft()
                w.errors += 1
                if len(w.error_kinds) < 32 or kind in w.error_kinds:
                    w.error_kinds[kind if KIND_RE.fullmatch(kind) else "error"] += 1
            if batch:
                self._aggregate_batch(w, batch)
            self._take_feedback(w)
        return len(batch)

    def _aggregate_batch(self, w: _Window, batch: list[tuple[Any, Any, float, int]]) -> None:
        w.predictions += len(batch)
        inputs, outputs, latencies, pids = zip(*batch, strict=True)
        lat = np.fromiter(latencies, dtype=np.float64, count=len(batch)) * 1000.0
        room = self.options.latency_reservoir - w.latency_count
        if room < len(lat):  # keep a uniform subsample beyond the reservoir size
            keep = self._rng.sample(range(len(lat)), max(0, room)) if room > 0 else []
            lat = lat[sorted(keep)] if keep else lat[:0]
        if len(lat):
            w.latencies.append(lat)
            w.latency_count += len(lat)
        if self._profile is not None:
            stacks = _InputStacks(inputs)
            self._bin_features(w, inputs, stacks, self._profile)
            self._bin_channels(w, inputs, stacks, self._profile)
        self._summarise_outputs(w, outputs, pids)
        self._note_drain(pids)
        if self._sample_rate:
            self._sample(w, inputs, outputs, pids)

    def _note_drain(self, pids: Sequence[Any]) -> None:
        """Remember the batch's id range and drain time, for ``predicted_at`` of feedback."""
        if type(pids[0]) is not int:
            return
        try:
            lo, hi = min(pids), max(pids)
        except TypeError:  # ids that do not compare
            return
        if type(lo) is not int or type(hi) is not int:
            return
        if self._drains and lo <= self._drains[-1][1]:
            self._drains.clear()  # ids started again or overlap: keep the ranges disjoint
        self._drains.append((lo, hi, self._clock()))

    def _sample(
        self,
        w: _Window,
        inputs: Sequence[Any],
        outputs: Sequence[Any],
        pids: Sequence[Any],
    ) -> None:
        """Take the batch's sampling candidates into the window's reservoir.

        A prediction is a candidate with probability ``sample_rate``, or
        always when it is in the exploration share; the window keeps a uniform
        reservoir of at most ``samples_per_window`` candidates (Algorithm R),
        so a kept sample's inclusion probability is its candidate probability
        times ``min(1, kept / candidates)``, stated in the record.
        """
        n = len(pids)
        explore = np.zeros(n, dtype=bool)
        if self._explore_share:
            ints = [p if type(p) is int and 0 <= p < 1 << 63 else -1 for p in pids]
            ids = np.asarray(ints, dtype=np.int64)
            explore = self._explore_many(np.maximum(ids, 0)) & (ids >= 0)
        if self._np_rng is None:  # numpy.random loads on first use: not without sampling
            self._np_rng = np.random.default_rng(self._rng.getrandbits(64))
        chosen = np.flatnonzero(explore | (self._np_rng.random(n) < self._sample_rate))
        cap = self.options.samples_per_window
        for k in chosen.tolist():
            flagged = bool(explore[k])
            item = (pids[k], inputs[k], outputs[k], 1.0 if flagged else self._sample_rate, flagged)
            w.candidates += 1
            if len(w.reservoir) < cap:
                w.reservoir.append(item)
            else:
                slot = self._rng.randrange(w.candidates)
                if slot < cap:
                    w.reservoir[slot] = item

    # Each step below has a fast path for the common batch (every observation
    # gives the same kind of array, so the batch is one concatenation) and the
    # per-observation path for anything else. Both feed the same accumulation,
    # in the same order, so they produce identical records.

    def _bin_features(
        self, w: _Window, inputs: Sequence[Any], stacks: _InputStacks, p: _Profile
    ) -> None:
        for name, (columns, _, edges) in p.features.items():
            need = int(columns.max()) + 1 if len(columns) else 0
            layout = p.layouts[name]
            matrix = None
            stacked = stacks.get(name)
            if stacked is not None:
                width = math.prod(stacked.shape[1:])
                if width >= max(need, 1):  # else some observations are counted as mismatches
                    rows = stacked.reshape(len(stacked), width)
                    rows = rows[:, : len(columns)] if layout.leading else rows[:, columns]
                    # float32 is binned as is (bin_matrix gives what it would in float64)
                    same = rows.dtype == np.float32
                    matrix = rows if same else rows.astype(np.float64, copy=False)
            if matrix is None:
                matrix = self._feature_rows(w, inputs, name, columns, need)
            if matrix is None or not len(matrix):
                continue
            counts, nonfinite = _bin_matrix(matrix, edges, p.bins, layout)
            acc = w.features.get(name)
            if acc is None:
                w.features[name] = (counts, nonfinite)
            else:
                acc[0][...] += counts
                acc[1][...] += nonfinite

    @staticmethod
    def _feature_rows(
        w: _Window, inputs: Sequence[Any], name: str, columns: np.ndarray, need: int
    ) -> np.ndarray | None:
        parts = []
        for obs_inputs in inputs:
            value = obs_inputs.get(name) if isinstance(obs_inputs, Mapping) else None
            if value is None:
                continue
            try:
                a = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError):
                w.error_kinds["bad-input"] += 1
                continue
            if a.size == 0:
                continue
            a = a.reshape(1, -1) if a.ndim == 0 else a.reshape(a.shape[0], -1)
            if a.shape[1] < need:
                w.error_kinds["shape-mismatch"] += 1
                continue
            parts.append(a[:, columns])
        return np.concatenate(parts) if parts else None

    def _bin_channels(
        self, w: _Window, inputs: Sequence[Any], stacks: _InputStacks, p: _Profile
    ) -> None:
        for name, chans in p.channels.items():
            stacked = stacks.get(name)
            if stacked is not None:
                if stacked.ndim < 3 or not stacked.size:
                    continue
                images = stacked.astype(np.float64, copy=False)
                images = images.reshape(images.shape[0], images.shape[1], -1)
                for channel, edges in chans:
                    if images.shape[1] > channel:
                        values = images[:, channel].ravel()
                        self._add_channel(w, name, channel, edges, p.bins, values)
                continue
            arrays = []
            for obs_inputs in inputs:
                value = obs_inputs.get(name) if isinstance(obs_inputs, Mapping) else None
                if value is None:
                    continue
                try:
                    a = np.asarray(value, dtype=np.float64)
                except (TypeError, ValueError):
                    continue
                if a.ndim >= 3 and a.size:
                    arrays.append(a.reshape(a.shape[0], a.shape[1], -1))
            if not arrays:
                continue
            for channel, edges in chans:
                parts = [a[:, channel].ravel() for a in arrays if a.shape[1] > channel]
                if parts:
                    values = np.concatenate(parts)
                    self._add_channel(w, name, channel, edges, p.bins, values)

    @staticmethod
    def _add_channel(
        w: _Window, name: str, channel: int, edges: np.ndarray, bins: int, values: np.ndarray
    ) -> None:
        counts = _count_over_edges(values, edges, bins)
        if counts is not None:  # every value finite: no mask, no copy
            good, nonfinite = values, 0
        else:
            fin = np.isfinite(values)
            good = values[fin]
            nonfinite = int(values.size - good.size)
            idx = np.searchsorted(edges, good, side="right")
            counts = np.bincount(idx, minlength=bins).astype(np.int64)
        # [counts, nonfinite, n, sum, sum of squares]
        acc = w.channels.setdefault((name, channel), [np.zeros(bins, np.int64), 0, 0, 0.0, 0.0])
        acc[0] += counts
        acc[1] += nonfinite
        acc[2] += int(good.size)
        acc[3] += float(good.sum())
        acc[4] += float(np.square(good).sum())

    def _summarise_outputs(self, w: _Window, outputs: Sequence[Any], pids: Sequence[Any]) -> None:
        edges = self._profile.outputs if self._profile is not None else {}
        same_length = False
        if set(map(type, outputs)) <= {list, tuple}:
            lengths = set(map(len, outputs))
            n_out = max(lengths)
            same_length = len(lengths) == 1
        else:
            n_out = max((len(o) for o in outputs if isinstance(o, Sequence)), default=0)
        for j in range(min(n_out, 64)):
            column = [o[j] for o in outputs] if same_length else None
            stacked = _stack(column) if column else None
            if column is not None and stacked is not None:
                acc = w.outputs.setdefault(j, _OutputAcc())
                flat = stacked.astype(np.float64, copy=False).ravel()
                _add_output_values(acc, flat)
                _add_output_counts(acc, flat, edges.get(j))
                self._count_stacked_classes(acc, column, stacked, pids if j == 0 else None)
                continue
            arrays = []
            kept = []
            for outs, pid in zip(outputs, pids, strict=True):
                if not isinstance(outs, Sequence) or len(outs) <= j:
                    continue
                try:
                    a = np.asarray(outs[j])
                except (TypeError, ValueError):
                    continue
                if a.dtype.kind not in "biuf":
                    continue
                arrays.append(a)
                kept.append(pid)
            if not arrays:
                continue
            acc = w.outputs.setdefault(j, _OutputAcc())
            flat = np.concatenate([a.astype(np.float64, copy=False).ravel() for a in arrays])
            _add_output_values(acc, flat)
            _add_output_counts(acc, flat, edges.get(j))
            self._count_classes(acc, arrays, kept if j == 0 else None)

    def _count_classes(
        self, acc: _OutputAcc, arrays: list[np.ndarray], pids: list[Any] | None
    ) -> None:
        dim = arrays[0].shape[-1] if arrays[0].ndim >= 2 else None
        if dim is None or not 2 <= dim <= 1024:
            return
        rows = [a.reshape(-1, dim) for a in arrays if a.ndim >= 2 and a.shape[-1] == dim]
        if not rows:
            return
        if acc.class_dim is None:
            acc.class_dim = dim
            acc.classes = np.zeros(dim, dtype=np.int64)
        if acc.class_dim != dim or acc.classes is None:
            return
        lengths = [len(r) for r in rows]
        matrix = np.concatenate(rows)
        winners = np.argmax(matrix, axis=1)
        acc.classes += np.bincount(winners, minlength=dim)
        _add_confidence(acc, matrix, winners)
        if pids is not None and len(rows) == len(pids):
            starts = np.cumsum([0, *lengths[:-1]])
            kept = [k for k, length in enumerate(lengths) if length]
            self._remember([pids[k] for k in kept], winners[starts[kept]])

    def _count_stacked_classes(
        self,
        acc: _OutputAcc,
        column: list[np.ndarray],
        stacked: np.ndarray,
        pids: Sequence[Any] | None,
    ) -> None:
        """``_count_classes`` for a column of arrays of one shape and dtype, ``stacked``."""
        first = column[0]
        dim = first.shape[-1] if first.ndim >= 2 else None
        if dim is None or not 2 <= dim <= 1024:
            return
        if acc.class_dim is None:
            acc.class_dim = dim
            acc.classes = np.zeros(dim, dtype=np.int64)
        if acc.class_dim != dim or acc.classes is None:
            return
        matrix = stacked.reshape(-1, dim)
        winners = np.argmax(matrix, axis=1)
        acc.classes += np.bincount(winners, minlength=dim)
        _add_confidence(acc, matrix, winners)
        per_item = math.prod(first.shape[1:-1])  # rows of `dim` per leading index
        if pids is None or not per_item:
            return
        leading = list(map(len, column))
        if leading.count(leading[0]) == len(leading):
            if leading[0]:
                self._remember(pids, winners[:: leading[0] * per_item])
            return
        lengths = np.asarray(leading) * per_item
        starts = np.cumsum(lengths) - lengths
        kept = np.flatnonzero(lengths)
        self._remember([pids[k] for k in kept.tolist()], winners[starts[kept]])

    # ------------------------------------------------- predicted classes for feedback

    def _remember(self, pids: Sequence[Any], winners: np.ndarray) -> None:
        """Remember each prediction's class (the first row's argmax) for feedback.

        Behaves exactly as an insertion-ordered dict ``pid -> class`` (a pid
        seen again keeps its place and takes the new class) trimmed to the
        ``_RECENT_MAX`` oldest-inserted. Kept as chunks ``(pids, classes)``,
        oldest first, with distinct pids across all chunks: a batch of
        increasing integer pids above every pid kept (the agent's counter) is
        one appended chunk; anything else replays the dict, one item at a time.
        """
        if not len(pids):
            return
        self._recent_map = None
        keys = _increasing_ints(pids)
        if keys is not None and int(keys[0]) > self._recent_top:
            # Contiguous: a strided view would keep the batch's whole argmax array alive.
            self._recent.append((keys, np.ascontiguousarray(winners)))
            self._recent_len += len(keys)
            self._recent_top = int(keys[-1])
            excess = self._recent_len - _RECENT_MAX
            while excess > 0:
                old_keys, old_winners = self._recent[0]
                if len(old_keys) <= excess:
                    self._recent.popleft()
                    self._recent_len -= len(old_keys)
                    excess -= len(old_keys)
                else:
                    old_keys, old_winners = old_keys[excess:], old_winners[excess:]
                    if isinstance(old_keys, np.ndarray):  # copies: free the trimmed part
                        old_keys, old_winners = old_keys.copy(), old_winners.copy()
                    self._recent[0] = (old_keys, old_winners)
                    self._recent_len -= excess
                    excess = 0
            return
        known = collections.OrderedDict(self._recent_items())
        try:  # an unhashable pid raises here, keeping the pids before it (as a dict would)
            for pid, winner in zip(pids, winners.tolist(), strict=True):
                known[pid] = winner
            while len(known) > _RECENT_MAX:
                known.popitem(last=False)
        finally:
            self._recent.clear()
            self._recent.append((tuple(known), tuple(known.values())))
            self._recent_len = len(known)
            if all(isinstance(k, (int, np.integer)) for k in known):
                self._recent_top = max((int(k) for k in known), default=-math.inf)
            else:
                self._recent_top = math.inf  # a non-integer pid: replay until it is trimmed

    def _recent_items(self) -> Iterator[tuple[Any, int]]:
        for keys, winners in self._recent:
            if isinstance(keys, np.ndarray):
                yield from zip(keys.tolist(), winners.tolist(), strict=True)
            else:
                yield from zip(keys, winners, strict=True)

    def _predicted(self, pid: Any) -> int | None:
        """The class remembered for ``pid`` (``dict.get`` semantics, so it may raise TypeError)."""
        if self._recent_map is None:
            self._recent_map = dict(self._recent_items())
        return self._recent_map.get(pid)

    def _forget_predictions(self) -> None:
        self._recent.clear()
        self._recent_len = 0
        self._recent_top = -math.inf
        self._recent_map = None

    def _samples(self, w: _Window) -> tuple[Sample, ...]:
        """The window's reservoir encoded, in prediction order, with inclusion probabilities."""
        kept = min(1.0, len(w.reservoir) / w.candidates) if w.candidates else 1.0
        out = []
        for pid, inputs, outputs, chance, flagged in w.reservoir:
            encoded_in = {}
            if isinstance(inputs, Mapping):
                for name, value in list(inputs.items())[:64]:
                    enc = _encode_array(value)
                    if enc is not None:
                        encoded_in[str(name)[:256]] = enc
            encoded_out = tuple(
                e for e in (_encode_array(o) for o in list(outputs)[:64]) if e is not None
            ) if isinstance(outputs, Sequence) else ()  # fmt: skip
            try:
                sample = Sample(int(pid), encoded_in, encoded_out, chance * kept, flagged)
            except (MalformedMessageError, TypeError, ValueError):
                w.error_kinds["bad-sample"] += 1
                continue
            out.append(sample)
        out.sort(key=lambda smp: smp.prediction_id)
        return tuple(out)

    def _predicted_at(self, pid: Any) -> float | None:
        """When ``pid`` was drained (within ``aggregate_interval_s`` of the prediction)."""
        if type(pid) is not int or not self._drains or pid < self._drains[0][0]:
            return None
        k = bisect.bisect_right([first for first, _, _ in self._drains], pid) - 1
        first, last, when = self._drains[k]
        return round(when, 3) if first <= pid <= last else None

    def _take_feedback(self, w: _Window) -> None:
        while self._labels:
            pid, label, given = self._labels.popleft()
            if len(w.feedback) >= self.options.feedback_per_window:
                w.dropped += 1
                continue
            if isinstance(label, np.generic):
                label = label.item()
            try:
                w.feedback.append(
                    Feedback(
                        int(pid), label, self._predicted(pid),
                        self.exploring(pid) if self._explore_share else None,
                        self._predicted_at(pid), round(max(given, 0.0), 3),
                    )
                )  # fmt: skip
            except (MalformedMessageError, TypeError, ValueError):
                w.error_kinds["bad-feedback"] += 1

    # ------------------------------------------------------------ window close

    def _build(self, w: _Window, end: float, seq: int, counters: SpoolCounters) -> bytes:
        latency = None
        if w.latency_count:
            lat = np.concatenate(w.latencies)
            p50, p95, p99 = (float(round(v, 6)) for v in np.quantile(lat, [0.5, 0.95, 0.99]))
            latency = LatencySummary(
                count=w.predictions,
                mean=float(round(lat.mean(), 6)),
                p50=p50,
                p95=p95,
                p99=p99,
                max=float(round(lat.max(), 6)),
            )
        outputs = []
        for j, acc in sorted(w.outputs.items()):
            mean = acc.total / acc.count if acc.count else None
            var = acc.total_sq / acc.count - mean * mean if mean is not None else None
            outputs.append(
                OutputSummary(
                    j,
                    acc.count,
                    _stat(mean),
                    _stat(math.sqrt(max(var, 0.0))) if var is not None else None,
                    _stat(acc.lo) if acc.count else None,
                    _stat(acc.hi) if acc.count else None,
                    None if acc.classes is None else tuple(int(c) for c in acc.classes),
                    None if acc.confidence is None else tuple(int(c) for c in acc.confidence),
                    None if acc.counts is None else tuple(int(c) for c in acc.counts),
                )
            )
        features = []
        channels = []
        if self._profile is not None:
            for name, (columns, names, _) in self._profile.features.items():
                acc_f = w.features.get(name)
                for k, col in enumerate(columns):
                    counts = acc_f[0][k] if acc_f else np.zeros(self._profile.bins, np.int64)
                    nonfinite = int(acc_f[1][k]) if acc_f else 0
                    features.append(
                        FeatureCounts(
                            name, int(col), names[k][:256], tuple(int(c) for c in counts), nonfinite
                        )
                    )
            for name, chans in self._profile.channels.items():
                for channel, _ in chans:
                    acc_c = w.channels.get((name, channel))
                    if acc_c is None:
                        channels.append(ChannelCounts(name, channel, (0,) * self._profile.bins))
                        continue
                    n = acc_c[2]
                    mean = acc_c[3] / n if n else None
                    std = (
                        math.sqrt(max(acc_c[4] / n - mean * mean, 0.0))
                        if mean is not None
                        else None
                    )
                    channels.append(
                        ChannelCounts(
                            name,
                            channel,
                            tuple(int(c) for c in acc_c[0]),
                            acc_c[1],
                            _stat(mean),
                            _stat(std),
                        )
                    )
        record = TelemetryRecord(
            device_id=self.device_id,
            seq=seq,
            window_start=round(w.start, 3),
            window_end=round(max(end, w.start), 3),
            model=self._model,
            predictions=w.predictions,
            errors=w.errors,
            error_kinds=dict(w.error_kinds),
            latency_ms=latency,
            outputs=tuple(outputs),
            features=tuple(features[:4096]),
            channels=tuple(channels[:4096]),
            shadow=self._shadow_summary(),
            health=self._vitals.snapshot(),
            events=tuple(w.events),
            spool=counters,
            dropped_observations=w.dropped,
            samples=self._samples(w),
            feedback=tuple(w.feedback),
        )
        return record.to_bytes()

    def _shadow_summary(self) -> ShadowSummary | None:
        if self._shadow_stats is None:
            return None
        try:
            stats = self._shadow_stats()
        except Exception:  # the shadow runner is optional; its bugs must not stop telemetry
            log.exception("telemetry: shadow stats failed")
            return None
        if not stats:
            return None
        try:
            model = ModelRef(str(stats["model"]), int(stats["version"]))
        except (KeyError, TypeError, ValueError, MalformedMessageError):
            model = None

        def num(key: str, hi: float = math.inf) -> float | None:
            v = stats.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                return float(round(min(max(float(v), 0.0), hi), 6))
            return None

        try:
            return ShadowSummary(
                model=model,
                compared=int(stats.get("compared") or 0),
                dropped=int(stats.get("dropped") or 0),
                agreement=num("top1_agreement", 1.0),
                mean_abs_diff=num("mean_abs_diff"),
                latency_p50_ms=num("shadow_latency_ms_p50"),
                active_latency_p50_ms=num("active_latency_ms_p50"),
                labelled=int(stats.get("labelled") or 0),
                active_accuracy=num("active_accuracy", 1.0),
                shadow_accuracy=num("shadow_accuracy", 1.0),
            )
        except (MalformedMessageError, TypeError, ValueError):
            return None

    def close_window(self) -> int | None:
        """Aggregate, close the current window into the spool; return its ``seq``.

        Returns ``None`` when the record could not be stored (counted; the
        next record reports it). Never raises for I/O errors.
        """
        with self._lock:
            self.aggregate()
            end = self._clock()
            w, self._window = self._window, _Window(start=end)
            try:
                seq = self.spool.append(lambda s, c: self._build(w, end, s, c))
            except (MalformedMessageError, ValueError) as exc:  # a bug, not an I/O problem
                log.exception("telemetry: cannot build record: %s", exc)
                seq = None
            if seq is None:
                self.records_lost += 1
            else:
                self.records_written += 1
            return seq

    # ------------------------------------------------------------------ thread

    def start(self) -> None:
        """Run aggregation and window closing in a background thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = min(self.options.aggregate_interval_s, self.options.window_s)
        while not self._stop.wait(interval):
            try:
                self.aggregate()
                if self._clock() - self._window.start >= self.options.window_s:
                    self.close_window()
            except Exception:  # keep serving: telemetry problems are reported, not fatal
                log.exception("telemetry: aggregation failed")

    def stop(self, *, flush: bool = True) -> None:
        """Stop the thread; with ``flush``, close the current window into the spool."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if flush:
            self.close_window()
