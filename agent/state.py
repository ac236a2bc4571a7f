"""The agent's persisted update state (``STATE/state.json``) and its codec.

Flow: ``load_state`` reads and strictly validates the file (a missing file is
the initial state of a new device); the update machine (``agent.machine``)
computes the next ``AgentState``; ``store_state`` writes it with one atomic
write (temp file, fsync, rename, directory fsync). Nothing else writes
``state.json``.

Invariants:

* ``state`` is one of ``UpdateState``'s stable strings. They are part of the
  on-disk format: an agent upgraded in the field must read what its older
  self wrote, so values are never renamed, only added.
* ``active`` is the *active pointer*: the slot whose model the device serves
  after recovery. Switching slots is one atomic store of this file.
* ``rollback_floor`` (model name -> highest version ever committed) only
  grows, and only in the store that commits a model.
* ``update.stores`` counts the stores made for the current update; the
  machine breaks loops with it (Mender's store counter).
* ``history`` holds the last ``HISTORY_LIMIT`` update outcomes, newest last.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from agent.errors import StateCorruptError
from agent.fs import FileSystem, atomic_write
from edgefleet.errors import EdgefleetError
from edgefleet.ids import HEX64_RE

__all__ = [
    "HISTORY_LIMIT",
    "SLOTS",
    "STATE_FORMAT",
    "UPDATE_KINDS",
    "AgentState",
    "ErrorInfo",
    "SlotRef",
    "UpdateInfo",
    "UpdateOutcome",
    "UpdateState",
    "load_state",
    "other_slot",
    "store_state",
    "valid_update_id",
]

STATE_FORMAT = 1
SLOTS = ("a", "b")
HISTORY_LIMIT = 20
# install: a bundle; rollback: an operator's request; recover: the active slot
# failed to load at start-up and the agent falls back on its own.
UPDATE_KINDS = ("install", "rollback", "recover")
_HEX64 = HEX64_RE
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


class UpdateState(str, Enum):
    """Persisted update states. The values are stable on-disk strings."""

    IDLE = "idle"  # no update in progress; ``active`` serves
    DOWNLOADING = "downloading"  # the bundle is being fetched; no slot touched yet
    VERIFYING = "verifying"  # verify_bundle streams the payload into the inactive slot
    STAGING = "staging"  # verified; moving the slot files into place and syncing
    SWITCHING = "switching"  # the staged slot is durable; next store flips the pointer
    TRIAL = "trial"  # pointer flipped; health check pending; boot counter running
    COMMITTED = "committed"  # health check passed, floor moved; outcome being reported
    ROLLING_BACK = "rolling-back"  # about to point back at the previous slot
    ROLLED_BACK = "rolled-back"  # pointer is back; outcome being reported
    ABORTED = "aborted"  # ended before switching (rejected/interrupted); being reported


def other_slot(slot: str) -> str:
    """The other A/B slot name."""
    return "b" if slot == "a" else "a"


def _bad(msg: str) -> StateCorruptError:
    return StateCorruptError(f"state.json: {msg}")


def _get(d: Any, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise _bad(f"{what} is missing {key!r}")
    value = d[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise _bad(f"{what}.{key} has the wrong type")
    return value


@dataclass(frozen=True)
class SlotRef:
    """A model installed in a slot, named by the hash of its manifest."""

    slot: str
    model: str
    version: int
    manifest_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "model": self.model,
            "version": self.version,
            "manifest_sha256": self.manifest_sha256,
        }

    @classmethod
    def from_dict(cls, d: Any, what: str) -> SlotRef | None:
        if d is None:
            return None
        slot = _get(d, "slot", str, what)
        if slot not in SLOTS:
            raise _bad(f"{what}.slot must be one of {SLOTS}")
        sha = _get(d, "manifest_sha256", str, what)
        if not _HEX64.fullmatch(sha):
            raise _bad(f"{what}.manifest_sha256 is not a sha256 hex digest")
        version = _get(d, "version", int, what)
        if version < 1:
            raise _bad(f"{what}.version must be >= 1")
        return cls(slot, _get(d, "model", str, what), version, sha)

    def describe(self) -> str:
        return f"{self.model} v{self.version} (slot {self.slot})"


@dataclass(frozen=True)
class ErrorInfo:
    """Why an update ended badly: the error class name, its code and message."""

    error: str
    code: int
    message: str

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        code = exc.code if isinstance(exc, EdgefleetError) else 1
        return cls(type(exc).__name__, code, str(exc)[:2000])

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.error, "code": self.code, "message": self.message}

    @classmethod
    def from_dict(cls, d: Any, what: str) -> ErrorInfo | None:
        if d is None:
            return None
        return cls(
            _get(d, "error", str, what), _get(d, "code", int, what), _get(d, "message", str, what)
        )


@dataclass(frozen=True)
class UpdateOutcome:
    """The outcome of one update, reported to the event sink and kept in history.

    Not a wire message: the server hears about updates through the telemetry
    record's ``events`` (``edgefleet.wire.UpdateEvent``, one per step).
    """

    update_id: str
    kind: str  # one of UPDATE_KINDS
    outcome: str  # "committed", "rolled-back" or "aborted"
    model: str | None
    version: int | None
    active: SlotRef | None  # what serves after this outcome
    error: ErrorInfo | None
    at: str  # UTC timestamp

    def to_dict(self) -> dict[str, Any]:
        return {
            "update_id": self.update_id,
            "kind": self.kind,
            "outcome": self.outcome,
            "model": self.model,
            "version": self.version,
            "active": None if self.active is None else self.active.to_dict(),
            "error": None if self.error is None else self.error.to_dict(),
            "at": self.at,
        }

    @classmethod
    def from_dict(cls, d: Any, what: str) -> UpdateOutcome:
        outcome = _get(d, "outcome", str, what)
        if outcome not in ("committed", "rolled-back", "aborted"):
            raise _bad(f"{what}.outcome {outcome!r} is unknown")
        model = d.get("model")
        version = d.get("version")
        if model is not None and not isinstance(model, str):
            raise _bad(f"{what}.model has the wrong type")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise _bad(f"{what}.version has the wrong type")
        return cls(
            _get(d, "update_id", str, what),
            _get(d, "kind", str, what),
            outcome,
            model,
            version,
            SlotRef.from_dict(d.get("active"), f"{what}.active"),
            ErrorInfo.from_dict(d.get("error"), f"{what}.error"),
            _get(d, "at", str, what),
        )


@dataclass(frozen=True)
class UpdateInfo:
    """The update in progress (install of a bundle, or a rollback)."""

    id: str
    kind: str  # one of UPDATE_KINDS
    source: str  # where the bundle came from (file path, URL); informational
    started: str  # UTC timestamp
    stores: int = 0  # stores made for this update (loop breaker)
    slot: str | None = None  # install: the inactive slot being written
    staged: SlotRef | None = None  # install: what verification vouched for
    error: ErrorInfo | None = None  # why it is ending badly (aborted / rolled back)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "source": self.source,
            "started": self.started,
            "stores": self.stores,
            "slot": self.slot,
            "staged": None if self.staged is None else self.staged.to_dict(),
            "error": None if self.error is None else self.error.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Any, what: str) -> UpdateInfo | None:
        if d is None:
            return None
        update_id = _get(d, "id", str, what)
        if not _ID.fullmatch(update_id):
            raise _bad(f"{what}.id {update_id!r} is not a valid update id")
        kind = _get(d, "kind", str, what)
        if kind not in UPDATE_KINDS:
            raise _bad(f"{what}.kind {kind!r} is unknown")
        slot = d.get("slot")
        if slot is not None and slot not in SLOTS:
            raise _bad(f"{what}.slot must be one of {SLOTS} or null")
        stores = _get(d, "stores", int, what)
        if stores < 0:
            raise _bad(f"{what}.stores must be >= 0")
        return cls(
            update_id,
            kind,
            _get(d, "source", str, what),
            _get(d, "started", str, what),
            stores,
            slot,
            SlotRef.from_dict(d.get("staged"), f"{what}.staged"),
            ErrorInfo.from_dict(d.get("error"), f"{what}.error"),
        )


def valid_update_id(update_id: str) -> bool:
    """Whether ``update_id`` may be stored (letters, digits, ``._:-``, <= 128)."""
    return bool(_ID.fullmatch(update_id))


@dataclass(frozen=True)
class AgentState:
    """Everything the agent persists about updates (see the module invariants)."""

    state: UpdateState = UpdateState.IDLE
    active: SlotRef | None = None
    previous: SlotRef | None = None
    update: UpdateInfo | None = None
    trial_restarts: int = 0
    rollback_floor: Mapping[str, int] = field(default_factory=dict)
    last_error: ErrorInfo | None = None
    history: tuple[UpdateOutcome, ...] = ()
    seq: int = 0  # total stores ever made; lets readers notice a change

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "state": self.state.value,
            "active": None if self.active is None else self.active.to_dict(),
            "previous": None if self.previous is None else self.previous.to_dict(),
            "update": None if self.update is None else self.update.to_dict(),
            "trial_restarts": self.trial_restarts,
            "rollback_floor": dict(sorted(self.rollback_floor.items())),
            "last_error": None if self.last_error is None else self.last_error.to_dict(),
            "history": [e.to_dict() for e in self.history],
            "seq": self.seq,
        }

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def from_dict(cls, d: Any) -> AgentState:
        """Validate a decoded ``state.json``.

        Raises:
            StateCorruptError: naming the first field that is wrong.
        """
        if not isinstance(d, dict):
            raise _bad("top level is not an object")
        if d.get("format") != STATE_FORMAT:
            raise _bad(f"format {d.get('format')!r} is not supported (want {STATE_FORMAT})")
        raw_state = _get(d, "state", str, "state.json")
        try:
            state = UpdateState(raw_state)
        except ValueError:
            raise _bad(
                f"unknown state {raw_state!r} (written by a newer agent?); "
                "refusing to guess how to recover"
            ) from None
        floor = _get(d, "rollback_floor", dict, "state.json")
        for name, version in floor.items():
            if not isinstance(version, int) or isinstance(version, bool) or version < 0:
                raise _bad(f"rollback_floor[{name!r}] must be a non-negative integer")
        restarts = _get(d, "trial_restarts", int, "state.json")
        seq = _get(d, "seq", int, "state.json")
        history = _get(d, "history", list, "state.json")
        if restarts < 0 or seq < 0:
            raise _bad("trial_restarts and seq must be >= 0")
        out = cls(
            state=state,
            active=SlotRef.from_dict(d.get("active"), "active"),
            previous=SlotRef.from_dict(d.get("previous"), "previous"),
            update=UpdateInfo.from_dict(d.get("update"), "update"),
            trial_restarts=restarts,
            rollback_floor=dict(floor),
            last_error=ErrorInfo.from_dict(d.get("last_error"), "last_error"),
            history=tuple(
                UpdateOutcome.from_dict(e, f"history[{i}]") for i, e in enumerate(history)
            ),
            seq=seq,
        )
        out.check_consistent()
        return out

    def check_consistent(self) -> None:
        """Cross-field invariants of a stored state.

        Raises:
            StateCorruptError: the fields contradict each other.
        """
        if (self.state is UpdateState.IDLE) != (self.update is None):
            raise _bad(f"state {self.state.value} with update {self.update is not None}")
        if (
            self.active is not None
            and self.previous is not None
            and self.active.slot == self.previous.slot
        ):
            raise _bad("active and previous point at the same slot")
        if self.update is not None and self.update.kind == "install" and self.update.slot:
            installing = self.state in (
                UpdateState.VERIFYING,
                UpdateState.STAGING,
                UpdateState.SWITCHING,
            )
            if installing and self.active is not None and self.active.slot == self.update.slot:
                raise _bad("an install writes the active slot")


def load_state(fs: FileSystem, path: Path) -> AgentState:
    """Read ``state.json``; a missing file is the state of a new device.

    Raises:
        StateCorruptError: the file is unreadable, not JSON, or not valid.
    """
    try:
        data = fs.read_bytes(path)
    except FileNotFoundError:
        return AgentState()
    except OSError as exc:
        raise _bad(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(f"{path} is not JSON ({exc})") from exc
    return AgentState.from_dict(doc)


def store_state(fs: FileSystem, path: Path, state: AgentState) -> None:
    """Atomically replace ``state.json`` with ``state``.

    Raises:
        OSError: the write failed; the file still holds the previous state.
    """
    atomic_write(fs, path, state.to_bytes())
