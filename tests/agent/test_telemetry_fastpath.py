"""Telemetry aggregation: the batch fast paths give exactly what the per-observation paths give.

``TelemetryRecorder.aggregate`` stacks a batch with a few numpy calls when
every observation has the same kind of arrays, and otherwise takes the
per-observation path that handles each odd case (bad input, shape mismatch,
non-numeric outputs, ...). The same seeded stream, mixing both kinds of batch,
is fed to a recorder as is and to one forced onto the per-observation paths;
their records must be byte-identical.
"""

from __future__ import annotations

import collections
import random
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import agent.telemetry.recorder as telemetry_module
from agent.telemetry import TelemetryRecorder, VitalsProbe, bin_matrix
from edgefleet.wire import ModelRef, TelemetryRecord, Vitals

EDGES = [float(e) for e in np.linspace(-2, 2, 9)]


class FixedVitals(VitalsProbe):
    def __init__(self) -> None:
        pass

    def snapshot(self) -> Vitals:
        return Vitals()


def reference(width: int = 4) -> dict[str, Any]:
    features = [
        {"input": "x", "index": i, "name": f"f{i}", "edges": EDGES, "expected": [0.1] * 10}
        for i in range(width)
    ]
    # Unsorted edges (a hand-edited reference) take bin_matrix's general path.
    features.append({"input": "v", "index": 0, "edges": EDGES[::-1], "expected": [0.1] * 10})
    channels = [
        {"input": "img", "channel": c, "mean": 0.0, "std": 1.0, "edges": EDGES}
        for c in range(3)  # channel 2 is missing from 2-channel images
    ]
    # Output 1 (not class scores) is profiled by value: devices count it over edges.
    id_edges = [float(e) for e in np.linspace(10_500, 15_500, 9)]
    outputs = [{"index": 1, "name": "ids", "edges": id_edges, "counts": [1] * 10, "n": 10}]
    return {"bins": 10, "features": features, "channels": channels, "outputs": outputs}


def make_recorder(
    module: types.ModuleType, directory: Path, ref: dict[str, Any]
) -> TelemetryRecorder:
    clock = iter(range(1_000_000))
    options = module.TelemetryOptions(
        latency_reservoir=100,  # the reservoir subsamples: the rng draws must match too
        sample_rate=0.01,
        samples_per_window=2,
        feedback_per_window=40,
    )
    rec: TelemetryRecorder = module.TelemetryRecorder(
        "pi-1",
        module.Spool(directory, clock=lambda: 1.0),
        options,
        model=ModelRef("tiny", 1),
        drift_reference=ref,
        vitals=FixedVitals(),
        clock=lambda: float(next(clock)),
        rng=random.Random(7),
    )
    return rec


DTYPES = [np.float32, np.float64, np.float16, np.int32, np.uint8, np.bool_, np.dtype(">f4")]


def odd_input(rng: np.random.Generator, inputs: dict[str, Any]) -> Any:
    """One observation's inputs made unusual in one of the ways the fallback handles."""
    kind = int(rng.integers(14))
    x = inputs["x"]
    if kind == 0:
        del inputs["x"]
    elif kind == 1:
        inputs["x"] = None
    elif kind == 2:
        inputs["x"] = x.tolist()
    elif kind == 3:
        inputs["x"] = np.float32(0.5)  # 0-d
    elif kind == 4:
        inputs["x"] = x.ravel()  # 1-D: one value per row
    elif kind == 5:
        inputs["x"] = x[:, :2]  # too narrow: shape-mismatch
    elif kind == 6:
        inputs["x"] = np.array([["a", "b", "c", "d"]], dtype=object)  # bad-input
    elif kind == 7:
        inputs["x"] = x.astype(np.float64 if x.dtype != np.float64 else np.float32)
    elif kind == 8:
        inputs["x"] = np.zeros((0, x.shape[1]), x.dtype)
    elif kind == 9:
        inputs["img"] = inputs["img"][:, :, 0]  # 2-D: not an image
    elif kind == 10:
        inputs["img"] = inputs["img"][:, :1]  # fewer channels
    elif kind == 11:
        inputs["x"] = np.asfortranarray(np.repeat(x, 2, axis=0))  # other rows, layout
    elif kind == 12:
        return types.MappingProxyType(inputs)  # a Mapping, not a dict
    else:
        return [x]  # not a Mapping at all
    return inputs


