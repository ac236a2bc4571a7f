"""The state directory layout and the A/B (and shadow) model slots.

Layout (docs/agent.md)::

    STATE/
      agent.lock          flock held by the one agent process that may write
      trust-root.json     the pinned trust root (first use, then successors only)
      state.json          the persisted update state and active pointer (agent.state)
      slots/a/, slots/b/  A/B slots; slots/shadow/ a model evaluated beside the active one
        model.onnx        the first payload entry, decompressed
        payload.<path>    further payload entries, decompressed
        manifest.json     the signed manifest bytes, exactly as verified
        signatures.json   the release signatures over those bytes

Flow of an install into slot X: ``clean_slot`` -> ``SlotWriter`` receives the
payload from ``verify_bundle`` into ``.<name>.part`` files (untrusted until the
verifier calls ``end``, fsynced there) -> ``SlotWriter.write_metadata`` writes
the manifest and signature parts -> ``stage_slot`` renames every part into
place and fsyncs the directory -> ``check_slot`` re-reads the files and checks
them against the manifest (and the manifest against the hash the state names)
before the pointer may name the slot.

Guarantee: a slot named by the state only ever holds files whose hashes match
its manifest; ``check_slot`` detects anything else (torn writes, bit rot) as
``SlotIntegrityError``. Writes go through the ``FileSystem`` seam only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import SlotIntegrityError
from agent.fs import FileSystem, WriteHandle, ensure_dir, remove_tree
from agent.state import SlotRef
from edgefleet.errors import MalformedBundleError, VerificationError
from edgefleet.manifest import Manifest, PayloadEntry

if TYPE_CHECKING:  # cryptography loads only when signatures are checked
    from edgefleet.trust import Signature, TrustRoot

__all__ = [
    "MANIFEST_FILE",
    "MODEL_FILE",
    "SHADOW_SLOT",
    "SIGNATURES_FILE",
    "SlotContents",
    "SlotWriter",
    "StateLayout",
    "check_slot",
    "clean_slot",
    "payload_file_name",
    "stage_slot",
    "verify_slot_signatures",
]

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
SIGNATURES_FILE = "signatures.json"
SHADOW_SLOT = "shadow"


@dataclass(frozen=True)
class StateLayout:
    """Paths inside one state directory."""

    root: Path

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def trust_root_file(self) -> Path:
        return self.root / "trust-root.json"

    @property
    def lock_file(self) -> Path:
        return self.root / "agent.lock"

    @property
    def slots_dir(self) -> Path:
        return self.root / "slots"

    def slot_dir(self, slot: str) -> Path:
        return self.slots_dir / slot


def payload_file_name(index: int, entry: PayloadEntry) -> str:
    """File name of payload entry ``index`` inside a slot."""
    return MODEL_FILE if index == 0 else f"payload.{entry.path}"


def _part(name: str) -> str:
    return f".{name}.part"


class SlotWriter:
    """A ``PayloadSink`` writing verified payloads into one slot's part files.

    Bytes are untrusted until ``end``, which the verifier calls only after the
    whole bundle verified (every ``begin`` comes before the first ``end``). A
    bundle that fails leaves part files behind; ``clean_slot`` removes them.
    ``on_first_begin`` runs before the first byte is written (the agent records
    that the slot is no longer a rollback target, then empties it).
    """

    def __init__(
        self, fs: FileSystem, slot_dir: Path, on_first_begin: Callable[[], None] | None = None
    ) -> None:
        self._fs = fs
        self._dir = slot_dir
        self._on_first_begin = on_first_begin
        self._index = 0
        self._handle: WriteHandle | None = None
        self._names: dict[str, str] = {}  # payload path -> file name in the slot
        self.written: list[str] = []  # file names whose part files are complete and trusted

    def begin(self, entry: PayloadEntry) -> None:
        if self._on_first_begin is not None:
            # The verifier accepted everything but the payload bytes: only now
            # may the slot change.
            hook, self._on_first_begin = self._on_first_begin, None
            hook()
        self._finish_current()
        name = payload_file_name(self._index, entry)
        self._index += 1
        self._names[entry.path] = name
        self._handle = self._fs.create(self._dir / _part(name))

    def write(self, data: bytes | memoryview) -> None:
        assert self._handle is not None
        self._handle.write(data)

    def end(self, entry: PayloadEntry) -> None:
        self._finish_current()
        self.written.append(self._names[entry.path])

    def _finish_current(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            try:
                handle.fsync()
            finally:
                handle.close()

    def write_metadata(self, manifest_bytes: bytes, signatures_doc: bytes) -> None:
        """Write the manifest and signatures.json parts (fsynced).

        Raises:
            OSError: writing failed.
        """
        for name, data in ((MANIFEST_FILE, manifest_bytes), (SIGNATURES_FILE, signatures_doc)):
            handle = self._fs.create(self._dir / _part(name))
            try:
                handle.write(data)
                handle.fsync()
            finally:
                handle.close()
            self.written.append(name)

    def discard(self) -> None:
        """Close any open part after a failure (``clean_slot`` removes the files)."""
        self._on_first_begin = None
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()


def stage_slot(fs: FileSystem, slot_dir: Path) -> None:
    """Move every part file of ``slot_dir`` into place and make the result durable.

    Idempotent: a part already renamed is skipped.

    Raises:
        OSError: a rename or the directory sync failed.
    """
    for name in fs.listdir(slot_dir):
        if name.startswith(".") and name.endswith(".part"):
            fs.replace(slot_dir / name, slot_dir / name[1 : -len(".part")])
    fs.fsync_dir(slot_dir)


def clean_slot(fs: FileSystem, layout: StateLayout, slot: str) -> None:
    """Remove a slot's files and recreate it empty (both durable).

    Raises:
        OSError: removing or creating failed.
    """
    path = layout.slot_dir(slot)
    remove_tree(fs, path)
    ensure_dir(fs, path)


@dataclass(frozen=True)
class SlotContents:
    """A slot's files, checked against its manifest."""

    ref: SlotRef
    manifest: Manifest
    manifest_bytes: bytes
    signatures_doc: bytes  # signatures.json, parsed only when verified
    model_bytes: bytes


