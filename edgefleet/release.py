"""Release: writing and signing bundles (the build side; verification is ``edgefleet.trust``).

``write_bundle``/``write_bundle_file`` lay out the canonical container
(``edgefleet.bundle``), ``sign_manifest`` signs canonical manifest bytes with
release keys, and ``add_signatures``/``attach_signatures`` add detached
signatures to an existing bundle (m-of-n signing on separate machines).
``sign_trust_root`` (signing a trust-root document) is here too.
Nothing here decides whether a bundle is trustworthy: the device's verifier
(``edgefleet.trust.verify_bundle``) judges what these functions produce.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO, BinaryIO, Protocol

from edgefleet.bundle import (
    BLOCK,
    MANIFEST_MEMBER,
    RECORD,
    SIGNATURES_MEMBER,
    padding,
    signatures_bytes,
    tar_header,
)
from edgefleet.errors import (
    LengthMismatchError,
)
from edgefleet.keys import SigningKey
from edgefleet.manifest import PayloadEntry
from edgefleet.trust.bundle import BundleHeader, _read_member, _Reader, read_header
from edgefleet.trust.root import Signature, sign_trust_root

__all__ = [
    "PayloadSource",
    "add_signatures",
    "attach_signatures",
    "sign_manifest",
    "sign_trust_root",
    "tar_header",
    "write_bundle",
    "write_bundle_file",
]


class PayloadSource(Protocol):
    """A readable binary file for a payload member."""

    def read(self, n: int = -1) -> bytes: ...


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
        out.write(bytes(padding(len(data))))
        written += BLOCK + len(data) + padding(len(data))

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
        out.write(bytes(padding(entry.size)))
        written += BLOCK + entry.size + padding(entry.size)
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
            fh.seek(reader.offset + entry.size + padding(entry.size))
            reader.offset += entry.size + padding(entry.size)
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
