"""The simulated disk: fault injection and the durability model behind power cuts."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from agent.fs import atomic_write
from firmware_sim.disk import FaultPlan, PowerCut, ProcessKilled, SimDisk


def write(disk: SimDisk, path: Path, data: bytes, *, sync: bool = True) -> None:
    h = disk.create(path)
    h.write(data)
    if sync:
        h.fsync()
    h.close()


def test_disk_counts_every_mutation(tmp_path: Path):
    disk = SimDisk()
    atomic_write(disk, tmp_path / "f", b"x")
    assert [m.op for m in disk.log] == ["create", "write", "fsync", "replace", "fsync_dir"]
    assert disk.count == 5


def test_disk_oserror_fault_does_not_apply(tmp_path: Path):
    disk = SimDisk()
    disk.arm(FaultPlan(at=1, errno=errno.EIO))
    with pytest.raises(OSError, match="simulated EIO"):
        disk.mkdir(tmp_path / "d")
    assert not (tmp_path / "d").exists()
    disk.mkdir(tmp_path / "d")  # one-shot: the next one works
    assert (tmp_path / "d").is_dir()


def test_disk_sticky_fault_keeps_failing(tmp_path: Path):
    disk = SimDisk()
    disk.arm(FaultPlan(at=2, errno=errno.EROFS, sticky=True))
    disk.mkdir(tmp_path / "a")
    for name in ("b", "c"):
        with pytest.raises(OSError):
            disk.mkdir(tmp_path / name)


def test_disk_kill_refuses_every_later_mutation(tmp_path: Path):
    disk = SimDisk()
    disk.arm(FaultPlan(at=2, kind="kill"))
    h = disk.create(tmp_path / "f")
    with pytest.raises(ProcessKilled):
        h.write(b"data")
    with pytest.raises(ProcessKilled):
        disk.unlink(tmp_path / "f")  # cleanup in a finally block cannot happen
    assert (tmp_path / "f").exists()
    disk.revive()
    disk.unlink(tmp_path / "f")


def test_disk_power_loss_drops_unsynced_data(tmp_path: Path):
    disk = SimDisk()
    write(disk, tmp_path / "f", b"durable")
    disk.fsync_dir(tmp_path)
    h = disk.create(tmp_path / "g")
    h.write(b"lost")
    disk.fsync_dir(tmp_path)  # the entry is durable, the data is not
    disk.power_loss()
    assert (tmp_path / "f").read_bytes() == b"durable"
    assert (tmp_path / "g").read_bytes() == b""


def test_disk_power_loss_reverts_rename_without_dir_fsync(tmp_path: Path):
    disk = SimDisk()
    write(disk, tmp_path / "f", b"old")
    disk.fsync_dir(tmp_path)
    write(disk, tmp_path / "tmp", b"new")
    disk.replace(tmp_path / "tmp", tmp_path / "f")
    assert (tmp_path / "f").read_bytes() == b"new"
    disk.power_loss()
    assert (tmp_path / "f").read_bytes() == b"old"
    assert not (tmp_path / "tmp").exists()


def test_disk_atomic_write_survives_power_loss(tmp_path: Path):
    disk = SimDisk()
    atomic_write(disk, tmp_path / "f", b"old")
    atomic_write(disk, tmp_path / "f", b"new")
    disk.power_loss()
    assert (tmp_path / "f").read_bytes() == b"new"


def test_disk_power_loss_restores_unlinked_file(tmp_path: Path):
    disk = SimDisk()
    write(disk, tmp_path / "f", b"keep")
    disk.fsync_dir(tmp_path)
    disk.unlink(tmp_path / "f")
    disk.power_loss()
    assert (tmp_path / "f").read_bytes() == b"keep"


def test_disk_power_loss_undoes_new_directory(tmp_path: Path):
    disk = SimDisk()
    disk.mkdir(tmp_path / "d")
    write(disk, tmp_path / "d" / "f", b"x")
    disk.fsync_dir(tmp_path / "d")
    disk.power_loss()
    assert not (tmp_path / "d").exists()


def test_disk_durable_removal_forgets_the_directory_contents(tmp_path: Path):
    disk = SimDisk()
    disk.mkdir(tmp_path / "d")
    write(disk, tmp_path / "d" / "f", b"x")
    disk.fsync_dir(tmp_path / "d")
    disk.fsync_dir(tmp_path)
    disk.unlink(tmp_path / "d" / "f")
    disk.rmdir(tmp_path / "d")
    disk.mkdir(tmp_path / "d")
    disk.fsync_dir(tmp_path)
    disk.power_loss()
    assert (tmp_path / "d").is_dir() and list((tmp_path / "d").iterdir()) == []


def test_disk_full_raises_enospc(tmp_path: Path):
    disk = SimDisk(free_bytes=10)
    h = disk.create(tmp_path / "f")
    h.write(b"12345")
    with pytest.raises(OSError) as info:
        h.write(b"123456")
    assert info.value.errno == errno.ENOSPC
    h.close()
    disk.unlink(tmp_path / "f")
    assert disk.free_bytes == 10


def test_disk_power_cut_is_a_base_exception(tmp_path: Path):
    disk = SimDisk()
    disk.arm(FaultPlan(at=1, kind="power"))
    with pytest.raises(PowerCut):
        try:
            disk.mkdir(tmp_path / "d")
        except Exception:  # what the agent's handlers catch
            pytest.fail("a power cut must not be catchable as Exception")