def odd_outputs(rng: np.random.Generator, outputs: list[Any]) -> Any:
    """One observation's outputs made unusual in one of the ways the fallback handles."""
    kind = int(rng.integers(13))
    probs = outputs[0]
    if kind == 0:
        return tuple(outputs)  # still a Sequence of the same arrays
    if kind == 1:
        return np.stack([probs])  # an ndarray is not a Sequence: ignored
    if kind == 2:
        return outputs[:1]
    if kind == 3:
        return [probs[:, :2], *outputs[1:]]  # another class count
    if kind == 4:
        return [np.float32(1.5), *outputs[1:]]  # 0-d
    if kind == 5:
        return [probs, "label"]
    if kind == 6:
        return [probs.tolist(), *outputs[1:]]
    if kind == 7:
        return [probs.astype(np.float64), *outputs[1:]]
    if kind == 8:
        return [np.zeros((0, probs.shape[1]), probs.dtype), *outputs[1:]]
    if kind == 9:
        return [np.repeat(probs, 3, axis=0), *outputs[1:]]  # other rows per prediction
    if kind == 10:
        return [probs, *outputs[1:], *([np.ones(1)] * 70)]  # more than 64 outputs
    if kind == 11:
        return [np.array([["x", "y"]], dtype=object), *outputs[1:]]
    return []


def odd_pid(rng: np.random.Generator, pid: int, used: list[Any]) -> Any:
    kind = int(rng.integers(7))
    if kind == 0 and used:
        return used[int(rng.integers(len(used)))]  # seen again
    if kind == 1:
        return pid - 5000  # the counter went back (another agent)
    if kind == 2:
        return pid + 1  # the next prediction's id too
    if kind == 3:
        return str(pid)
    if kind == 4:
        return float(pid)
    if kind == 5:
        return 2**70 + pid
    return bool(pid % 2)


def drive(rec: TelemetryRecorder, seed: int) -> list[bytes]:
    """Feed one seeded stream (observations, feedback, window closes); return the records."""
    rng = np.random.default_rng(seed)
    pid = 10_000
    used: list[Any] = []
    for step in range(40):
        n = int(rng.integers(1, 300))
        dtype = DTYPES[int(rng.integers(len(DTYPES)))]
        out_dtype = [np.float32, np.float64, np.int64][int(rng.integers(3))]
        classes = [3, 1, 2000][int(rng.integers(3))] if rng.random() < 0.15 else 3
        # Whole batches that stack but are not the usual one: rows per prediction
        # vary (some none), no rows at all, inputs too narrow for the reference.
        rows_in = [(1, 2), (2, 3), (0, 4), (0, 1)][int(rng.choice(4, p=[0.6, 0.1, 0.2, 0.1]))]
        width = 2 if rng.random() < 0.1 else 5
        odd = rng.random() < 0.5  # a few observations are unusual (the fallback)
        first = pid
        for _ in range(n):
            rows = int(rng.integers(*rows_in))
            x = (rng.normal(size=(rows, width)) * 2).astype(dtype)
            if rng.random() < 0.05 and x.dtype.kind == "f":
                x[:, int(rng.integers(width))] = [np.nan, np.inf, -np.inf][int(rng.integers(3))]
            img = rng.normal(size=(rows, 2, 3, 3)).astype(dtype)
            inputs: Any = {"x": x, "img": img, "v": x[:, :1]}
            probs = rng.random((rows, classes)).astype(out_dtype)
            if rng.random() < 0.03 and probs.dtype.kind == "f":
                probs[:, 0] = np.nan
            outputs: Any = [probs, np.arange(rows) + pid]
            this = pid
            if odd and rng.random() < 0.05:
                inputs = odd_input(rng, inputs)
            if odd and rng.random() < 0.05:
                outputs = odd_outputs(rng, outputs)
            if odd and rng.random() < 0.03:
                this = odd_pid(rng, pid, used)
            pid += 1
            used.append(this)
            rec.observe(inputs, outputs, float(rng.random() / 100), this)
        for k in range(int(rng.integers(0, 12))):
            lo = len(used) - (pid - first if k % 2 else 6000)  # this batch, or any recent
            target = used[int(rng.integers(max(0, lo), len(used)))]
            label = [1, "cat", np.int64(2), 0.5, object()][int(rng.integers(5))]
            rec.feedback(target if rng.random() < 0.9 else -1, label)
        rec.aggregate()
        if step % 7 == 6:
            rec.close_window()
        if step == 25:
            rec.set_model(ModelRef("tiny", 2), reference(width=3))  # forgets predictions
    rec.close_window()
    return [rec.spool.read(seq) or b"" for seq in rec.spool.pending()]


