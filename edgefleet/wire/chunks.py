"""Chunked bundle transfer: a device's block request and the server's binary frames.

Flow: a device publishes a ``ChunkRequest`` (canonical JSON; a bitmap of the
blocks it still needs, as AWS IoT OTA streams do) and the server answers each
requested block with a ``ChunkData`` frame, or one ``ChunkRefusal`` frame
when the request cannot be served.

Frame: ``b"EFC1"`` | uint16 big-endian header length | canonical JSON header
(``{"type": "chunk-data", "bundle_id", "block", "block_size", "file_size",
"token"}`` or ``{"type": "chunk-refusal"... }``, see ``ChunkRefusal``) | the
block's raw bytes (exactly ``block_size`` bytes, fewer only for the last).

Invariants: the frame's length is checked against one block plus the header
before anything is copied; a data frame carries exactly the bytes its
position allows; a refusal frame carries none.
"""

from __future__ import annotations

import struct
from typing import Annotated, Any, Literal

from msgspec import Meta

from edgefleet import canonical
from edgefleet.ids import BundleId
from edgefleet.wire.base import WireStruct, convert, decode_canonical, fail, trusted, wire_default
from edgefleet.wire.desired import MAX_BUNDLE_BYTES

__all__ = [
    "CHUNK_MAGIC",
    "MAX_BLOCK_SIZE",
    "MAX_CHUNK_HEADER_BYTES",
    "MAX_CHUNK_REQUEST_BYTES",
    "MAX_REQUEST_BLOCKS",
    "MIN_BLOCK_SIZE",
    "ChunkData",
    "ChunkRefusal",
    "ChunkRequest",
    "parse_chunk_frame",
]

MAX_CHUNK_REQUEST_BYTES = 4 << 10  # bytes
MAX_CHUNK_HEADER_BYTES = 1 << 10  # bytes of the JSON header inside a chunk frame
MIN_BLOCK_SIZE = 256  # bytes
MAX_BLOCK_SIZE = 256 << 10  # bytes (MQTT brokers commonly cap packets near 256 KiB-1 MiB)
MAX_REQUEST_BLOCKS = 2048  # bits in one request's bitmap: bounds the responder's work
CHUNK_MAGIC = b"EFC1"

BlockSize = Annotated[int, Meta(ge=MIN_BLOCK_SIZE, le=MAX_BLOCK_SIZE)]
Offset = Annotated[int, Meta(ge=0, le=MAX_BUNDLE_BYTES)]
FileSize = Annotated[int, Meta(ge=1, le=MAX_BUNDLE_BYTES)]
Token = Annotated[str, Meta(max_length=64)]


class _ChunkRequestType(WireStruct, frozen=True, kw_only=True, rename={"msg_type": "type"}):
    msg_type: Literal["chunk-request"] = wire_default("type", "chunk-request")


