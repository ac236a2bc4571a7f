"""The one wire schema against the reference decoder: same verdicts, same values.

``edgefleet.wire`` (msgspec, declarative) is what the agent and the server
use; ``reference_decoder`` is the hand-written parser it replaced, kept as an
independent implementation of docs/protocol.md. For every payload these
tests make, both must accept or both must refuse, and where both accept they
must decode to the same message (compared as JSON-ready dicts). The payloads:
structural mutations at every path of several records, byte-level mutations
of their JSON, and a table of edge cases, for telemetry (the message a fleet
sends most) and for status, facts and chunk requests.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from edgefleet import canonical
from edgefleet.errors import VerificationError
from edgefleet.wire import (
    MAX_UNIX_TS,
    ChunkRequest,
    DeviceFactsMessage,
    FeatureCounts,
    LatencySummary,
    ModelRef,
    OutputSummary,
    StatusMessage,
    TelemetryRecord,
    UpdateEvent,
)
from tests.edgefleet.wire import reference_decoder as ref
from tests.test_messages import full_record

PARSERS: dict[str, tuple[Any, Any]] = {
    "telemetry": (TelemetryRecord.from_bytes, ref.TelemetryRecord.from_bytes),
    "status": (StatusMessage.from_bytes, ref.StatusMessage.from_bytes),
    "facts": (DeviceFactsMessage.from_bytes, ref.DeviceFactsMessage.from_bytes),
    "chunk-request": (ChunkRequest.from_bytes, ref.ChunkRequest.from_bytes),
}


def _verdict(parse: Any, payload: bytes) -> dict[str, Any] | None:
    try:
        return json.loads(json.dumps(parse(payload).to_dict()))  # type: ignore[no-any-return]
    except VerificationError:
        return None


def check(payload: bytes, kind: str = "telemetry") -> dict[str, Any] | None:
    """Both parsers' verdicts agree; returns the schema's (None = refused)."""
    ours, theirs = PARSERS[kind]
    got, want = _verdict(ours, payload), _verdict(theirs, payload)
    assert got == want, (kind, payload[:400], got, want)
    return got


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


BASES: dict[str, Any] = {
    "minimal": TelemetryRecord("pi-1", 1, 0.0, 0.0),
    "bench": bench_record(),
    "full-without-samples": replace(full_record(), samples=()),
    "full": full_record(),
}
DOCS = {name: r.to_dict() for name, r in BASES.items()}


OTHERS: dict[str, Any] = {
    "status": StatusMessage(
        "pi-1", "online", 5.0, "0.1.0", ModelRef("tiny", 2), 3, UpdateEvent(4.0, "installed", 3)
    ),
    "facts": DeviceFactsMessage(
        "pi-1", "pi4", "aarch64", 4 << 30, 4, "1.17.0", "0.1.0", 19, "3.11.2", "Linux 6.1"
    ),
    "chunk-request": ChunkRequest("tiny-2", 4096, 10, bytes([0b1001, 0x80]), "tok"),
}
OTHER_DOCS = {name: m.to_dict() for name, m in OTHERS.items()}


@pytest.mark.parametrize("name", sorted(BASES))
def test_both_take_what_devices_send(name: str) -> None:
    payload = BASES[name].to_bytes()
    assert check(payload) == json.loads(payload)
    # Non-canonical spelling is fine too: telemetry is not signed.
    assert check(json.dumps(DOCS[name], indent=1).encode()) is not None


@pytest.mark.parametrize("kind", sorted(OTHERS))
def test_both_take_the_other_messages_and_require_canonical_spelling(kind: str) -> None:
    assert check(OTHERS[kind].to_bytes(), kind) == json.loads(OTHERS[kind].to_bytes())
    assert check(json.dumps(OTHER_DOCS[kind], indent=1).encode(), kind) is None


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
OTHER_PATHS = [(name, p) for name, doc in OTHER_DOCS.items() for p in _paths(doc) if p]

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
def test_structural_mutations_get_the_same_verdict(
    mutations: list[tuple[tuple[str, tuple[Any, ...]], str, Any]], style: int
) -> None:
    docs = copy.deepcopy(DOCS)
    _mutate(docs, mutations)
    for doc in docs.values():
        check(_encode(doc, style))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(OTHER_PATHS),
            st.sampled_from(["replace", "delete", "add-key"]),
            st.sampled_from(TRICKY),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_structural_mutations_of_status_facts_and_requests_get_the_same_verdict(
    mutations: list[tuple[tuple[str, tuple[Any, ...]], str, Any]],
) -> None:
    docs = copy.deepcopy(OTHER_DOCS)
    _mutate(docs, mutations)
    for kind, doc in docs.items():
        try:
            payload = canonical.encode(doc)
        except ValueError:
            continue  # a lone surrogate cannot be encoded canonically
        check(payload, kind)


def _mutate(
    docs: dict[str, Any], mutations: list[tuple[tuple[str, tuple[Any, ...]], str, Any]]
) -> None:
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
def test_byte_mutations_get_the_same_verdict(name: str, edits: list[tuple[int, str, int]]) -> None:
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
    got = check(payload)
    if case == "duplicate key, last wins in both":
        assert got is not None and got["seq"] == 99
    elif case == "window at the last representable second":
        assert got is not None
    else:
        assert got is None, case


def test_the_size_limit_comes_first() -> None:
    payload = BASES["bench"].to_bytes()
    with pytest.raises(VerificationError, match="more than the limit"):
        TelemetryRecord.from_bytes(payload, max_bytes=len(payload) - 1)
    assert TelemetryRecord.from_bytes(payload, max_bytes=len(payload)) == BASES["bench"]