def _integrity(ref: SlotRef, msg: str) -> SlotIntegrityError:
    return SlotIntegrityError(f"slot {ref.slot} ({ref.model} v{ref.version}): {msg}")


def check_slot(fs: FileSystem, layout: StateLayout, ref: SlotRef) -> SlotContents:
    """Read a slot and check every file against the manifest the state names.

    Raises:
        SlotIntegrityError: a file is missing, or a hash or identity differs.
        OSError: reading failed for another reason than a missing file.
    """
    slot_dir = layout.slot_dir(ref.slot)
    try:
        manifest_bytes = fs.read_bytes(slot_dir / MANIFEST_FILE)
    except FileNotFoundError:
        raise _integrity(ref, "manifest.json is missing") from None
    if hashlib.sha256(manifest_bytes).hexdigest() != ref.manifest_sha256:
        raise _integrity(ref, "manifest.json differs from the manifest that was verified")
    try:
        manifest = Manifest.from_bytes(manifest_bytes)
    except MalformedBundleError as exc:
        raise _integrity(ref, f"manifest.json does not parse: {exc}") from exc
    if (manifest.name, manifest.version) != (ref.model, ref.version):
        raise _integrity(ref, f"manifest names {manifest.name} v{manifest.version}")
    try:
        sig_doc = fs.read_bytes(slot_dir / SIGNATURES_FILE)
    except FileNotFoundError:
        raise _integrity(ref, "signatures.json is missing") from None
    model_bytes = b""
    for index, entry in enumerate(manifest.payload):
        name = payload_file_name(index, entry)
        try:
            data = fs.read_bytes(slot_dir / name)
        except FileNotFoundError:
            raise _integrity(ref, f"{name} is missing") from None
        if len(data) != entry.uncompressed_size:
            raise _integrity(
                ref, f"{name} is {len(data)} bytes, manifest declares {entry.uncompressed_size}"
            )
        if hashlib.sha256(data).hexdigest() != entry.uncompressed_sha256:
            raise _integrity(ref, f"{name} sha256 differs from the manifest")
        if index == 0:
            model_bytes = data
    return SlotContents(ref, manifest, manifest_bytes, sig_doc, model_bytes)


def _parse_signature_file(ref: SlotRef, data: bytes) -> tuple[Signature, ...]:
    from edgefleet.trust import parse_signatures

    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _integrity(ref, "signatures.json is not JSON") from exc
    if not isinstance(doc, dict) or set(doc) != {"signatures"}:
        raise _integrity(ref, "signatures.json must hold only 'signatures'")
    try:
        return tuple(parse_signatures(doc["signatures"], error=SlotIntegrityError))
    except SlotIntegrityError as exc:
        raise _integrity(ref, f"signatures.json: {exc}") from exc


def verify_slot_signatures(contents: SlotContents, trust_root: TrustRoot) -> None:
    """Check that the slot's manifest is still signed by the current release keys.

    A model signed by a key revoked since its install fails here, so it cannot
    become active again through a rollback.

    Raises:
        SlotIntegrityError: signatures.json is not a signature list.
        VerificationError: the threshold of release signatures is not met.
    """
    signatures = _parse_signature_file(contents.ref, contents.signatures_doc)
    try:
        trust_root.verify_role_signatures("release", contents.manifest_bytes, signatures)
    except VerificationError as exc:
        raise type(exc)(
            f"slot {contents.ref.slot} ({contents.ref.model} v{contents.ref.version}) is no "
            f"longer trusted by trust root v{trust_root.version}: {exc}"
        ) from exc