class ChunkRequest(_ChunkRequestType, frozen=True):
    """Device -> server: send the blocks of ``bundle_id`` set in ``bitmap``.

    Bit ``i`` of the bitmap (byte ``i // 8``, bit ``i % 8``, least significant
    first, as in AWS IoT OTA streams) asks for block ``first_block + i``;
    block ``b`` covers bytes ``[b * block_size, min((b + 1) * block_size, size))``.
    On the wire the bitmap is base64.
    """

    what = "chunk-request"
    bundle_id: BundleId
    block_size: BlockSize
    first_block: Offset
    bitmap: Annotated[bytes, Meta(min_length=1, max_length=MAX_REQUEST_BLOCKS // 8)]
    token: Token = wire_default("token", "")

    def blocks(self) -> list[int]:
        """The requested block indexes, ascending."""
        return [
            self.first_block + i
            for i in range(len(self.bitmap) * 8)
            if self.bitmap[i >> 3] & (1 << (i & 7))
        ]

    def to_bytes(self) -> bytes:
        return canonical.encode(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> ChunkRequest:
        """Parse a request.

        Raises:
            MalformedMessageError: any problem.
        """
        return decode_canonical(data, cls, cls.what, MAX_CHUNK_REQUEST_BYTES)


def _frame(header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = canonical.encode(header)
    return CHUNK_MAGIC + struct.pack(">H", len(head)) + head + payload


class ChunkData(WireStruct, frozen=True):
    """Server -> device: one block of a bundle (header fields plus the raw bytes)."""

    what = "chunk-data"
    bundle_id: BundleId
    block: Offset
    block_size: BlockSize
    file_size: FileSize
    data: bytes
    token: Token = ""

    def _check(self) -> None:
        last = (self.file_size - 1) // self.block_size
        if self.block > last:
            raise fail(self.what, f"block {self.block} is past the last block {last}")
        expected = min(self.block_size, self.file_size - self.block * self.block_size)
        if len(self.data) != expected:
            raise fail(
                self.what, f"block {self.block} carries {len(self.data)} bytes, expected {expected}"
            )

    @property
    def offset(self) -> int:
        """Byte offset of this block in the bundle."""
        return self.block * self.block_size

    def to_bytes(self) -> bytes:
        return _frame(
            {
                "type": "chunk-data",
                "bundle_id": self.bundle_id,
                "block": self.block,
                "block_size": self.block_size,
                "file_size": self.file_size,
                "token": self.token,
            },
            self.data,
        )


RefusalReason = Literal["unknown-bundle", "bad-request", "busy"]


class ChunkRefusal(WireStruct, frozen=True):
    """Server -> device, a frame without data: the request cannot be served.

    ``reason`` is one of ``unknown-bundle``, ``bad-request``, ``busy``. (The
    header's ``type`` stays ``"chunk-error"`` on the wire, as docs/protocol.md
    has always said.)
    """

    what = "chunk-error"
    bundle_id: BundleId
    reason: RefusalReason
    token: Token = ""

    REASONS = ("unknown-bundle", "bad-request", "busy")

    def to_bytes(self) -> bytes:
        return _frame(
            {"type": "chunk-error", "bundle_id": self.bundle_id, "reason": self.reason,
             "token": self.token}
        )  # fmt: skip


class _DataHeader(WireStruct, frozen=True, tag_field="type", tag="chunk-data"):
    bundle_id: BundleId
    block: Offset
    block_size: BlockSize
    file_size: FileSize
    token: Token


class _RefusalHeader(WireStruct, frozen=True, tag_field="type", tag="chunk-error"):
    bundle_id: BundleId
    reason: RefusalReason
    token: Token


_Header = _DataHeader | _RefusalHeader


def parse_chunk_frame(
    data: bytes, *, max_block_size: int = MAX_BLOCK_SIZE
) -> ChunkData | ChunkRefusal:
    """Parse a frame from the chunk-data topic.

    The header length and the payload length are checked before anything is
    copied: a frame larger than one block plus the header is refused at once.

    Raises:
        MalformedMessageError: bad magic, header or sizes (including a block
            with more or fewer bytes than its position allows).
    """
    what = "chunk frame"
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise fail(what, "payload must be bytes")
    view = memoryview(data)
    if len(view) > 6 + MAX_CHUNK_HEADER_BYTES + max_block_size:
        raise fail(what, f"{len(view)} bytes is more than one block of {max_block_size} allows")
    if len(view) < 6 or bytes(view[:4]) != CHUNK_MAGIC:
        raise fail(what, "does not start with the EFC1 magic")
    (head_len,) = struct.unpack(">H", view[4:6])
    if head_len > MAX_CHUNK_HEADER_BYTES or 6 + head_len > len(view):
        raise fail(what, "header length is out of range")
    head = bytes(view[6 : 6 + head_len])
    try:
        doc = canonical.decode_strict(head)  # frames are canonical, like every server message
    except canonical.CanonicalError as exc:
        raise fail(what, str(exc)) from None
    header: _DataHeader | _RefusalHeader = convert(doc, _Header, what)  # type: ignore[arg-type]
    payload = view[6 + head_len :]
    if isinstance(header, _RefusalHeader):
        if len(payload):
            raise fail(what, "a chunk-error frame carries no data")
        return trusted(ChunkRefusal, header.bundle_id, header.reason, header.token)
    if header.block_size > max_block_size:
        raise fail(
            what, f"block size {header.block_size} is above this receiver's {max_block_size}"
        )
    if len(payload) > header.block_size:
        raise fail(what, f"{len(payload)} data bytes exceed the block size {header.block_size}")
    return trusted(
        ChunkData,
        header.bundle_id,
        header.block,
        header.block_size,
        header.file_size,
        bytes(payload),
        header.token,
    )
