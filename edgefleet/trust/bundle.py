"""Bundle verification: the pure streaming verifier (the trust core for bundles).

The container format is in ``edgefleet.bundle``; writing and signing are in
``edgefleet.release``.

``verify_bundle`` is the trust core. It is pure: it reads the bytes it is
handed (a ``bytes`` object or a binary stream), uses the trust root, device
facts, installed versions and the clock value it is given, and either returns a
``VerifiedBundle`` or raises exactly one ``VerificationError`` subclass. It
checks, in order: trust root expiry; member layout; signature threshold over
the manifest bytes (before interpreting them); manifest structure; expiry;
target; rollback; then streams each payload through sha256 (and a bounded zstd
decoder) into the caller's sink. It never reads more than the declared sizes
plus one tar record, and never decompresses past a declared size. A sink may
receive bytes of a payload that later fails a check: it must treat data as
untrusted until ``end``, which comes only after the whole bundle verified (the
agent writes into the inactive slot only).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, Any, Protocol, cast

import zstandard

from edgefleet import canonical
from edgefleet.bundle import BLOCK, MANIFEST_MEMBER, RECORD, SIGNATURES_MEMBER, padding, tar_header
from edgefleet.errors import (
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
    VerificationError,
)
from edgefleet.manifest import DeviceFacts, Manifest, PayloadEntry
from edgefleet.timeutil import format_utc
from edgefleet.trust.root import Signature, TrustRoot, parse_signatures

__all__ = [
    "BundleHeader",
    "MemorySink",
    "NullSink",
    "PayloadSink",
    "VerifiedBundle",
    "VerifierLimits",
    "read_header",
    "verify_bundle",
]

_ZERO_BLOCK = bytes(BLOCK)


@dataclass(frozen=True)
class VerifierLimits:
    """Bounds the verifier enforces before and while reading."""

    max_manifest_bytes: int = 1 << 20  # bytes; a manifest with golden data stays far below
    max_signatures_bytes: int = 64 << 10  # bytes; 64 signatures need ~9 KiB
    max_payload_bytes: int = 4 << 30  # bytes stored for one payload member
    max_model_bytes: int = 4 << 30  # bytes of one decompressed payload
    max_compression_ratio: int = 1000  # declared uncompressed/stored; beyond is a bomb
    max_zstd_window_bytes: int = 1 << 27  # bytes of decoder window (memory on the device)
    chunk_bytes: int = 1 << 20  # bytes handed to the sink per write

    def __post_init__(self) -> None:
        for name in (
            "max_manifest_bytes",
            "max_signatures_bytes",
            "max_payload_bytes",
            "max_model_bytes",
            "max_compression_ratio",
            "chunk_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"VerifierLimits.{name} must be positive")
        if not 1 << 10 <= self.max_zstd_window_bytes <= 1 << 31:
            raise ValueError("VerifierLimits.max_zstd_window_bytes must be in [1 KiB, 2 GiB]")


class PayloadSink(Protocol):
    """Receives payload bytes while they are verified."""

    def begin(self, entry: PayloadEntry) -> None:
        """A payload starts; the ``write`` calls that follow belong to it."""

    def write(self, data: bytes | memoryview) -> None:
        """Decompressed payload bytes, in order; untrusted until ``end``."""

    def end(self, entry: PayloadEntry) -> None:
        """The whole bundle verified: ``entry``'s bytes are trusted.

        Called once per payload, in manifest order, after the last payload and
        the end of the archive were checked; so for a multi-payload bundle
        every ``begin`` comes before the first ``end``.
        """


class NullSink:
    """Discards payload bytes (verification only)."""

    def begin(self, entry: PayloadEntry) -> None:
        pass

    def write(self, data: bytes | memoryview) -> None:
        pass

    def end(self, entry: PayloadEntry) -> None:
        pass


@dataclass
class MemorySink:
    """Keeps verified payloads in memory, keyed by payload path."""

    files: dict[str, bytes] = field(default_factory=dict)
    _pending: dict[str, io.BytesIO] = field(default_factory=dict)
    _current: io.BytesIO | None = None

    def begin(self, entry: PayloadEntry) -> None:
        self._current = self._pending[entry.path] = io.BytesIO()

    def write(self, data: bytes | memoryview) -> None:
        assert self._current is not None
        self._current.write(data)

    def end(self, entry: PayloadEntry) -> None:
        self.files[entry.path] = self._pending.pop(entry.path).getvalue()


@dataclass(frozen=True)
class VerifiedBundle:
    """What ``verify_bundle`` vouches for."""

    manifest: Manifest
    manifest_bytes: bytes
    signatures: tuple[Signature, ...]
    signed_by: frozenset[str]
    total_bytes: int

    @property
    def manifest_sha256(self) -> str:
        return hashlib.sha256(self.manifest_bytes).hexdigest()


@dataclass(frozen=True)
class BundleHeader:
    """The manifest and signatures of a bundle, read but *not* trusted."""

    manifest_bytes: bytes
    signatures: tuple[Signature, ...]
    header_bytes: int  # offset of the first payload member's header

    @property
    def manifest_sha256(self) -> str:
        return hashlib.sha256(self.manifest_bytes).hexdigest()

    def manifest(self, limits: VerifierLimits | None = None) -> Manifest:
        """Parse the manifest (structure only, no signature check).

        Raises:
            MalformedBundleError: the manifest is not valid.
        """
        lim = limits or VerifierLimits()
        return Manifest.from_bytes(self.manifest_bytes, max_payload_bytes=lim.max_payload_bytes)


# --------------------------------------------------------------------------- tar


def _parse_header(block: bytes) -> tuple[str, int]:
    """Return (name, size) of a canonical header, or raise MalformedBundleError."""
    try:
        name_field = block[:100].rstrip(b"\0")
        name = name_field.decode("ascii")
        size = int(block[124:135].decode("ascii"), 8)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedBundleError("bundle: member header is not a ustar header") from exc
    if "\0" in name or not name:
        raise MalformedBundleError("bundle: member header has an invalid name")
    if name.startswith("/") or ".." in name.split("/") or "\\" in name:
        raise PathTraversalError(f"bundle: member name {name!r} escapes the bundle")
    try:
        expected = tar_header(name, size)
    except ValueError as exc:
        raise MalformedBundleError(f"bundle: member {name!r}: {exc}") from exc
    if block != expected:
        raise MalformedBundleError(
            f"bundle: header of member {name!r} is not canonical (only plain files, "
            "mode 0644, uid/gid 0, mtime 0, valid checksum)"
        )
    return name, size


class _Reader:
    """Bounded reads over bytes or a stream; counts what it consumed."""

    def __init__(self, source: bytes | bytearray | memoryview | IO[bytes]) -> None:
        self.offset = 0
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._mem: memoryview | None = memoryview(source).cast("B")
            self._stream: IO[bytes] | None = None
        else:
            self._mem = None
            self._stream = source

    def read(self, n: int) -> bytes | memoryview:
        """Up to ``n`` bytes (fewer only at end of input)."""
        if self._mem is not None:
            out = self._mem[self.offset : self.offset + n]
            self.offset += len(out)
            return out
        assert self._stream is not None
        chunks = []
        want = n
        while want > 0:
            try:
                piece = self._stream.read(want)
            except OSError as exc:
                raise MalformedBundleError(f"bundle: cannot read input: {exc}") from exc
            if not piece:
                break
            chunks.append(piece)
            want -= len(piece)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.offset += len(data)
        return data

    def read_exact(self, n: int, what: str, *, short: type[VerificationError]) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise short(f"bundle: truncated in {what} ({len(data)} of {n} bytes)")
        return bytes(data)


class _MemberStream:
    """File-like view of one member's data that hashes what it yields."""

    def __init__(self, reader: _Reader, size: int, hasher: Any) -> None:
        self._reader = reader
        self.remaining = size
        self._hasher = hasher

    def read(self, n: int = -1) -> bytes | memoryview:
        # A memoryview over an in-memory bundle is passed on without a copy.
        if n < 0 or n > self.remaining:
            n = self.remaining
        if n == 0:
            return b""
        data = self._reader.read(n)
        if len(data) != n:
            raise LengthMismatchError("bundle: payload member is truncated")
        self._hasher.update(data)
        self.remaining -= n
        return data

    def drain(self, chunk: int) -> None:
        while self.remaining:
            self.read(min(chunk, self.remaining))


