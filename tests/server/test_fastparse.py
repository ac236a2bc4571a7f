"""The msgspec fast path accepts a subset of what the reference parser accepts.

``server.mqtt.fastparse.summarize`` may refuse a valid record (the ingester
then asks ``TelemetryRecord.from_bytes``), but it must never accept one the
reference refuses, and where both accept, the summaries must be equal. These
tests fuzz that invariant: structural mutations at every path of several
records, byte-level mutations of their JSON, and a table of edge cases; and
they check that the fast path does accept the records devices really send
(a fast path that refused everything would satisfy the invariant uselessly).
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.messages import (
    MAX_UNIX_TS,
    FeatureCounts,
    LatencySummary,
    MalformedMessageError,
    ModelRef,
    OutputSummary,
    TelemetryRecord,
)
from server.mqtt import fastparse
from server.services.telemetry import RecordSummary
from tests.test_messages import full_record


def reference(payload: bytes) -> RecordSummary | None:
    """The reference verdict: the summary, or None when it refuses (and only so)."""
    try:
        return RecordSummary.of(TelemetryRecord.from_bytes(payload))
    except MalformedMessageError:
        return None


def check(payload: bytes) -> RecordSummary | None:
    fast = fastparse.summarize(payload)
    ref = reference(payload)
    if fast is not None:
        assert ref == fast, (payload[:400], fast, ref)
    return fast


def bench_record() -> TelemetryRecord:
    """The shape ``benchmarks/ingest.py`` sends: latency, outputs, 8 histograms."""
    return TelemetryRecord(
        device_id="bench-0001",
        seq=1_780_315_200_000,
        window_start=1_780_315_200.0,
        window_end=1_780_315_260.0,
        model=ModelRef("fraud", 4),
        predictions=1200,
        errors=1,
        latency_ms=LatencySummary(1200, 1.8, 1.6, 3.1, 4.4, 9.7),
        outputs=(OutputSummary(0, 3600, 0.33, 0.41, 0.0, 1.0, (1100, 60, 40)),),
        features=tuple(FeatureCounts("x", f, f"f{f}", (f,) * 10, 0) for f in range(8)),
    )


BASES = {
    "minimal": TelemetryRecord("pi-1", 1, 0.0, 0.0),
    "bench": bench_record(),
    "full-without-samples": replace(full_record(), samples=()),
    "full": full_record(),
}
DOCS = {name: r.to_dict() for name, r in BASES.items()}


@pytest.mark.parametrize("name", ["minimal", "bench", "full-without-samples"])
def test_the_fast_path_takes_what_devices_send(name: str) -> None:
    payload = BASES[name].to_bytes()
    assert fastparse.summarize(payload) == RecordSummary.of(BASES[name])
    # Non-canonical spelling is fine too: telemetry is not signed.
    assert fastparse.summarize(json.dumps(DOCS[name], indent=1).encode()) is not None


def test_samples_go_to_the_reference_parser() -> None:
    payload = BASES["full"].to_bytes()
    assert fastparse.summarize(payload) is None
    assert reference(payload) == RecordSummary.of(BASES["full"])


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


PATHS = [(name, p) for name, doc in DOCS.items() for p in _paths(doc) if p]

TRICKY: list[Any] = [
    True, False, None, 0, 1, -1, 2, 1.0, 0.5, -0.0, -1.5, 63, 64, 2**30, 2**53 - 1, 2**53,
    2**64, 10**400, 1e308, MAX_UNIX_TS, MAX_UNIX_TS + 1, "", "x", "fraud", "a\n", "Bad Kind",
    "telemetry", "é" * 257, "x" * 1025, "\ud800", [], [1], [True], [-1], [1.0], [None], {},
    {"a": 1}, {"bad-input": 1}, {"Bad": 1},
]  # fmt: skip


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


def _delete(doc: Any, path: tuple[Any, ...]) -> None:
    for key in path[:-1]:
        doc = doc[key]
    del doc[path[-1]]


def _encode(doc: Any, style: int) -> bytes:
    if style == 0:
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    if style == 1:
        return json.dumps(doc, indent=2).encode()
    return json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(PATHS),
            st.sampled_from(["replace", "delete", "add-key"]),
            st.sampled_from(TRICKY),
        ),
        min_size=1,
        max_size=3,
    ),
    st.integers(0, 2),
)
def test_structural_mutations_never_widen_acceptance(
    mutations: list[tuple[tuple[str, tuple[Any, ...]], str, Any]], style: int
) -> None:
    docs = copy.deepcopy(DOCS)
    for (name, path), op, value in mutations:
        doc = docs[name]
        try:
            if op == "replace":
                _set(doc, path, copy.deepcopy(value))
            elif op == "delete":
                _delete(doc, path)
            else:
                parent = doc
                for key in path[:-1]:
                    parent = parent[key]
                if isinstance(parent, dict):
                    parent["unexpected"] = copy.deepcopy(value)
                elif isinstance(parent, list):
                    parent.append(copy.deepcopy(value))
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced the path
    for doc in docs.values():
        check(_encode(doc, style))


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(sorted(DOCS)),
    st.lists(
        st.tuples(
            st.integers(0, 10**6),
            st.sampled_from(["flip", "insert", "delete"]),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_byte_mutations_never_widen_acceptance(
    name: str, edits: list[tuple[int, str, int]]
) -> None:
    data = bytearray(BASES[name].to_bytes())
    for where, op, byte in edits:
        i = where % (len(data) + 1)
        if op == "insert":
            data.insert(i, byte)
        elif i < len(data):
            if op == "flip":
                data[i] ^= byte or 1
            else:
                del data[i]
    check(bytes(data))


def _with(name: str, **changes: Any) -> bytes:
    doc = copy.deepcopy(DOCS[name])
    doc.update(changes)
    return json.dumps(doc).encode()


EDGES = {
    "duplicate key, last wins in both": BASES["bench"].to_bytes()[:-1] + b',"seq":99}',
    "window before start": _with("bench", window_end=1.0),
    "window at the last representable second": _with("minimal", window_end=MAX_UNIX_TS),
    "window after year 9999": _with("minimal", window_end=MAX_UNIX_TS + 1),
    "integer beyond the float range": _with("minimal", window_end=10**400),
    "float spelling of an integer": _with("bench", seq=5.0),
    "boolean spec_version": _with("bench", spec_version=True),
    "float spec_version": _with("bench", spec_version=1.0),
    "device id with a trailing newline": _with("bench", device_id="bench-0001\n"),
    "NaN": BASES["bench"].to_bytes().replace(b'"mean":1.8', b'"mean":NaN'),
    "UTF-8 BOM": b"\xef\xbb\xbf" + BASES["bench"].to_bytes(),
    "UTF-16": BASES["bench"].to_bytes().decode().encode("utf-16"),
    "top-level list": b"[]",
    "trailing garbage": BASES["bench"].to_bytes() + b"x",
    "too many error kinds": _with("bench", error_kinds={f"k{i}": 1 for i in range(33)}),
    "an unknown key": _with("bench", extra=1),
    # json.loads accepts it; the text then breaks storage and the API's responses.
    "lone surrogate escape": _with("bench", error_kinds={})
    .replace(
        b'"error_kinds": {}',
        b'"error_kinds": {}, "events": [{"ts": 1.0, "kind": "x", '
        b'"desired_version": null, "model": null, "reason": "\\ud800"}]',
    )
    .replace(b'"events": [], ', b""),
    "a missing key": json.dumps({k: v for k, v in DOCS["bench"].items() if k != "spool"}).encode(),
}


@pytest.mark.parametrize("case", sorted(EDGES))
def test_edge_cases(case: str) -> None:
    payload = EDGES[case]
    fast = check(payload)
    if case == "duplicate key, last wins in both":
        assert fast is not None and fast.seq == 99
    elif case == "window at the last representable second":
        assert fast is not None
    else:
        assert reference(payload) is None, case


def test_the_size_limit_comes_first() -> None:
    payload = BASES["bench"].to_bytes()
    assert fastparse.summarize(payload, max_bytes=len(payload) - 1) is None
    assert fastparse.summarize(payload, max_bytes=len(payload)) is not None
