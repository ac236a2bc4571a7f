"""Block-bitmap chunk transfer (AWS IoT OTA stream style), both halves, pure.

Flow: a bundle of ``size`` bytes is cut into blocks of ``block_size`` bytes
(the last one shorter). The device keeps a ``Bitmap`` of the blocks it holds
and asks for missing ones with ``ChunkRequest`` messages, each naming a first
block and a bitmap of at most ``MAX_REQUEST_BLOCKS`` blocks after it
(``plan_request``). The server's ``ChunkResponder`` answers each requested
block with one ``ChunkData`` frame, reading exactly that block from a
``BlockSource`` (a seekable file): memory per request is one block, never the
bundle. Unknown bundles get a ``ChunkRefusal``.

Invariants: a block index is valid iff ``0 <= b < block_count(size,
block_size)``; ``block_span`` never reaches past ``size``; a ``Bitmap``'s
unused high bits are always zero (``from_bytes`` refuses otherwise), so its
bytes are canonical. Neither half trusts the other: the responder ignores
out-of-range bits and refuses block sizes outside its limits; the receiver
(agent/download.py) checks every frame against the size it was told by the
signed desired state. This module is pure (no paho import, no threads).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from edgefleet.wire import (
    MAX_BLOCK_SIZE,
    MAX_REQUEST_BLOCKS,
    MIN_BLOCK_SIZE,
    ChunkData,
    ChunkRefusal,
    ChunkRequest,
)

__all__ = [
    "Bitmap",
    "BlockSource",
    "ChunkResponder",
    "FileBlockSource",
    "StreamBlockSource",
    "block_count",
    "block_span",
    "plan_request",
]


def block_count(size: int, block_size: int) -> int:
    """Number of blocks of a ``size``-byte file.

    Raises:
        ValueError: ``size`` < 1 or ``block_size`` < 1.
    """
    if size < 1 or block_size < 1:
        raise ValueError("size and block_size must be positive")
    return -(-size // block_size)


def block_span(block: int, size: int, block_size: int) -> tuple[int, int]:
    """``(offset, length)`` of ``block`` in a ``size``-byte file.

    Raises:
        ValueError: the block is out of range.
    """
    if not 0 <= block < block_count(size, block_size):
        raise ValueError(f"block {block} is out of range for {size} bytes")
    offset = block * block_size
    return offset, min(block_size, size - offset)


class Bitmap:
    """A fixed-size set of block indexes, stored LSB-first (bit ``i`` = byte ``i//8``)."""

    __slots__ = ("_bits", "_count", "nblocks")

    def __init__(self, nblocks: int) -> None:
        if nblocks < 1:
            raise ValueError("a bitmap needs at least one block")
        self.nblocks = nblocks
        self._bits = bytearray(-(-nblocks // 8))
        self._count = 0

    @classmethod
    def from_bytes(cls, nblocks: int, data: bytes) -> Bitmap:
        """Rebuild a bitmap from ``to_bytes`` output.

        Raises:
            ValueError: wrong length, or bits set beyond ``nblocks``.
        """
        bm = cls(nblocks)
        if len(data) != len(bm._bits):
            raise ValueError(f"bitmap of {len(data)} bytes does not fit {nblocks} blocks")
        tail = nblocks % 8
        if tail and data[-1] >> tail:
            raise ValueError("bitmap has bits set beyond its last block")
        bm._bits[:] = data
        bm._count = sum(bin(b).count("1") for b in data)
        return bm

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def __contains__(self, block: int) -> bool:
        return 0 <= block < self.nblocks and bool(self._bits[block >> 3] & (1 << (block & 7)))

    def add(self, block: int) -> bool:
        """Mark ``block`` present; return True if it was missing.

        Raises:
            ValueError: out of range.
        """
        if not 0 <= block < self.nblocks:
            raise ValueError(f"block {block} is out of range (0..{self.nblocks - 1})")
        mask = 1 << (block & 7)
        if self._bits[block >> 3] & mask:
            return False
        self._bits[block >> 3] |= mask
        self._count += 1
        return True

    @property
    def count(self) -> int:
        """Number of blocks present."""
        return self._count

    @property
    def complete(self) -> bool:
        return self._count == self.nblocks

    def missing(self, start: int = 0) -> Iterator[int]:
        """Missing block indexes from ``start`` upward."""
        for block in range(max(start, 0), self.nblocks):
            byte = self._bits[block >> 3]
            if byte == 0xFF:
                continue
            if not byte & (1 << (block & 7)):
                yield block


def plan_request(
    bundle_id: str,
    have: Bitmap,
    block_size: int,
    *,
    max_blocks: int = MAX_REQUEST_BLOCKS,
    start: int = 0,
    exclude: Callable[[int], bool] | None = None,
    token: str = "",
) -> ChunkRequest | None:
    """The next request: up to ``max_blocks`` missing blocks in one bitmap window.

    The window starts at the first missing block at or after ``start`` (then
    wraps to 0) that ``exclude`` does not reject, and spans at most
    ``MAX_REQUEST_BLOCKS`` indexes.

    Returns:
        A request, or ``None`` when nothing is missing (or everything missing
        is excluded).

    Raises:
        ValueError: ``max_blocks`` outside ``[1, MAX_REQUEST_BLOCKS]``.
    """
    if not 1 <= max_blocks <= MAX_REQUEST_BLOCKS:
        raise ValueError(f"max_blocks must be in [1, {MAX_REQUEST_BLOCKS}]")
    for begin in (start, 0):
        wanted: list[int] = []
        for block in have.missing(begin):
            if exclude is not None and exclude(block):
                continue
            if wanted and block - wanted[0] >= MAX_REQUEST_BLOCKS:
                break
            wanted.append(block)
            if len(wanted) == max_blocks:
                break
        if wanted:
            first = wanted[0]
            bits = bytearray(-(-(wanted[-1] - first + 1) // 8))
            for block in wanted:
                i = block - first
                bits[i >> 3] |= 1 << (i & 7)
            return ChunkRequest(bundle_id, block_size, first, bytes(bits), token)
        if begin == 0:
            break
    return None


# --------------------------------------------------------------------- responder


class BlockSource(Protocol):
    """Random access to one bundle file."""

    @property
    def size(self) -> int:
        """Total bytes."""
        ...

    def read_at(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset`` (``OSError`` on failure)."""
        ...


class FileBlockSource:
    """A bundle file on disk, read with ``os.pread`` (no shared file position)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._size = self.path.stat().st_size

    @property
    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        """Read one block.

        Raises:
            OSError: the file cannot be read or is shorter than at construction.
        """
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise OSError(f"{self.path} is shorter than {offset + length} bytes")
        return data


class StreamBlockSource:
    """Any seekable binary file object (tests, in-memory bundles, object stores)."""

    def __init__(self, stream: BinaryIO, size: int) -> None:
        self._stream = stream
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    def read_at(self, offset: int, length: int) -> bytes:
        """Seek and read one block.

        Raises:
            OSError: the stream is shorter than declared.
        """
        self._stream.seek(offset)
        data = self._stream.read(length)
        if len(data) != length:
            raise OSError(f"stream is shorter than {offset + length} bytes")
        return data


@dataclass
class ResponderStats:
    """What a responder did, for logs and metrics."""

    requests: int = 0
    blocks_sent: int = 0
    bytes_sent: int = 0
    unknown_bundle: int = 0
    bad_requests: int = 0
    out_of_range_bits: int = 0


class ChunkResponder:
    """Answers chunk requests from bundle files, one block in memory at a time.

    ``resolve(bundle_id)`` returns the ``BlockSource`` for a bundle, or
    ``None`` for an unknown id. The server's chunk service wraps this with MQTT
    (subscribe ``chunks/req``, publish each frame to the same device's
    ``chunks/data``) and its own rate limits.
    """

    def __init__(
        self,
        resolve: Callable[[str], BlockSource | None],
        *,
        min_block_size: int = MIN_BLOCK_SIZE,
        max_block_size: int = MAX_BLOCK_SIZE,
        max_blocks_per_request: int = MAX_REQUEST_BLOCKS,
    ) -> None:
        if not MIN_BLOCK_SIZE <= min_block_size <= max_block_size <= MAX_BLOCK_SIZE:
            raise ValueError("block size limits must satisfy 256 <= min <= max <= 256 KiB")
        if not 1 <= max_blocks_per_request <= MAX_REQUEST_BLOCKS:
            raise ValueError(f"max_blocks_per_request must be in [1, {MAX_REQUEST_BLOCKS}]")
        self._resolve = resolve
        self.min_block_size = min_block_size
        self.max_block_size = max_block_size
        self.max_blocks_per_request = max_blocks_per_request
        self.stats = ResponderStats()

    def respond(self, request: ChunkRequest) -> Iterator[ChunkData | ChunkRefusal]:
        """Yield one frame per requested, in-range block (lazily: one block read per step).

        At most ``max_blocks_per_request`` blocks are served per request; the
        device re-requests the rest. A block size outside the limits yields a
        ``bad-request`` error; an unknown bundle an ``unknown-bundle`` error.

        Raises:
            OSError: the bundle file could not be read.
        """
        self.stats.requests += 1
        if not self.min_block_size <= request.block_size <= self.max_block_size:
            self.stats.bad_requests += 1
            yield ChunkRefusal(request.bundle_id, "bad-request", request.token)
            return
        source = self._resolve(request.bundle_id)
        if source is None:
            self.stats.unknown_bundle += 1
            yield ChunkRefusal(request.bundle_id, "unknown-bundle", request.token)
            return
        size = source.size
        nblocks = block_count(size, request.block_size)
        served = 0
        for block in request.blocks():
            if block >= nblocks:
                self.stats.out_of_range_bits += 1
                continue
            if served == self.max_blocks_per_request:
                break
            offset, length = block_span(block, size, request.block_size)
            data = source.read_at(offset, length)
            served += 1
            self.stats.blocks_sent += 1
            self.stats.bytes_sent += length
            yield ChunkData(request.bundle_id, block, request.block_size, size, data, request.token)

    def respond_bytes(self, payload: bytes) -> Iterator[bytes]:
        """Parse a request payload and yield the encoded reply frames.

        Raises:
            MalformedMessageError: the request is malformed (nothing to answer).
            OSError: the bundle file could not be read.
        """
        try:
            request = ChunkRequest.from_bytes(payload)
        except Exception:
            self.stats.bad_requests += 1
            raise
        for frame in self.respond(request):
            yield frame.to_bytes()
