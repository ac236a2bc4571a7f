"""state.json: round trip, strict validation, atomic store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.errors import StateCorruptError
from agent.fs import OsFileSystem
from agent.machine import BeginInstall, advance
from agent.state import AgentState, SlotRef, UpdateState, load_state, store_state

V1 = SlotRef("a", "tiny", 1, "1" * 64)


def sample() -> AgentState:
    s = AgentState(active=V1, rollback_floor={"tiny": 1})
    return advance(s, BeginInstall("u-1", "file"), now="2026-06-01T00:00:00Z").state


def test_state_round_trip(tmp_path: Path):
    fs = OsFileSystem()
    s = sample()
    store_state(fs, tmp_path / "state.json", s)
    assert load_state(fs, tmp_path / "state.json") == s
    assert json.loads((tmp_path / "state.json").read_text())["state"] == "verifying"


def test_state_missing_file_is_a_new_device(tmp_path: Path):
    s = load_state(OsFileSystem(), tmp_path / "state.json")
    assert s == AgentState() and s.active is None and s.state is UpdateState.IDLE


def test_state_values_are_stable_strings():
    # These strings are the on-disk format; renaming one breaks devices in the field.
    assert [s.value for s in UpdateState] == [
        "idle", "downloading", "verifying", "staging", "switching", "trial",
        "committed", "rolling-back", "rolled-back", "aborted",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(state="flashing"), "unknown state 'flashing'"),
        (lambda d: d.update(format=2), "format 2"),
        (lambda d: d["active"].update(slot="c"), "active.slot"),
        (lambda d: d["active"].update(manifest_sha256="xyz"), "manifest_sha256"),
        (lambda d: d["rollback_floor"].update(tiny=-1), "rollback_floor"),
        (lambda d: d.update(update=None), "state verifying with update False"),
        (lambda d: d.update(trial_restarts="1"), "trial_restarts"),
    ],
)
def test_state_corrupt_is_refused(tmp_path: Path, mutate, message):
    doc = sample().to_dict()
    mutate(doc)
    path = tmp_path / "state.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(StateCorruptError, match=message):
        load_state(OsFileSystem(), path)


def test_state_not_json_is_refused(tmp_path: Path):
    path = tmp_path / "state.json"
    path.write_bytes(b"\x00\x00")
    with pytest.raises(StateCorruptError, match="not JSON"):
        load_state(OsFileSystem(), path)


def test_state_store_leaves_no_temp_file(tmp_path: Path):
    store_state(OsFileSystem(), tmp_path / "state.json", sample())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