def _read_member(
    reader: _Reader, expected: str, limit: int, seen: set[str]
) -> tuple[str, bytes | None, int]:
    """Read a header; return (name, data or None for payload members, size)."""
    block = reader.read_exact(BLOCK, f"header of {expected}", short=MissingMemberError)
    if block == _ZERO_BLOCK:
        raise MissingMemberError(f"bundle: member {expected} is missing")
    name, size = _parse_header(block)
    if name in seen:
        raise DuplicateMemberError(f"bundle: member {name!r} appears twice")
    seen.add(name)
    if name != expected:
        if name in (MANIFEST_MEMBER, SIGNATURES_MEMBER) or name.startswith("payload/"):
            raise MissingMemberError(f"bundle: expected member {expected}, found {name!r}")
        raise MalformedBundleError(f"bundle: unexpected member {name!r}")
    if expected.startswith("payload/"):
        return name, None, size
    if size > limit:
        raise OversizedPayloadError(f"bundle: {name} is {size} bytes, limit {limit}")
    data = reader.read_exact(size, name, short=MalformedBundleError)
    _skippadding(reader, size, name)
    return name, data, size


def _skippadding(reader: _Reader, size: int, name: str) -> None:
    pad = padding(size)
    if pad and reader.read_exact(pad, f"padding of {name}", short=MalformedBundleError) != bytes(
        pad
    ):
        raise MalformedBundleError(f"bundle: padding after {name} is not zero")


