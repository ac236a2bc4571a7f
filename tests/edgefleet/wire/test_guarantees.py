"""One test per guarantee listed in ``edgefleet.wire.base``, on every kind of message."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edgefleet import canonical
from edgefleet.wire import (
    ChunkRequest,
    DeviceFactsMessage,
    FeatureCounts,
    MalformedMessageError,
    ModelRef,
    SpoolCounters,
    StatusMessage,
    TelemetryRecord,
    UpdateEvent,
    Vitals,
)
from tests.test_messages import full_record

STATUS = StatusMessage("pi-1", "online", 5.0, "0.1.0", ModelRef("tiny", 2), 3, None)
FACTS = DeviceFactsMessage("pi-1", "pi4", "aarch64", 1, 4, "1.17.0", "0.1.0", 19, "3.11", "Linux")
REQUEST = ChunkRequest("tiny-2", 4096, 10, b"\x09", "tok")
MESSAGES: dict[str, Any] = {
    "telemetry": full_record(),
    "status": STATUS,
    "facts": FACTS,
    "chunk-request": REQUEST,
}


def _parse(kind: str, payload: bytes, **kw: Any) -> Any:
    return type(MESSAGES[kind]).from_bytes(payload, **kw)


def _doc(kind: str) -> dict[str, Any]:
    return json.loads(MESSAGES[kind].to_bytes())


def _bytes(kind: str, doc: dict[str, Any]) -> bytes:
    return canonical.encode(doc)


@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_round_trip(kind: str) -> None:
    assert _parse(kind, MESSAGES[kind].to_bytes()) == MESSAGES[kind]


def test_the_length_bound_comes_before_parsing() -> None:
    junk = b"{" * (5 << 20)  # would be a deep-nesting error if it were parsed
    with pytest.raises(MalformedMessageError, match="more than the limit"):
        TelemetryRecord.from_bytes(junk)
    with pytest.raises(MalformedMessageError, match="more than the limit"):
        StatusMessage.from_bytes(b" " * (17 << 10))


@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_utf8_only(kind: str) -> None:
    text = MESSAGES[kind].to_bytes().decode()
    for encoded in (text.encode("utf-16"), text.encode("utf-32"), b"\xef\xbb\xbf" + text.encode()):
        with pytest.raises(MalformedMessageError):
            _parse(kind, encoded)


def test_a_lone_surrogate_is_not_text_but_a_pair_is() -> None:
    payload = TelemetryRecord("pi-1", 1, 0.0, 0.0, error_kinds={"x": 1}).to_bytes()
    with pytest.raises(MalformedMessageError, match="surrogate"):
        TelemetryRecord.from_bytes(payload.replace(b'"x"', b'"\\ud800"'))
    event = UpdateEvent(1.0, "install-failed", reason="r").to_dict()
    record = TelemetryRecord("pi-1", 1, 0.0, 0.0).to_dict()
    record["events"] = [event]
    paired = json.dumps(record).replace('"reason": "r"', '"reason": "\\ud83d\\ude00"').encode()
    assert TelemetryRecord.from_bytes(paired).events[0].reason == "\U0001f600"


@pytest.mark.parametrize("spelling", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400"])
def test_no_nan_or_infinity(spelling: bytes) -> None:
    payload = TelemetryRecord("pi-1", 1, 0.0, 0.0).to_bytes()
    with pytest.raises(MalformedMessageError):
        bad = payload.replace(b'"window_end":0.0', b'"window_end":' + spelling)
        TelemetryRecord.from_bytes(bad)
    with pytest.raises(MalformedMessageError):
        Vitals(cpu_percent=float("inf"))
    with pytest.raises(MalformedMessageError):
        Vitals(load1=float("nan"))


@pytest.mark.parametrize("value", [1.0, True, "1"])
def test_an_integer_is_an_integer(value: Any) -> None:
    doc = _doc("telemetry")
    doc["seq"] = value
    with pytest.raises(MalformedMessageError):
        TelemetryRecord.from_bytes(_bytes("telemetry", doc))
    doc = _doc("telemetry")
    doc["spec_version"] = value
    with pytest.raises(MalformedMessageError):
        TelemetryRecord.from_bytes(_bytes("telemetry", doc))
    doc = _doc("status")
    doc["desired_version"] = value
    with pytest.raises(MalformedMessageError):
        StatusMessage.from_bytes(_bytes("status", doc))


@pytest.mark.parametrize(
    ("kind", "key"),
    [("telemetry", "device_id"), ("status", "device_id"), ("facts", "device_class"),
     ("chunk-request", "bundle_id")],
)  # fmt: skip
def test_identifiers_full_match(kind: str, key: str) -> None:
    doc = _doc(kind)
    doc[key] = doc[key] + "\n"
    with pytest.raises(MalformedMessageError):
        _parse(kind, _bytes(kind, doc))
    with pytest.raises(MalformedMessageError):
        UpdateEvent(1.0, "installed\n")


@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_every_key_is_required_and_no_other_is_allowed(kind: str) -> None:
    for key in _doc(kind):
        doc = _doc(kind)
        del doc[key]
        with pytest.raises(MalformedMessageError):
            _parse(kind, _bytes(kind, doc))
    doc = _doc(kind)
    doc["extra"] = 1
    with pytest.raises(MalformedMessageError):
        _parse(kind, _bytes(kind, doc))


def test_keys_with_a_python_default_are_still_required_inside_parts() -> None:
    doc = _doc("telemetry")
    del doc["spool"]["rejected"]
    with pytest.raises(MalformedMessageError, match="rejected"):
        TelemetryRecord.from_bytes(_bytes("telemetry", doc))
    doc = _doc("telemetry")
    del doc["features"][0]["nonfinite"]
    with pytest.raises(MalformedMessageError, match="nonfinite"):
        TelemetryRecord.from_bytes(_bytes("telemetry", doc))
    # ...while Python callers may leave them out.
    assert SpoolCounters(dropped=1).rejected == 0
    assert FeatureCounts("x", 0, "f0", (1, 2)).nonfinite == 0


def test_cross_field_rules_run_on_decode_and_on_construction() -> None:
    doc = _doc("telemetry")
    doc["window_end"] = doc["window_start"] - 1
    with pytest.raises(MalformedMessageError, match="window_end"):
        TelemetryRecord.from_bytes(_bytes("telemetry", doc))
    with pytest.raises(MalformedMessageError, match="window_end"):
        TelemetryRecord("pi-1", 1, 10.0, 5.0)


def test_construction_validates_every_field() -> None:
    for build in (
        lambda: ModelRef("Fraud", 1),
        lambda: ModelRef("fraud", 0),
        lambda: TelemetryRecord("pi-1", 1, 0.0, 0.0, error_kinds={"Bad Kind": 1}),
        lambda: TelemetryRecord("pi-1", 1, 0.0, 0.0, predictions=-1),
        lambda: ChunkRequest("b", 4096, 0, b""),
        lambda: StatusMessage("pi-1", "sleeping", 1.0),  # type: ignore[arg-type]
    ):
        with pytest.raises(MalformedMessageError):
            build()


def test_status_and_requests_must_be_canonical_telemetry_need_not() -> None:
    for kind in ("status", "facts", "chunk-request"):
        with pytest.raises(MalformedMessageError):
            _parse(kind, json.dumps(_doc(kind), indent=1).encode())
    doc = _doc("telemetry")
    assert TelemetryRecord.from_bytes(json.dumps(doc, indent=1).encode()) == MESSAGES["telemetry"]
