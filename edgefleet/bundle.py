"""Bundle container format: the shared constants and the canonical tar header.

A bundle is one POSIX ustar archive whose members appear in this exact order::

    manifest.json       canonical JSON manifest (what release keys sign)
    signatures.json     {"signatures": [{"keyid", "sig"}]} over manifest.json's bytes
    payload/<path>      one member per manifest payload entry, in manifest order

Every header is byte-for-byte the canonical header ``tar_header(name, size)``
(mode 0644, uid/gid 0, mtime 0, no owner names, regular file), data is padded
with zeros to 512 bytes, and the archive ends with zero blocks padding it to a
multiple of 10240 bytes (the classic tar record). docs/bundle-format.md is the
normative description.

This module is format only, no decisions: the verifier
(``edgefleet.trust.bundle``) and the writer (``edgefleet.release``) both use it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from edgefleet import canonical

if TYPE_CHECKING:
    from edgefleet.trust.root import Signature

__all__ = [
    "BLOCK",
    "MANIFEST_MEMBER",
    "RECORD",
    "SIGNATURES_MEMBER",
    "padding",
    "signatures_bytes",
    "tar_header",
]

BLOCK = 512
RECORD = 10240
MANIFEST_MEMBER = "manifest.json"
SIGNATURES_MEMBER = "signatures.json"


def padding(size: int) -> int:
    """Zero bytes after a member of ``size`` bytes up to the next 512-byte block."""
    return -size % BLOCK


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


def signatures_bytes(signatures: Iterable[Signature]) -> bytes:
    """Canonical signatures.json content, one signature per key id, sorted by key id."""
    unique = {s.keyid: s for s in signatures}
    return canonical.encode({"signatures": [unique[k].to_dict() for k in sorted(unique)]})
