"""The filesystem seam's helpers: atomic write, tree removal, the process lock."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from agent.fs import OsFileSystem, atomic_write, ensure_dir, remove_tree
from firmware_sim.disk import FaultPlan, SimDisk


def test_atomic_write_replaces(tmp_path: Path):
    fs = OsFileSystem()
    atomic_write(fs, tmp_path / "f", b"one")
    atomic_write(fs, tmp_path / "f", b"two")
    assert (tmp_path / "f").read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_atomic_write_oserror_keeps_old_content(tmp_path: Path, k: int):
    disk = SimDisk()
    atomic_write(disk, tmp_path / "f", b"old")
    disk.arm(FaultPlan(at=k, errno=errno.EIO))
    with pytest.raises(OSError):
        atomic_write(disk, tmp_path / "f", b"new")
    content = (tmp_path / "f").read_bytes()
    # Up to the rename the old bytes stay; a failed directory sync after it keeps the new.
    assert content == (b"new" if k == 5 else b"old")
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "f"]
    assert leftovers == [], "the temp file is removed"


def test_remove_tree_and_ensure_dir(tmp_path: Path):
    fs = OsFileSystem()
    ensure_dir(fs, tmp_path / "a" / "b" / "c")
    (tmp_path / "a" / "b" / "c" / "f").write_bytes(b"x")
    (tmp_path / "a" / "g").write_bytes(b"y")
    remove_tree(fs, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    remove_tree(fs, tmp_path / "a")  # missing is fine


def test_lock_is_exclusive_until_released(tmp_path: Path):
    fs = OsFileSystem()
    first = fs.lock(tmp_path / "lock")
    with pytest.raises(BlockingIOError, match="locked"):
        fs.lock(tmp_path / "lock")
    first.release()
    fs.lock(tmp_path / "lock").release()