def _parse_signature_member(data: bytes) -> tuple[Signature, ...]:
    try:
        doc = canonical.decode_strict(data)
    except canonical.CanonicalError as exc:
        raise MalformedBundleError(f"bundle: signatures.json: {exc}") from exc
    if set(doc) != {"signatures"}:
        raise MalformedBundleError("bundle: signatures.json must hold only 'signatures'")
    return tuple(parse_signatures(doc["signatures"], error=MalformedBundleError))


def read_header(
    source: bytes | bytearray | memoryview | IO[bytes], limits: VerifierLimits | None = None
) -> BundleHeader:
    """Read the manifest and signatures members without trusting them.

    Raises:
        MalformedBundleError: (and children) the container is not a bundle.
        OversizedPayloadError: a metadata member is larger than the limits.
    """
    return _read_header(_Reader(source), limits or VerifierLimits())


def _read_header(reader: _Reader, lim: VerifierLimits) -> BundleHeader:
    seen: set[str] = set()
    _, manifest_bytes, _ = _read_member(reader, MANIFEST_MEMBER, lim.max_manifest_bytes, seen)
    _, sig_bytes, _ = _read_member(reader, SIGNATURES_MEMBER, lim.max_signatures_bytes, seen)
    assert manifest_bytes is not None and sig_bytes is not None
    return BundleHeader(manifest_bytes, _parse_signature_member(sig_bytes), reader.offset)


# ---------------------------------------------------------------------- verify


def _installed_version(installed: Mapping[str, int] | None, name: str) -> int:
    if not installed:
        return 0
    return int(installed.get(name, 0))


def _stream_payload(
    reader: _Reader, entry: PayloadEntry, stored_size: int, sink: PayloadSink, lim: VerifierLimits
) -> None:
    """Hash (and decode) one payload member into ``sink``; raise on any mismatch."""
    if stored_size > entry.size:
        raise OversizedPayloadError(
            f"bundle: payload {entry.path} is {stored_size} bytes, manifest declares {entry.size}"
        )
    if stored_size < entry.size:
        raise LengthMismatchError(
            f"bundle: payload {entry.path} is {stored_size} bytes, manifest declares {entry.size}"
        )
    stored_hash = hashlib.sha256()
    member = _MemberStream(reader, entry.size, stored_hash)
    sink.begin(entry)
    if entry.compression == "none":
        while member.remaining:
            sink.write(member.read(min(lim.chunk_bytes, member.remaining)))
        if stored_hash.hexdigest() != entry.sha256:
            raise HashMismatchError(f"bundle: payload {entry.path} sha256 differs from manifest")
    else:
        _decode_zstd(member, entry, stored_hash, sink, lim)
    _skippadding(reader, entry.size, entry.member_name)


