"""One test per update attack the verifier must defeat (TUF/Uptane catalogue).

Each test produces the exact bytes an attacker could deliver and asserts the
precise error class; none of them may reach the payload sink's ``end``.
"""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path

import pytest

from edgefleet import canonical
from edgefleet.errors import (
    BadSignatureError,
    DecompressionBombError,
    DuplicateMemberError,
    ExpiredError,
    HashMismatchError,
    LengthMismatchError,
    MalformedBundleError,
    MissingMemberError,
    OversizedPayloadError,
    PathTraversalError,
    RollbackError,
    ThresholdNotMetError,
    UnknownKeyError,
    VerificationError,
    WrongTargetError,
)
from edgefleet.keys import generate
from edgefleet.keystore import KeyStore
from edgefleet.manifest import DeviceFacts
from edgefleet.release import tar_header
from edgefleet.trust import MemorySink, TrustRoot, VerifierLimits, verify_bundle
from tests.edgefleet.bundlekit import (
    DEVICE,
    NOW,
    craft_bundle,
    manifest_dict,
    members,
    release_key,
    zstd,
)


def verify(data: bytes, root: TrustRoot, **kw):
    kw.setdefault("device", DEVICE)
    kw.setdefault("installed", {"tiny": 1})
    kw.setdefault("now", NOW)
    return verify_bundle(data, trust_root=root, **kw)


def test_genuine_bundle_verifies_and_delivers_model(build, trust_root, tiny_model):
    sink = MemorySink()
    verified = verify(build(), trust_root, sink=sink)
    assert verified.manifest.name == "tiny" and verified.manifest.version == 2
    assert sink.files == {"model.onnx": tiny_model}
    assert verified.manifest.model_entry.compression == "zstd"


def test_genuine_bundle_verifies_from_stream(build, trust_root, tiny_model):
    sink = MemorySink()
    verify(io.BufferedReader(io.BytesIO(build())), trust_root, sink=sink)  # type: ignore[arg-type]
    assert sink.files["model.onnx"] == tiny_model


def test_bundle_unknown_key(trust_root, tiny_model):
    stranger = generate()
    data = craft_bundle(manifest_dict(tiny_model), tiny_model, [stranger])
    with pytest.raises(UnknownKeyError):
        verify(data, trust_root)


def test_bundle_signed_by_root_key_not_release_role(keydir: KeyStore, trust_root, tiny_model):
    root_key = keydir.signing_keys(trust_root.role("root").keyids)[0]
    data = craft_bundle(manifest_dict(tiny_model), tiny_model, [root_key])
    with pytest.raises(UnknownKeyError):
        verify(data, trust_root)


def test_bundle_bad_signature(keydir, trust_root, tiny_model):
    data = bytearray(craft_bundle(manifest_dict(tiny_model), tiny_model, [release_key(keydir)]))
    # Tamper with the signed manifest: change the version 2 -> 9 in place.
    name, off, size = members(bytes(data))[0]
    assert name == "manifest.json"
    body = bytes(data[off + 512 : off + 512 + size])
    tampered = body.replace(b'"version":2', b'"version":9')
    assert tampered != body
    data[off + 512 : off + 512 + size] = tampered
    with pytest.raises(BadSignatureError):
        verify(bytes(data), trust_root)


def test_bundle_threshold_not_met(tmp_path, tiny_model):
    store = KeyStore(tmp_path / "k")
    store.init(release_keys=3, release_threshold=2, now=NOW - timedelta(days=1))
    root = store.trust_root()
    data = craft_bundle(manifest_dict(tiny_model), tiny_model, [release_key(store, 1)])
    with pytest.raises(ThresholdNotMetError):
        verify(data, root)
    # The same key signing twice still counts once.
    key = release_key(store, 1)
    twice = craft_bundle(manifest_dict(tiny_model), tiny_model, [key, key])
    with pytest.raises(ThresholdNotMetError):
        verify(twice, root)
    ok = craft_bundle(
        manifest_dict(tiny_model), tiny_model, [release_key(store, 1), release_key(store, 3)]
    )
    assert verify(ok, root).signed_by == {release_key(store, 1).keyid, release_key(store, 3).keyid}


