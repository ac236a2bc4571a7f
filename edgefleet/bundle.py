"""Bundle container: writing, and the pure verification core.

A bundle is one POSIX ustar archive whose members appear in this exact order::

    manifest.json       canonical JSON manifest (what release keys sign)
    signatures.json     {"signatures": [{"keyid", "sig"}]} over manifest.json's bytes
    payload/<path>      one member per manifest payload entry, in manifest order

Every header is byte-for-byte the canonical header ``tar_header(name, size)``
(mode 0644, uid/gid 0, mtime 0, no owner names, regular file), data is padded
with zeros to 512 bytes, and the archive ends with zero blocks padding it to a
multiple of 10240 bytes (the classic tar record). docs/bundle-format.md is the
normative description.

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

import contextlib
import hashlib
import io
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol, cast

import zstandard

from edgefleet import canonical
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
from edgefleet.keys import SigningKey
from edgefleet.manifest import DeviceFacts, Manifest, PayloadEntry
from edgefleet.timeutil import format_utc
from edgefleet.trust import Signature, TrustRoot, parse_signatures

__all__ = [
    "BLOCK",
    "MANIFEST_MEMBER",
    "RECORD",
    "SIGNATURES_MEMBER",
    "BundleHeader",
    "MemorySink",
    "NullSink",
    "PayloadSink",
    "PayloadSource",
    "VerifiedBundle",
    "VerifierLimits",
    "add_signatures",
    "attach_signatures",
    "read_header",
    "sign_manifest",
    "signatures_bytes",
    "tar_header",
    "verify_bundle",
    "write_bundle",
    "write_bundle_file",
]

BLOCK = 512
RECORD = 10240
MANIFEST_MEMBER = "manifest.json"
SIGNATURES_MEMBER = "signatures.json"
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


def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def tar_header(name: str, size: int) -> bytes:
    """The one canonical ustar header for a regular file ``name`` of ``size`` bytes.

    Raises:
        ValueError: name longer than 100 bytes or size beyond ustar's 8 GiB.
    """
    raw_name = name.encode("ascii")
    if len(raw_name) > 100 or not 0 <= size < 8**11:
        raise ValueError(f"cannot store member {name!r} of {size} bytes in ustar")
    fields = [
        raw_name.ljust(100, b"\0"),
        b"0000644\0",
        b"0000000\0",
        b"0000000\0",
        _octal(size, 12),
        _octal(0, 12),
        b" " * 8,  # checksum placeholder
        b"0",
        bytes(100),
        b"ustar\0",
        b"00",
        bytes(32),
        bytes(32),
        b"0000000\0",
        b"0000000\0",
        bytes(155),
        bytes(12),
    ]
    header = bytearray(b"".join(fields))
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _padding(size: int) -> int:
    return -size % BLOCK


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
    _skip_padding(reader, size, name)
    return name, data, size


def _skip_padding(reader: _Reader, size: int, name: str) -> None:
    pad = _padding(size)
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
    _skip_padding(reader, entry.size, entry.member_name)


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


# ----------------------------------------------------------------------- write


class PayloadSource(Protocol):
    """A readable binary file for a payload member."""

    def read(self, n: int = -1) -> bytes: ...


def signatures_bytes(signatures: Iterable[Signature]) -> bytes:
    """Canonical signatures.json content, one signature per key id, sorted by key id."""
    unique = {s.keyid: s for s in signatures}
    return canonical.encode({"signatures": [unique[k].to_dict() for k in sorted(unique)]})


def write_bundle(
    out: BinaryIO,
    manifest_bytes: bytes,
    signatures: Sequence[Signature],
    payloads: Sequence[tuple[PayloadEntry, PayloadSource]],
) -> int:
    """Write a bundle; return the number of bytes written.

    The caller guarantees ``payloads`` matches the manifest's entries (sizes
    and order); ``build`` and ``add_signatures`` are the two callers.

    Raises:
        ValueError: a payload yields a different number of bytes than declared.
        OSError: writing failed.
    """
    written = 0

    def member(name: str, data: bytes) -> None:
        nonlocal written
        out.write(tar_header(name, len(data)))
        out.write(data)
        out.write(bytes(_padding(len(data))))
        written += BLOCK + len(data) + _padding(len(data))

    member(MANIFEST_MEMBER, manifest_bytes)
    member(SIGNATURES_MEMBER, signatures_bytes(signatures))
    for entry, src in payloads:
        out.write(tar_header(entry.member_name, entry.size))
        remaining = entry.size
        while remaining:
            chunk = src.read(min(1 << 20, remaining))
            if not chunk:
                raise ValueError(f"payload {entry.path} is shorter than declared")
            out.write(chunk)
            remaining -= len(chunk)
        if src.read(1):
            raise ValueError(f"payload {entry.path} is longer than declared")
        out.write(bytes(_padding(entry.size)))
        written += BLOCK + entry.size + _padding(entry.size)
    total = -(-(written + 2 * BLOCK) // RECORD) * RECORD
    out.write(bytes(total - written))
    return total


def sign_manifest(manifest_bytes: bytes, keys: Iterable[SigningKey]) -> list[Signature]:
    """Sign canonical manifest bytes with each key."""
    return [Signature(k.keyid, k.sign(manifest_bytes)) for k in keys]


def add_signatures(bundle_path: Path, keys: Sequence[SigningKey], out_path: Path) -> BundleHeader:
    """Sign a bundle's manifest with ``keys`` and write the result atomically.

    See ``attach_signatures``; a key that already signed is replaced by its
    fresh signature.

    Raises:
        MalformedBundleError: the input is not a bundle.
        OSError: reading or writing failed (``out_path`` is then untouched).
    """
    with open(bundle_path, "rb") as fh:
        header = read_header(fh)
    return attach_signatures(bundle_path, sign_manifest(header.manifest_bytes, keys), out_path)


class _FileSlice:
    """Reads exactly ``size`` bytes of ``fh`` starting at ``offset`` (seeks per read)."""

    def __init__(self, fh: IO[bytes], offset: int, size: int) -> None:
        self._fh, self._pos, self._left = fh, offset, size

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self._left:
            n = self._left
        self._fh.seek(self._pos)
        data = self._fh.read(n)
        self._pos += len(data)
        self._left -= len(data)
        return data


def attach_signatures(
    bundle_path: Path, signatures: Sequence[Signature], out_path: Path
) -> BundleHeader:
    """Rewrite a bundle with extra detached signatures over its manifest.

    The manifest and payload bytes are copied unchanged (streamed, never held
    in memory whole); existing signatures are kept, and one by the same key id
    is replaced. Signatures are not verified here: the verifier judges them.
    ``out_path`` may equal ``bundle_path``.

    Raises:
        MalformedBundleError: the input is not a bundle (or a payload member
            does not have its declared size).
        OSError: reading or writing failed (``out_path`` is then untouched).
    """
    with open(bundle_path, "rb") as fh:
        header = read_header(fh)
        manifest = header.manifest()
        merged = {s.keyid: s for s in header.signatures}
        merged.update({s.keyid: s for s in signatures})
        reader = _Reader(fh)
        reader.offset = header.header_bytes
        sources: list[tuple[PayloadEntry, PayloadSource]] = []
        for entry in manifest.payload:
            _, _, stored = _read_member(reader, entry.member_name, 0, set())
            if stored != entry.size:
                raise LengthMismatchError(f"bundle: payload {entry.path} size differs")
            sources.append((entry, _FileSlice(fh, reader.offset, entry.size)))
            fh.seek(reader.offset + entry.size + _padding(entry.size))
            reader.offset += entry.size + _padding(entry.size)
        sigs = list(merged.values())
        write_bundle_file(out_path, header.manifest_bytes, sigs, sources)
    return BundleHeader(header.manifest_bytes, tuple(sigs), header.header_bytes)


def write_bundle_file(
    out_path: Path,
    manifest_bytes: bytes,
    signatures: Sequence[Signature],
    sources: Sequence[tuple[PayloadEntry, PayloadSource]],
) -> int:
    """Write a bundle to ``out_path`` atomically (temp file, fsync, rename); return its size.

    Raises:
        OSError, ValueError: as ``write_bundle``; ``out_path`` is then untouched.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            size = write_bundle(out, manifest_bytes, signatures, sources)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return size