def _decode_zstd(
    member: _MemberStream,
    entry: PayloadEntry,
    stored_hash: Any,
    sink: PayloadSink,
    lim: VerifierLimits,
) -> None:
    if entry.uncompressed_size > lim.max_model_bytes:
        raise DecompressionBombError(
            f"bundle: payload {entry.path} declares {entry.uncompressed_size} bytes decompressed, "
            f"limit {lim.max_model_bytes}"
        )
    if entry.uncompressed_size > entry.size * lim.max_compression_ratio:
        raise DecompressionBombError(
            f"bundle: payload {entry.path} declares a compression ratio above "
            f"{lim.max_compression_ratio}"
        )
    model_hash = hashlib.sha256()
    produced = 0
    failure: VerificationError | None = None
    dctx = zstandard.ZstdDecompressor(max_window_size=lim.max_zstd_window_bytes)
    try:
        with dctx.stream_reader(cast(IO[bytes], member), read_size=1 << 17, closefd=False) as zr:
            while True:
                chunk = zr.read(lim.chunk_bytes)
                if not chunk:
                    break
                produced += len(chunk)
                if produced > entry.uncompressed_size:
                    failure = DecompressionBombError(
                        f"bundle: payload {entry.path} decompresses beyond its declared "
                        f"{entry.uncompressed_size} bytes"
                    )
                    break
                model_hash.update(chunk)
                sink.write(chunk)
    except zstandard.ZstdError as exc:
        failure = MalformedBundleError(f"bundle: payload {entry.path} is not valid zstd: {exc}")
    # Hash the whole stored member even after a decode failure, so that tampering
    # is reported as such rather than as its symptom.
    member.drain(lim.chunk_bytes)
    if stored_hash.hexdigest() != entry.sha256:
        raise HashMismatchError(f"bundle: payload {entry.path} sha256 differs from manifest")
    if failure is not None:
        raise failure
    if produced != entry.uncompressed_size:
        raise LengthMismatchError(
            f"bundle: payload {entry.path} decompresses to {produced} bytes, "
            f"manifest declares {entry.uncompressed_size}"
        )
    if model_hash.hexdigest() != entry.uncompressed_sha256:
        raise HashMismatchError(
            f"bundle: payload {entry.path} decompressed sha256 differs from manifest"
        )


def _check_trailer(reader: _Reader) -> None:
    end = reader.offset
    total = -(-(end + 2 * BLOCK) // RECORD) * RECORD
    trailer = reader.read_exact(total - end, "end-of-archive", short=MalformedBundleError)
    if trailer != bytes(total - end):
        raise MalformedBundleError("bundle: unexpected data after the last payload member")
    if reader.read(1):
        raise OversizedPayloadError("bundle: data continues past the end of the archive")


def verify_bundle(
    source: bytes | bytearray | memoryview | IO[bytes],
    *,
    trust_root: TrustRoot,
    device: DeviceFacts,
    installed: Mapping[str, int] | None,
    now: datetime,
    sink: PayloadSink | None = None,
    limits: VerifierLimits | None = None,
) -> VerifiedBundle:
    """Verify a whole bundle and stream its payloads into ``sink``.

    Args:
        source: the bundle bytes, or a binary stream positioned at its start.
        trust_root: the device's current, already trusted root.
        device: facts matched against the manifest's targets.
        installed: model name -> highest version ever committed (rollback floor).
        now: the current time (aware UTC), for expiry checks.
        sink: receives payload bytes; ``NullSink`` when omitted.
        limits: size bounds.

    Returns:
        The verified manifest and signature facts.

    Raises:
        ExpiredError: the trust root or the bundle is expired.
        UnknownKeyError, BadSignatureError, ThresholdNotMetError: signatures.
        MalformedBundleError: (PathTraversalError, DuplicateMemberError,
            MissingMemberError, DecompressionBombError) the container is bad.
        WrongTargetError: not for this device.
        RollbackError: version not above ``installed``.
        OversizedPayloadError, LengthMismatchError, HashMismatchError: payload.
    """
    lim = limits or VerifierLimits()
    sink = sink or NullSink()
    trust_root.check_not_expired(now)
    reader = _Reader(source)
    header = _read_header(reader, lim)
    signed_by = trust_root.verify_role_signatures(
        "release", header.manifest_bytes, header.signatures
    )
    manifest = Manifest.from_bytes(header.manifest_bytes, max_payload_bytes=lim.max_payload_bytes)
    if now >= manifest.expires:
        raise ExpiredError(
            f"bundle {manifest.name} v{manifest.version} expired at {format_utc(manifest.expires)}"
        )
    manifest.targets.check(device)
    floor = _installed_version(installed, manifest.name)
    if manifest.version <= floor:
        raise RollbackError(
            f"bundle {manifest.name} v{manifest.version} is not above installed v{floor}"
        )
    seen = {MANIFEST_MEMBER, SIGNATURES_MEMBER}
    for entry in manifest.payload:
        _, _, stored = _read_member(reader, entry.member_name, 0, seen)
        _stream_payload(reader, entry, stored, sink, lim)
    _check_trailer(reader)
    # Only now is every byte of the bundle accounted for: release the payloads.
    for entry in manifest.payload:
        sink.end(entry)
    return VerifiedBundle(
        manifest, header.manifest_bytes, header.signatures, frozenset(signed_by), reader.offset
    )