def per_observation_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force every batch onto the per-observation paths."""
    monkeypatch.setattr(telemetry_module, "_stack", lambda arrays: None)
    monkeypatch.setattr(telemetry_module, "_increasing_ints", lambda pids: None)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_paths_give_the_per_observation_records(tmp_path, monkeypatch, seed) -> None:
    fast = drive(make_recorder(telemetry_module, tmp_path / "fast", reference()), seed)
    per_observation_only(monkeypatch)
    slow = drive(make_recorder(telemetry_module, tmp_path / "slow", reference()), seed)
    assert len(fast) == len(slow) >= 6
    for a, b in zip(fast, slow, strict=True):
        assert a == b


def test_fast_paths_are_taken_on_uniform_batches(tmp_path, monkeypatch) -> None:
    rec = make_recorder(telemetry_module, tmp_path / "spool", reference())
    rng = np.random.default_rng(0)
    probs = [rng.random((1, 3)) for _ in range(200)]
    for pid in range(200):
        x = rng.normal(size=(1, 5))
        inputs = {"x": x, "img": rng.normal(size=(1, 2, 3, 3)), "v": x[:, :1]}
        rec.observe(inputs, [probs[pid]], 0.001, pid)

    def refuse(*args: Any) -> None:
        raise AssertionError("per-observation path taken")

    monkeypatch.setattr(TelemetryRecorder, "_feature_rows", staticmethod(refuse))
    monkeypatch.setattr(TelemetryRecorder, "_count_classes", refuse)
    assert rec.aggregate() == 200
    assert len(rec._recent) == 1  # one chunk for the whole batch
    rec.feedback(199, 1)
    rec.close_window()
    (seq,) = rec.spool.pending()
    record = TelemetryRecord.from_bytes(rec.spool.read(seq) or b"")
    assert record.outputs[0].classes is not None and sum(record.outputs[0].classes) == 200
    assert [(f.prediction_id, f.predicted) for f in record.feedback] == [
        (199, int(probs[199].argmax()))
    ]


def test_predicted_classes_match_a_bounded_ordered_dict(tmp_path) -> None:
    """Any pid sequence: the join sees what an OrderedDict trimmed to 4096 would hold."""
    rec = make_recorder(telemetry_module, tmp_path / "spool", reference())
    rng = np.random.default_rng(5)
    model: collections.OrderedDict[Any, int] = collections.OrderedDict()
    pid = 0
    probes: list[Any] = []
    for _ in range(60):
        n = int(rng.integers(1, 600))
        if rng.random() < 0.15:  # a whole increasing batch over ids already kept
            start = int(rng.integers(pid))
            pids: list[Any] = list(range(start, start + n))
        else:
            pids = list(range(pid, pid + n))
        pid = max(pid, pids[-1] + 1)
        if rng.random() < 0.3:  # repeats, a counter reset, odd types
            for _ in range(int(rng.integers(1, 4))):
                k = int(rng.integers(n))
                pids[k] = [pid - 3000, int(rng.integers(pid)), "7", 7.0, np.int64(k)][
                    int(rng.integers(5))
                ]
        winners = rng.integers(0, 3, size=n)
        rec._remember(pids, winners)
        for p, w in zip(pids, winners.tolist(), strict=True):
            model[p] = w
        while len(model) > 4096:
            model.popitem(last=False)
        probes = [*rng.integers(0, pid + 1, size=50).tolist(), "7", 7.0, True, -1]
        for p in probes:
            assert rec._predicted(p) == model.get(p)
        assert rec._recent_len == len(model)


def naive_bins(values: np.ndarray, edges: np.ndarray, bins: int) -> np.ndarray:
    counts = np.zeros((values.shape[1], bins), np.int64)
    for f in range(values.shape[1]):
        for v in values[:, f]:
            if np.isfinite(v):
                counts[f, int((v >= edges[f]).sum())] += 1
    return counts


@pytest.mark.parametrize("seed", range(8))
def test_bin_matrix_counts_edges_at_or_below_each_value(seed) -> None:
    rng = np.random.default_rng(seed)
    n, f, bins = int(rng.integers(0, 400)), int(rng.integers(1, 6)), int(rng.integers(2, 12))
    values = np.round(rng.normal(size=(n, f)), 1)  # values on the edges too
    if n:
        values[rng.random((n, f)) < 0.05] = np.nan
        values[rng.random((n, f)) < 0.02] = np.inf
        values[rng.random((n, f)) < 0.02] = -np.inf
    edges = np.sort(np.round(rng.normal(size=(f, bins - 1)), 1), axis=1)
    if seed % 2:
        edges[0] = edges[0][::-1]  # not ascending: the general path
    if seed % 4 == 3:
        edges[-1, 0] = -np.inf
    counts, nonfinite = bin_matrix(values, edges, bins)
    assert counts.tolist() == naive_bins(values, edges, bins).tolist()
    assert nonfinite.tolist() == (~np.isfinite(values)).sum(axis=0).tolist()


def test_bin_matrix_leaves_its_input_alone() -> None:
    values = np.asfortranarray([[np.nan, 1.0], [0.5, np.inf]])
    before = values.copy()
    bin_matrix(values, np.array([[0.0], [1.0]]), 2)
    np.testing.assert_array_equal(values, before)


def test_output_summary_leaves_out_non_finite_values(tmp_path) -> None:
    rec = make_recorder(telemetry_module, tmp_path / "spool", reference())
    for pid, value in enumerate([1.0, np.nan, 3.0, np.inf]):
        rec.observe({}, [np.array([[value, 0.0]])], 0.001, pid)
    rec.close_window()
    (seq,) = rec.spool.pending()
    (summary,) = TelemetryRecord.from_bytes(rec.spool.read(seq) or b"").outputs
    assert (summary.count, summary.mean, summary.max) == (6, round(4.0 / 6, 6), 3.0)
