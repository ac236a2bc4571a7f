"""Block bitmap helpers and the responder half of the chunk protocol."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgefleet.chunks import (
    Bitmap,
    ChunkResponder,
    FileBlockSource,
    StreamBlockSource,
    block_count,
    block_span,
    plan_request,
)
from edgefleet.wire import (
    MAX_REQUEST_BLOCKS,
    ChunkData,
    ChunkRefusal,
    ChunkRequest,
    MalformedMessageError,
    parse_chunk_frame,
)


def test_block_geometry() -> None:
    assert block_count(1, 256) == 1
    assert block_count(512, 256) == 2
    assert block_count(513, 256) == 3
    assert block_span(2, 513, 256) == (512, 1)
    with pytest.raises(ValueError):
        block_span(3, 513, 256)
    with pytest.raises(ValueError):
        block_count(0, 256)


@given(st.integers(1, 300), st.data())
def test_bitmap_roundtrip_and_missing(nblocks: int, data: st.DataObject) -> None:
    present = data.draw(st.sets(st.integers(0, nblocks - 1)))
    bm = Bitmap(nblocks)
    for b in present:
        assert bm.add(b)
        assert not bm.add(b)
    assert bm.count == len(present)
    assert list(bm.missing()) == sorted(set(range(nblocks)) - present)
    again = Bitmap.from_bytes(nblocks, bm.to_bytes())
    assert again.to_bytes() == bm.to_bytes() and again.count == bm.count
    assert again.complete == (len(present) == nblocks)


def test_bitmap_refuses_stray_bits_and_wrong_length() -> None:
    with pytest.raises(ValueError):
        Bitmap.from_bytes(3, b"\x08")  # bit 3 set for a 3-block file
    with pytest.raises(ValueError):
        Bitmap.from_bytes(3, b"\x00\x00")
    with pytest.raises(ValueError):
        Bitmap(3).add(3)


def test_plan_request_windows_missing_blocks() -> None:
    bm = Bitmap(5000)
    for b in range(0, 10):
        bm.add(b)
    req = plan_request("b1", bm, 1024, max_blocks=4)
    assert req is not None and req.blocks() == [10, 11, 12, 13]
    req = plan_request("b1", bm, 1024, max_blocks=4, start=100, exclude=lambda b: b % 2 == 0)
    assert req is not None and req.blocks() == [101, 103, 105, 107]
    # A window never spans more than MAX_REQUEST_BLOCKS indexes.
    sparse = Bitmap(5000)
    for b in range(5000):
        if b not in (0, MAX_REQUEST_BLOCKS + 5):
            sparse.add(b)
    req = plan_request("b1", sparse, 1024)
    assert req is not None and req.blocks() == [0]
    # Wraps around to the start; None when complete.
    req = plan_request("b1", sparse, 1024, start=MAX_REQUEST_BLOCKS + 6)
    assert req is not None and req.blocks() == [0]
    full = Bitmap(3)
    for b in range(3):
        full.add(b)
    assert plan_request("b1", full, 1024) is None


class CountingStream(io.BytesIO):
    """A file-like that records every read, to prove the responder reads only what it must."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads: list[tuple[int, int]] = []

    def read(self, n: int | None = -1) -> bytes:
        pos = self.tell()
        out = super().read(n)
        self.reads.append((pos, len(out)))
        return out


def test_responder_reads_only_requested_blocks() -> None:
    data = os.urandom(10 * 1024 + 100)
    stream = CountingStream(data)
    responder = ChunkResponder(
        lambda bid: StreamBlockSource(stream, len(data)) if bid == "b" else None
    )
    bits = bytes([0b00000101, 0b00000100])  # blocks 3, 5 and 13 (last, short)
    frames = list(responder.respond(ChunkRequest("b", 1024, 3, bits, "t1")))
    assert [f.block for f in frames if isinstance(f, ChunkData)] == [3, 5]
    assert stream.reads == [(3072, 1024), (5120, 1024)]
    bits = bytes([0b1])
    (last,) = list(responder.respond(ChunkRequest("b", 1024, 10, bits)))
    assert isinstance(last, ChunkData) and last.data == data[10240:]
    assert responder.stats.out_of_range_bits == 1


def test_responder_answers_unknown_bundle_and_bad_block_size() -> None:
    responder = ChunkResponder(lambda bid: None, max_block_size=4096)
    (err,) = list(responder.respond(ChunkRequest("nope", 1024, 0, b"\x01", "tok")))
    assert isinstance(err, ChunkRefusal) and err.reason == "unknown-bundle" and err.token == "tok"
    (err,) = list(responder.respond(ChunkRequest("nope", 8192, 0, b"\x01")))
    assert isinstance(err, ChunkRefusal) and err.reason == "bad-request"


def test_responder_caps_blocks_per_request(tmp_path: Path) -> None:
    path = tmp_path / "b.bundle"
    path.write_bytes(os.urandom(300 * 256))
    responder = ChunkResponder(lambda bid: FileBlockSource(path), max_blocks_per_request=100)
    frames = list(responder.respond(ChunkRequest("b", 256, 0, b"\xff" * 38)))
    assert len(frames) == 100


def test_responder_bytes_roundtrip_through_frames(tmp_path: Path) -> None:
    path = tmp_path / "b.bundle"
    content = os.urandom(5000)
    path.write_bytes(content)
    responder = ChunkResponder(lambda bid: FileBlockSource(path))
    req = ChunkRequest("b", 1024, 0, b"\x1f")
    got = b"".join(
        parse_chunk_frame(f).data  # type: ignore[union-attr]
        for f in responder.respond_bytes(req.to_bytes())
    )
    assert got == content
    with pytest.raises(MalformedMessageError):
        list(responder.respond_bytes(b"{}"))
    assert responder.stats.bad_requests == 1