def test_bundle_hash_mismatch(keydir, trust_root, tiny_model):
    data = bytearray(craft_bundle(manifest_dict(tiny_model), tiny_model, [release_key(keydir)]))
    name, off, size = members(bytes(data))[2]
    assert name == "payload/model.onnx"
    data[off + 512 + size // 2] ^= 0x01
    sink = MemorySink()
    with pytest.raises(HashMismatchError):
        verify(bytes(data), trust_root, sink=sink)
    assert sink.files == {}  # end() never called


def test_bundle_hash_mismatch_compressed(keydir, trust_root, tiny_model):
    packed = zstd(tiny_model)
    manifest = manifest_dict(tiny_model, stored=packed, compression="zstd")
    data = bytearray(craft_bundle(manifest, packed, [release_key(keydir)]))
    _name, off, size = members(bytes(data))[2]
    data[off + 512 + size // 2] ^= 0x40
    with pytest.raises(HashMismatchError):
        verify(bytes(data), trust_root)


def test_bundle_length_mismatch(keydir, trust_root, tiny_model):
    # Signed manifest declares more bytes than the member holds.
    manifest = manifest_dict(tiny_model, size=len(tiny_model) + 10)
    manifest["payload"][0]["uncompressed_size"] = len(tiny_model) + 10
    data = craft_bundle(manifest, tiny_model, [release_key(keydir)])
    with pytest.raises(LengthMismatchError):
        verify(data, trust_root)


def test_bundle_length_mismatch_decompressed(keydir, trust_root, tiny_model):
    packed = zstd(tiny_model)
    manifest = manifest_dict(
        tiny_model, stored=packed, compression="zstd", uncompressed_size=len(tiny_model) + 5
    )
    data = craft_bundle(manifest, packed, [release_key(keydir)])
    with pytest.raises(LengthMismatchError):
        verify(data, trust_root)


def test_bundle_truncated(build, trust_root):
    data = build()
    for cut in (100, 600, len(data) // 2, len(data) - 1):
        with pytest.raises(VerificationError):
            verify(data[:cut], trust_root)


def test_bundle_rollback(build, trust_root):
    data = build(version=5)
    with pytest.raises(RollbackError):
        verify(data, trust_root, installed={"tiny": 5})
    with pytest.raises(RollbackError):
        verify(data, trust_root, installed={"tiny": 7})
    # The floor is per model name.
    assert verify(data, trust_root, installed={"other": 9}).manifest.version == 5


def test_bundle_expired(build, trust_root):
    data = build(expires_in=timedelta(days=10))
    verify(data, trust_root, now=NOW + timedelta(days=8))
    with pytest.raises(ExpiredError):
        verify(data, trust_root, now=NOW + timedelta(days=10))


def test_trust_root_expired_freezes_updates(build, keydir):
    store = KeyStore(keydir.dir.parent / "short")
    store.init(expires_in=timedelta(days=2), now=NOW - timedelta(days=1))
    data = craft_bundle(manifest_dict(b"x" * 10), b"x" * 10, [release_key(store)])
    with pytest.raises(ExpiredError):
        verify(data, store.trust_root(), now=NOW + timedelta(days=2))


@pytest.mark.parametrize(
    "device",
    [
        DeviceFacts(device_class="jetson"),
        DeviceFacts(arch="x86_64"),
        DeviceFacts(agent_version="0.0.9"),
        DeviceFacts(onnxruntime_version="1.10.0"),
        DeviceFacts(max_opset=13),
    ],
    ids=["device-class", "arch", "agent", "onnxruntime", "opset"],
)
def test_bundle_wrong_target(build, trust_root, device):
    data = build(archs=("aarch64",))
    with pytest.raises(WrongTargetError):
        verify(data, trust_root, device=device)


class _Endless(io.RawIOBase):
    """A stream that never ends; counts what was taken from it."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.taken = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        n = len(b)
        start = self.taken
        chunk = bytearray(n)
        if start < len(self.prefix):
            part = self.prefix[start : start + n]
            chunk[: len(part)] = part
        else:
            chunk[:] = b"\x7f" * n
        b[:n] = chunk
        self.taken += n
        return n


def test_bundle_oversized_payload_member_header(keydir, trust_root, tiny_model):
    # The member header claims 1 GiB although the manifest declares the real size:
    # refused before a single payload byte is read.
    good = craft_bundle(manifest_dict(tiny_model), tiny_model, [release_key(keydir)])
    name, off, _ = members(good)[2]
    evil = good[:off] + tar_header(name, 1 << 30)
    stream = _Endless(evil)
    with pytest.raises(OversizedPayloadError):
        verify(io.BufferedReader(stream), trust_root)  # type: ignore[arg-type]
    assert stream.taken <= len(evil) + 2 * 8192


def test_bundle_oversized_payload_endless_data(build, trust_root):
    # Endless data after a genuine bundle: reading stops one byte past the archive.
    good = build()
    stream = _Endless(good)
    with pytest.raises(OversizedPayloadError):
        verify(io.BufferedReader(stream, buffer_size=512), trust_root)  # type: ignore[arg-type]
    assert stream.taken <= len(good) + 512


def test_bundle_oversized_manifest(keydir, trust_root, tiny_model):
    data = craft_bundle(manifest_dict(tiny_model), tiny_model, [release_key(keydir)])
    with pytest.raises(OversizedPayloadError):
        verify(data, trust_root, limits=VerifierLimits(max_manifest_bytes=100))


def test_bundle_path_traversal_member_name(keydir, trust_root, tiny_model):
    data = craft_bundle(
        manifest_dict(tiny_model), tiny_model, [release_key(keydir)], member_name="../../evil"
    )
    with pytest.raises(PathTraversalError):
        verify(data, trust_root)


def test_bundle_path_traversal_manifest_path(keydir, trust_root, tiny_model):
    manifest = manifest_dict(tiny_model, path="../../etc/cron.d/x.onnx")
    data = craft_bundle(manifest, tiny_model, [release_key(keydir)], member_name="evil.onnx")
    with pytest.raises(PathTraversalError):
        verify(data, trust_root)


def test_bundle_duplicate_members(keydir, trust_root, tiny_model):
    good = craft_bundle(manifest_dict(tiny_model), tiny_model, [release_key(keydir)])
    _name, off, size = members(good)[0]
    first = good[off : off + 512 + size + (-size % 512)]
    data = first + good  # manifest.json, manifest.json, signatures.json, ...
    with pytest.raises(DuplicateMemberError):
        verify(data, trust_root)


def test_bundle_duplicate_payload_paths(keydir, trust_root, tiny_model):
    manifest = manifest_dict(tiny_model)
    manifest["payload"].append(dict(manifest["payload"][0]))
    data = craft_bundle(manifest, tiny_model, [release_key(keydir)])
    with pytest.raises(DuplicateMemberError):
        verify(data, trust_root)


def test_bundle_missing_members(keydir, trust_root, tiny_model):
    good = craft_bundle(manifest_dict(tiny_model), tiny_model, [release_key(keydir)])
    (_m_name, _m_off, _m_size), (_s_name, s_off, _s_size), (_p_name, p_off, _) = members(good)
    no_sigs = good[:s_off] + good[p_off:]
    with pytest.raises(MissingMemberError):
        verify(no_sigs, trust_root)
    no_payload = good[:p_off] + bytes(len(good) - p_off)
    with pytest.raises(MissingMemberError):
        verify(no_payload, trust_root)
    with pytest.raises(MissingMemberError):
        verify(b"", trust_root)


def test_bundle_decompression_bomb(keydir, trust_root):
    # 64 MiB of zeros packs into a few KiB; the signed manifest claims 1 MiB.
    model = bytes(64 << 20)
    packed = zstd(model)
    manifest = manifest_dict(model, stored=packed, compression="zstd", uncompressed_size=1 << 20)
    data = craft_bundle(manifest, packed, [release_key(keydir)])
    sink = MemorySink()
    with pytest.raises(DecompressionBombError):
        verify(data, trust_root, sink=sink)
    assert sink.files == {}


def test_bundle_decompression_bomb_ratio_limit(keydir, trust_root):
    model = bytes(8 << 20)
    packed = zstd(model)
    manifest = manifest_dict(model, stored=packed, compression="zstd")
    data = craft_bundle(manifest, packed, [release_key(keydir)])
    with pytest.raises(DecompressionBombError):
        verify(data, trust_root, limits=VerifierLimits(max_compression_ratio=100))


def test_bundle_non_canonical_header(build, trust_root):
    data = bytearray(build())
    data[156] = ord("2")  # typeflag: symlink
    with pytest.raises(MalformedBundleError):
        verify(bytes(data), trust_root)


def test_bundle_non_canonical_manifest_json(keydir, trust_root, tiny_model):
    manifest_bytes = canonical.encode(manifest_dict(tiny_model)).replace(b",", b", ", 1)
    from edgefleet.manifest import PayloadEntry
    from edgefleet.release import sign_manifest, write_bundle

    sigs = sign_manifest(manifest_bytes, [release_key(keydir)])
    entry = PayloadEntry("model.onnx", len(tiny_model), "0" * 64, "none", len(tiny_model), "0" * 64)
    buf = io.BytesIO()
    write_bundle(buf, manifest_bytes, sigs, [(entry, io.BytesIO(tiny_model))])
    with pytest.raises(MalformedBundleError):
        verify(buf.getvalue(), trust_root)


def test_bundle_trailing_garbage(build, trust_root):
    with pytest.raises(VerificationError):
        verify(build() + b"\0" * 512, trust_root)


def test_bundle_sink_only_sees_inactive_data_until_end(build, trust_root, tiny_model):
    events: list[str] = []

    class Recorder:
        def begin(self, entry):
            events.append("begin")

        def write(self, data):
            events.append("write")

        def end(self, entry):
            events.append("end")

    verify(build(), trust_root, sink=Recorder())
    assert events[0] == "begin" and events[-1] == "end" and "write" in events


def test_bundle_file_written_by_builder_is_world_readable(build, tmp_path: Path):
    build()
    produced = next(tmp_path.glob("*.bundle"))
    assert produced.stat().st_mode & 0o777 == 0o644
