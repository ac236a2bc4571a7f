"""Message schemas: strict round trips, and one test per desired-state attack."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from msgspec.structs import replace

from edgefleet import canonical
from edgefleet.errors import (
    BadSignatureError,
    ExpiredError,
    RollbackError,
    ThresholdNotMetError,
    UnknownKeyError,
    VerificationError,
    WrongTargetError,
)
from edgefleet.keys import SigningKey, generate, load_signing_key
from edgefleet.keystore import KeyStore
from edgefleet.topics import DeviceTopic, GroupTopic
from edgefleet.trust import Signature, TrustRoot, verify_desired_state
from edgefleet.wire import (
    ArraySample,
    BundleRef,
    ChannelCounts,
    ChunkData,
    ChunkRefusal,
    ChunkRequest,
    DesiredState,
    DesiredTarget,
    DeviceFactsMessage,
    FeatureCounts,
    Feedback,
    LatencySummary,
    MalformedMessageError,
    ModelRef,
    OutputSummary,
    Sample,
    ShadowSpec,
    ShadowSummary,
    SignedDesiredState,
    SpoolCounters,
    StatusMessage,
    TelemetryRecord,
    UpdateEvent,
    Vitals,
    parse_chunk_frame,
)

NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
SHA = "ab" * 32


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrustRoot, SigningKey, SigningKey]:
    store = KeyStore(tmp_path_factory.mktemp("keys"))
    store.init(now=NOW - timedelta(days=1))
    director = load_signing_key(store.dir / "director-1.key")
    release = load_signing_key(store.dir / "release-1.key")
    return store.trust_root(), director, release


def desired(version: int = 3, **kw: object) -> DesiredState:
    base = dict(
        target=DesiredTarget(device="pi-1"),
        version=version,
        model=ModelRef("tiny", 2),
        bundle=BundleRef("tiny-2", SHA, 4096),
        issued=NOW - timedelta(minutes=5),
        expires=NOW + timedelta(days=7),
        shadow=ShadowSpec(ModelRef("tiny", 3), BundleRef("tiny-3", SHA, 5000)),
        rollout_id="r-42",
    )
    base.update(kw)
    return DesiredState(**base)  # type: ignore[arg-type]


def verify(data: bytes, root: TrustRoot, *, topic=None, floor: int = 0, groups=("canary",)):
    return verify_desired_state(
        data,
        trust_root=root,
        now=NOW,
        topic=topic or DeviceTopic.desired("pi-1"),
        device_id="pi-1",
        groups=groups,
        floor=floor,
    )


def test_desired_state_signed_by_director_verifies(keys) -> None:
    root, director, _ = keys
    state = desired()
    got = verify(state.sign([director]).to_bytes(), root, floor=2)
    assert got == state


def test_desired_state_for_a_group_verifies_on_the_group_topic(keys) -> None:
    root, director, _ = keys
    state = desired(target=DesiredTarget(group="canary"))
    data = state.sign([director]).to_bytes()
    assert verify(data, root, topic=GroupTopic("canary")) == state
    with pytest.raises(WrongTargetError):
        verify(data, root, topic=GroupTopic("canary"), groups=("eu",))


def test_desired_state_forged_with_unknown_key_is_rejected(keys) -> None:
    root, _, _ = keys
    with pytest.raises(UnknownKeyError):
        verify(desired().sign([generate()]).to_bytes(), root)


def test_desired_state_signed_by_release_key_is_rejected(keys) -> None:
    root, _, release = keys
    with pytest.raises(UnknownKeyError):
        verify(desired().sign([release]).to_bytes(), root)


def test_desired_state_tampered_after_signing_is_rejected(keys) -> None:
    root, director, _ = keys
    doc = desired().sign([director]).to_dict()
    doc["signed"]["bundle"]["sha256"] = "cd" * 32
    with pytest.raises(BadSignatureError):
        verify(canonical.encode(doc), root)


def test_desired_state_without_signatures_is_rejected(keys) -> None:
    root, _, _ = keys
    with pytest.raises(ThresholdNotMetError):
        verify(SignedDesiredState(desired(), ()).to_bytes(), root)


def test_desired_state_replayed_older_version_is_rejected(keys) -> None:
    root, director, _ = keys
    old = desired(version=3).sign([director]).to_bytes()
    with pytest.raises(RollbackError):
        verify(old, root, floor=3)
    with pytest.raises(RollbackError):
        verify(old, root, floor=7)


def test_desired_state_rerouted_to_another_device_is_rejected(keys) -> None:
    root, director, _ = keys
    other = desired(target=DesiredTarget(device="pi-2")).sign([director]).to_bytes()
    with pytest.raises(WrongTargetError):
        verify(other, root)  # arrives on pi-1's topic
    with pytest.raises(WrongTargetError):
        verify(other, root, topic=DeviceTopic.desired("pi-2"))  # not for this device


def test_desired_state_expired_is_rejected(keys) -> None:
    root, director, _ = keys
    state = desired(issued=NOW - timedelta(days=9), expires=NOW - timedelta(seconds=1))
    with pytest.raises(ExpiredError):
        verify(state.sign([director]).to_bytes(), root)


def test_desired_state_issued_in_the_future_is_rejected(keys) -> None:
    root, director, _ = keys
    state = desired(issued=NOW + timedelta(days=2), expires=NOW + timedelta(days=9))
    with pytest.raises(MalformedMessageError):
        verify(state.sign([director]).to_bytes(), root)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b.replace(b"{", b"{ ", 1),  # not canonical
        lambda b: b[:-1] + b',"signed":{}}',  # duplicate key
        lambda b: b"[" + b + b"]",  # not an object
        lambda b: b + b" " * (64 << 10),  # oversized
        lambda b: b.replace(b'"rollout_id":"r-42"', b'"rollout_id":"r/42"'),  # bad field
    ],
)
def test_desired_state_malformed_is_rejected(keys, mangle) -> None:
    root, director, _ = keys
    data = desired().sign([director]).to_bytes()
    with pytest.raises(VerificationError):
        verify(mangle(data), root)


def test_desired_state_signed_body_is_strict() -> None:
    body = desired().to_signed_dict()
    assert DesiredState.from_signed_dict(body) == desired()
    for key in ("extra", "version"):
        bad = dict(body)
        if key == "extra":
            bad["extra"] = 1
        else:
            del bad[key]
        with pytest.raises(MalformedMessageError):
            DesiredState.from_signed_dict(bad)
    with pytest.raises(MalformedMessageError):
        DesiredState.from_signed_dict({**body, "version": 0})
    with pytest.raises(MalformedMessageError):
        DesiredTarget.from_dict({"device": "a", "group": "b"})


def test_chunk_request_roundtrip_and_limits() -> None:
    req = ChunkRequest("tiny-2", 4096, 10, bytes([0b1001, 0x80]), "tok")
    assert req.blocks() == [10, 13, 25]
    assert ChunkRequest.from_bytes(req.to_bytes()) == req
    with pytest.raises(MalformedMessageError):
        ChunkRequest("tiny-2", 100, 0, b"\x01")  # block size below the minimum
    with pytest.raises(MalformedMessageError):
        ChunkRequest("tiny-2", 4096, 0, b"\x01" * 257)  # bitmap beyond 2048 blocks
    with pytest.raises(MalformedMessageError):
        ChunkRequest("../x", 4096, 0, b"\x01")
    bad = json.loads(req.to_bytes())
    bad["bitmap"] = "***"
    with pytest.raises(MalformedMessageError):
        ChunkRequest.from_bytes(canonical.encode(bad))


def test_chunk_frame_roundtrip() -> None:
    frame = ChunkData("b", 2, 1024, 2100, b"x" * 52, "t")
    assert parse_chunk_frame(frame.to_bytes()) == frame
    assert frame.offset == 2048
    err = ChunkRefusal("b", "unknown-bundle", "t")
    assert parse_chunk_frame(err.to_bytes()) == err


def test_chunk_frame_oversized_block_is_rejected() -> None:
    good = ChunkData("b", 0, 1024, 4096, b"y" * 1024).to_bytes()
    with pytest.raises(MalformedMessageError):
        parse_chunk_frame(good + b"z")  # one byte more than the block
    with pytest.raises(MalformedMessageError):
        parse_chunk_frame(good, max_block_size=512)  # larger than the receiver allows
    with pytest.raises(MalformedMessageError):
        ChunkData("b", 3, 1024, 3073, b"y" * 2)  # last block is 1 byte
    with pytest.raises(MalformedMessageError):
        ChunkData("b", 4, 1024, 4096, b"")  # block past the end


def test_chunk_frame_garbage_is_rejected() -> None:
    head = canonical.encode({"type": "chunk-data"})
    for data in (
        b"",
        b"EFC0" + b"\0\0",
        b"EFC1\xff\xff",
        b"EFC1" + struct.pack(">H", len(head)) + head,
    ):
        with pytest.raises(MalformedMessageError):
            parse_chunk_frame(data)


def full_record() -> TelemetryRecord:
    return TelemetryRecord(
        device_id="pi-1",
        seq=7,
        window_start=1000.0,
        window_end=1060.5,
        model=ModelRef("tiny", 2),
        predictions=120,
        errors=2,
        error_kinds={"bad-input": 2},
        latency_ms=LatencySummary(120, 1.5, 1.2, 3.0, 4.5, 9.0),
        outputs=(
            OutputSummary(0, 120, 0.33, 0.2, 0.0, 1.0, (40, 50, 30), (0,) * 5 + (20,) * 5),
            OutputSummary(1, 120, 2.5, 1.0, -1.0, 6.0, None, None, (12,) * 10),
        ),
        features=(FeatureCounts("x", 0, "f0", (1,) * 10, 0),),
        channels=(ChannelCounts("img", 1, (2,) * 10, 3, 0.5, 0.1),),
        shadow=ShadowSummary(ModelRef("tiny", 3), 100, 2, 0.97, None, 1.1, 0.9, 10, 0.8, 0.9),
        health=Vitals(12.5, 0.3, 50_000_000, 10**9, 48.2),
        events=(UpdateEvent(1001.0, "install-failed", 4, ModelRef("tiny", 3), "health check"),),
        spool=SpoolCounters(dropped=3, enospc=1),
        dropped_observations=5,
        samples=(
            Sample(
                17,
                {"x": ArraySample("float32", (1, 2), b"\0" * 8)},
                (ArraySample("float32", (1, 3), b"\0" * 12),),
            ),
            Sample(19, {}, (), inclusion_probability=0.02, exploration=True),
        ),
        feedback=(
            Feedback(17, 2, 1),
            Feedback(18, "cat"),
            Feedback(19, 0, 1, exploration=True, predicted_at=1001.0, labelled_at=1050.25),
        ),
    )


def test_telemetry_record_roundtrip() -> None:
    record = full_record()
    assert TelemetryRecord.from_bytes(record.to_bytes()) == record
    minimal = TelemetryRecord("pi-1", 1, 0.0, 0.0)
    assert TelemetryRecord.from_bytes(minimal.to_bytes()) == minimal


def test_telemetry_record_is_strict() -> None:
    doc = full_record().to_dict()
    for mutate in (
        lambda d: d.update(extra=1),
        lambda d: d.update(seq=0),
        lambda d: d.update(window_end=1.0),
        lambda d: d["latency_ms"].update(p50=-1),
        lambda d: d["shadow"].update(agreement=1.5),
        lambda d: d["samples"][0]["inputs"]["x"].update(shape=[1, 3]),
        lambda d: d["events"][0].update(kind="Bad Kind"),
        lambda d: d.pop("spool"),
        lambda d: d["samples"][1].update(inclusion_probability=0),
        lambda d: d["samples"][1].update(exploration=1),
        lambda d: d["feedback"][2].update(exploration="yes"),
        lambda d: d["feedback"][2].update(labelled_at=-1),
        lambda d: d["outputs"][0].update(confidence=[-1] * 10),
    ):
        bad = json.loads(json.dumps(doc))
        mutate(bad)
        with pytest.raises(MalformedMessageError):
            TelemetryRecord.from_bytes(canonical.encode(bad))
    with pytest.raises(MalformedMessageError):
        TelemetryRecord.from_bytes(full_record().to_bytes(), max_bytes=100)


def test_status_and_facts_roundtrip() -> None:
    status = StatusMessage(
        "pi-1", "online", 5.0, "0.1.0", ModelRef("tiny", 2), 3, UpdateEvent(4.0, "installed", 3)
    )
    assert StatusMessage.from_bytes(status.to_bytes()) == status
    with pytest.raises(MalformedMessageError):
        replace(status, state="sleeping")
    facts = DeviceFactsMessage(
        "pi-1", "pi4", "aarch64", 4 << 30, 4, "1.17.0", "0.1.0", 19, "3.11.2", "Linux 6.1"
    )
    assert DeviceFactsMessage.from_bytes(facts.to_bytes()) == facts
    assert facts.to_device_facts().device_class == "pi4"


def test_signature_list_is_bounded(keys) -> None:
    root, director, _ = keys
    signed = desired().sign([director])
    many = SignedDesiredState(signed.state, signed.signatures + (Signature("00", b"x"),) * 64)
    with pytest.raises(MalformedMessageError):
        verify(many.to_bytes(), root)


def test_shared_protocol_modules_do_not_import_paho() -> None:
    code = (
        "import sys, edgefleet.topics, edgefleet.wire, edgefleet.chunks; "
        "sys.exit(1 if any(m.startswith('paho') for m in sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_names_with_a_trailing_newline_are_refused_everywhere() -> None:
    """``re.match`` with ``$`` accepts ``"name\\n"``; every identifier check full-matches."""
    from edgefleet import manifest, wire
    from edgefleet.errors import MalformedBundleError
    from edgefleet.topics import TopicError, validate_device_id

    with pytest.raises(TopicError):
        validate_device_id("dev-1\n")
    with pytest.raises(wire.MalformedMessageError):
        wire.ModelRef("fraud\n", 1)
    with pytest.raises(wire.MalformedMessageError):
        wire.TelemetryRecord("dev-1\n", 1, 1.0, 2.0)
    with pytest.raises(MalformedBundleError):
        manifest.validate_model_name("fraud\n")
    with pytest.raises(MalformedBundleError):
        manifest.validate_payload_path("model.onnx\n")
