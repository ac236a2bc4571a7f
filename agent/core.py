"""The device agent: orchestrates updates, serves inference, runs a shadow model.

Flow of an update (the decisions are ``agent.machine.advance``; this module
performs them): ``install(bundle)`` -> ``BeginInstall`` -> the machine answers
with an action (verify into the inactive slot through ``verify_bundle`` with
the pinned trust root, this device's facts, the rollback floor and the clock;
stage; re-check; health-check; report; load) -> its result is the next event
-> ... until the machine says ``Stop``. Every state change is one atomic store
of ``state.json`` *before* the next action runs, so a crash at any point
resumes from the recovery table in ``agent.machine``. Constructing an
``Agent`` on a state directory *is* the reboot: it takes the directory's lock
and drives the ``Boot`` event.

Flow of a prediction: ``predict(inputs)`` -> the serving session's ``run``
with pre-resolved output names -> outputs. When an observer or a shadow model
is attached it also times the call and hands (inputs, outputs, seconds,
prediction id) to them; binning and comparison happen elsewhere (telemetry's
buffer, the shadow thread). The hot path takes no lock: the serving model is
one attribute replaced atomically.

Invariants: a rejected bundle never touches the active slot (verification
writes only the inactive slot, through a ``PayloadSink``); a model serves only
after it passed its health check (during the trial the previous model keeps
serving); every filesystem mutation goes through the ``FileSystem`` seam;
``OSError`` becomes ``StorageError`` at this boundary.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from agent.errors import (
    AgentBusyError,
    AgentError,
    InterruptedUpdateError,
    InvalidInputError,
    InvalidTransitionError,
    NoActiveModelError,
    NothingToRollBackError,
    NoTrustRootError,
    OutputSpecError,
    StorageError,
)
from agent.fs import FileSystem, LockHandle, OsFileSystem, atomic_write, ensure_dir
from agent.health import run_health_check
from agent.machine import (
    Action,
    ActiveLoaded,
    BeginDownload,
    BeginInstall,
    BeginRollback,
    Boot,
    CheckSlot,
    CheckTarget,
    Clean,
    Cleaned,
    Continue,
    DownloadFailed,
    Event,
    Failed,
    HealthCheck,
    HealthChecked,
    LoadActive,
    MachineLimits,
    PayloadStarting,
    Report,
    Reported,
    SlotChecked,
    Stage,
    Staged,
    Stop,
    TargetChecked,
    Verified,
    VerifyInto,
    advance,
    serving_ref,
)
from agent.options import AgentOptions
from agent.runtime import (
    AGENT_VERSION,
    LoadedModel,
    Session,
    SessionFactory,
    device_facts,
    make_session,
)
from agent.shadow import ShadowRunner
from agent.slots import (
    SHADOW_SLOT,
    SlotContents,
    SlotWriter,
    StateLayout,
    check_slot,
    clean_slot,
    stage_slot,
    verify_slot_signatures,
)
from agent.state import (
    HISTORY_LIMIT,
    AgentState,
    ErrorInfo,
    SlotRef,
    UpdateEvent,
    UpdateState,
    load_state,
    store_state,
    valid_update_id,
)
from edgefleet.errors import EdgefleetError
from edgefleet.manifest import DeviceFacts, Manifest
from edgefleet.timeutil import format_utc, utcnow

if TYPE_CHECKING:  # the verifier and cryptography load on the first update, not at start-up
    from edgefleet.trust import TrustRoot

__all__ = [
    "Agent",
    "BundleSource",
    "EventSink",
    "FeedbackSink",
    "InstallResult",
    "Observer",
    "new_update_id",
    "read_status",
    "status_dict",
]

log = logging.getLogger("edgefleet.agent")

# observe(inputs, outputs, latency_s, prediction_id); must only append to a buffer.
Observer = Callable[[Mapping[str, np.ndarray], Sequence[np.ndarray], float, int], None]
FeedbackSink = Callable[[int, Any], None]  # (prediction_id, label)
EventSink = Callable[[UpdateEvent], None]
BundleSource = Path | str | bytes | bytearray | memoryview | IO[bytes]


def new_update_id(prefix: str = "local") -> str:
    """A fresh update id for an update that did not come with one."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


@dataclass(frozen=True)
class InstallResult:
    """The outcome of ``install`` or ``rollback`` (also sent to the event sink)."""

    update_id: str
    kind: str
    outcome: str  # "committed", "rolled-back" or "aborted"
    model: str | None
    version: int | None
    active: SlotRef | None
    error: ErrorInfo | None

    @property
    def ok(self) -> bool:
        """True when the install committed (or the rollback completed)."""
        return self.error is None and self.outcome in ("committed", "rolled-back")

    @property
    def code(self) -> int:
        """Process exit status: 0, or the error's code."""
        return 0 if self.ok or self.error is None else self.error.code

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "update_id": self.update_id,
            "kind": self.kind,
            "outcome": self.outcome,
            "model": self.model,
            "version": self.version,
            "active": None if self.active is None else self.active.to_dict(),
            "error": None if self.error is None else self.error.to_dict(),
        }

    @classmethod
    def from_event(cls, event: UpdateEvent) -> InstallResult:
        return cls(
            event.update_id,
            event.kind,
            event.outcome,
            event.model,
            event.version,
            event.active,
            event.error,
        )


def status_dict(
    state: AgentState,
    *,
    state_dir: Path,
    trust_root_version: int | None,
    serving: SlotRef | None = None,
    live: bool = False,
) -> dict[str, Any]:
    """The JSON-ready status of a state directory (``agent status``)."""
    return {
        "state": state.state.value,
        "active": None if state.active is None else state.active.to_dict(),
        "previous": None if state.previous is None else state.previous.to_dict(),
        "serving": _ref_dict(serving if live else serving_ref(state)),
        "rollback_floor": dict(sorted(state.rollback_floor.items())),
        "last_error": None if state.last_error is None else state.last_error.to_dict(),
        "trial_restarts": state.trial_restarts,
        "update": None if state.update is None else state.update.to_dict(),
        "history": [e.to_dict() for e in state.history[-5:]],
        "trust_root_version": trust_root_version,
        "agent_version": AGENT_VERSION,
        "state_dir": str(state_dir),
        "seq": state.seq,
    }


def _ref_dict(ref: SlotRef | None) -> dict[str, Any] | None:
    return None if ref is None else ref.to_dict()


def read_status(state_dir: Path, fs: FileSystem | None = None) -> dict[str, Any]:
    """Status of a state directory without taking its lock or loading a model.

    Raises:
        StateCorruptError: ``state.json`` is not valid.
        MalformedTrustRootError: the pinned trust root is not valid.
    """
    fs = fs or OsFileSystem()
    layout = StateLayout(Path(state_dir))
    state = load_state(fs, layout.state_file)
    root_version = _pinned_version(fs, layout)
    return status_dict(state, state_dir=layout.root, trust_root_version=root_version)


def _pinned_version(fs: FileSystem, layout: StateLayout) -> int | None:
    """The pinned trust root's version, for display (it was verified when pinned).

    Raises:
        MalformedTrustRootError: the file is not a trust-root document.
    """
    from edgefleet.canonical import CanonicalError, decode_strict
    from edgefleet.trust import MalformedTrustRootError

    try:
        data = fs.read_bytes(layout.trust_root_file)
    except FileNotFoundError:
        return None
    try:
        version = decode_strict(data, require_canonical=False)["signed"]["version"]
    except (CanonicalError, KeyError, TypeError) as exc:
        raise MalformedTrustRootError(f"{layout.trust_root_file} is not a trust root") from exc
    if not isinstance(version, int):
        raise MalformedTrustRootError(f"{layout.trust_root_file} has no integer version")
    return version


def _storage(exc: OSError, what: str) -> StorageError:
    detail = exc.strerror or str(exc) or type(exc).__name__
    return StorageError(f"{what}: {detail}")


class Agent:
    """One device's agent on one state directory.

    Args:
        state_dir: the state directory (created if missing).
        options: bounded settings.
        fs: the filesystem seam (tests and firmware_sim inject faults here).
        clock: current UTC time (verification expiry, records).
        event_sink: receives each update outcome (at least once).
        observer: called after each prediction (see ``Observer``).
        feedback: receives ``feedback(prediction_id, label)`` calls.
        session_factory: builds onnxruntime sessions (tests inject failures).
        facts: the device facts; default from ``options`` and the runtime.
        readonly: do not lock, recover or write (``agent predict``/``status``
            beside a running daemon); serves ``serving_ref`` of the state.

    Raises:
        AgentBusyError: another process holds the state directory.
        StateCorruptError: ``state.json`` is not valid.
        StorageError: creating the directory or storing a recovery step failed.
    """

    def __init__(
        self,
        state_dir: Path | str,
        options: AgentOptions | None = None,
        *,
        fs: FileSystem | None = None,
        clock: Callable[[], datetime] | None = None,
        event_sink: EventSink | None = None,
        observer: Observer | None = None,
        feedback: FeedbackSink | None = None,
        session_factory: SessionFactory | None = None,
        facts: DeviceFacts | None = None,
        readonly: bool = False,
    ) -> None:
        self.options = options or AgentOptions()
        self.layout = StateLayout(Path(state_dir))
        self.readonly = readonly
        self._fs = fs or OsFileSystem()
        self._clock = clock or utcnow
        self._event_sink = event_sink
        self._observer = observer
        self._feedback_sink = feedback
        self._session_factory = session_factory or make_session
        self._facts = facts
        self._limits = MachineLimits(self.options.max_trial_restarts, self.options.max_stores)
        self._op_lock = threading.RLock()
        self._ids = itertools.count(1)
        self._lock: LockHandle | None = None
        self._bundle: IO[bytes] | bytes | bytearray | memoryview | None = None
        self._checked: SlotContents | None = None
        self._candidate: LoadedModel | None = None
        self._serving: LoadedModel | None = None
        self._shadow: ShadowRunner | None = None
        self._hooked = False
        self._undelivered: list[UpdateEvent] = []
        self.observer_errors = 0
        self.feedback_count = 0
        self._trust: TrustRoot | None = None
        if readonly:
            self._state = load_state(self._fs, self.layout.state_file)
            ref = serving_ref(self._state)
            if ref is not None:
                self._serving = self._load(ref)
            return
        try:
            ensure_dir(self._fs, self.layout.root)
            self._lock = self._fs.lock(self.layout.lock_file)
        except BlockingIOError:
            raise AgentBusyError(
                f"{self.layout.root} is in use by another agent process "
                f"(lock {self.layout.lock_file})"
            ) from None
        except OSError as exc:
            raise _storage(exc, f"cannot prepare state directory {self.layout.root}") from exc
        try:
            ensure_dir(self._fs, self.layout.slots_dir)
            self._state = load_state(self._fs, self.layout.state_file)
            self._drive(Boot())
        except OSError as exc:
            self._release()
            raise _storage(exc, f"cannot prepare state directory {self.layout.root}") from exc
        except BaseException:
            self._release()  # as the kernel would if the process died here
            raise

    # ------------------------------------------------------------------ hooks

    def set_observer(self, observer: Observer | None) -> None:
        """Attach (or detach) the per-prediction observer."""
        self._observer = observer
        self._refresh_hook()

    def set_feedback_sink(self, feedback: FeedbackSink | None) -> None:
        """Attach (or detach) the receiver of ground-truth labels."""
        self._feedback_sink = feedback

    def set_event_sink(self, sink: EventSink | None) -> None:
        """Attach (or detach) the receiver of update outcomes.

        Outcomes reported while no sink was attached (typically re-reports made
        by the recovery in the constructor) are delivered to it first.
        """
        self._event_sink = sink
        if sink is not None:
            pending, self._undelivered = self._undelivered, []
            for event in pending:
                self._deliver(sink, event)

    def _refresh_hook(self) -> None:
        self._hooked = self._observer is not None or self._shadow is not None

    # ------------------------------------------------------------------ facts

    @property
    def state(self) -> AgentState:
        """The last persisted state."""
        return self._state

    @property
    def serving(self) -> SlotRef | None:
        """The model answering ``predict`` now (None before the first install)."""
        model = self._serving
        return None if model is None else model.ref

    @property
    def serving_session(self) -> Session | None:
        """The serving onnxruntime session (diagnostics, benchmarks).

        Running it directly bypasses the observer and the shadow model.
        """
        model = self._serving
        return None if model is None else model.session

    @property
    def serving_manifest(self) -> Manifest | None:
        """The verified manifest of the serving model (inputs, outputs, drift reference)."""
        model = self._serving
        return None if model is None else model.manifest

    def device_facts(self) -> DeviceFacts:
        """The facts bundles are matched against (computed once)."""
        if self._facts is None:
            self._facts = device_facts(self.options.device_class)
        return self._facts

    def trust_root(self) -> TrustRoot:
        """The pinned trust root.

        Raises:
            NoTrustRootError: none is pinned.
            MalformedTrustRootError: the pinned file is not valid.
        """
        from edgefleet.trust import TrustRoot

        if self._trust is None:
            try:
                data = self._fs.read_bytes(self.layout.trust_root_file)
            except FileNotFoundError:
                raise NoTrustRootError(
                    f"no trust root pinned in {self.layout.root}: give --trust-root on first use"
                ) from None
            self._trust = TrustRoot.from_bytes(data)
        return self._trust

    def has_trust_root(self) -> bool:
        """Whether a trust root is pinned."""
        return self._trust is not None or self._fs.exists(self.layout.trust_root_file)

    def status(self) -> dict[str, Any]:
        """JSON-ready status: persisted state plus what serves now and shadow stats."""
        root_version = (
            self._trust.version
            if self._trust is not None
            else _pinned_version(self._fs, self.layout)
        )
        out = status_dict(
            self._state,
            state_dir=self.layout.root,
            trust_root_version=root_version,
            serving=self.serving,
            live=True,
        )
        out["device_class"] = self.options.device_class
        out["shadow"] = self.shadow_stats()
        out["observer_errors"] = self.observer_errors
        out["feedback_count"] = self.feedback_count
        return out

    # ---------------------------------------------------------------- trust

    def pin_trust_root(self, data: bytes) -> TrustRoot:
        """Pin ``data`` as the trust root, or accept it as the pinned root's successor.

        The decision is ``edgefleet.trust.accept_root`` (first use pins a
        self-signed, unexpired root; the same root again is a no-op; any other
        root must be the version N+1 successor signed by both root-key
        thresholds); this method holds the lock and writes the file.

        Raises:
            MalformedTrustRootError: not a trust root.
            VerificationError: not self-signed, expired, or not a valid successor
                of the pinned root (the precise subclass, with both versions named).
            StorageError: writing it failed.
        """
        from edgefleet.trust import accept_root

        self._check_writable()
        with self._op_lock:
            try:
                current: TrustRoot | None = self.trust_root()
            except NoTrustRootError:
                current = None
            new = accept_root(current, data, self._clock())
            if new is not current:
                self._write_trust_root(new)
            return new

    def update_trust_root(self, chain: Sequence[bytes]) -> TrustRoot:
        """Walk a rotation chain (oldest first) from the pinned root and pin the newest.

        Raises:
            NoTrustRootError: nothing pinned yet.
            VerificationError: a link is rejected or the final root is expired.
            StorageError: writing failed.
        """
        from edgefleet.trust import accept_root_chain

        self._check_writable()
        with self._op_lock:
            new = accept_root_chain(self.trust_root(), chain, self._clock())
            if new.version != self.trust_root().version:
                self._write_trust_root(new)
            return new

    def _write_trust_root(self, root: TrustRoot) -> None:
        try:
            atomic_write(self._fs, self.layout.trust_root_file, root.to_bytes())
        except OSError as exc:
            raise _storage(exc, f"cannot write {self.layout.trust_root_file}") from exc
        self._trust = root

    # -------------------------------------------------------------- updates

    def install(
        self,
        source: BundleSource,
        *,
        update_id: str | None = None,
        source_name: str | None = None,
    ) -> InstallResult:
        """Install a bundle through the whole update machine.

        Returns the outcome: committed, rolled back (health check failed) or
        aborted (rejected by verification, storage failure); the active slot
        is untouched unless the outcome is ``committed``.

        Args:
            source: bundle file path, bytes, or a binary stream at its start.
            update_id: the server's id for this update (continues a download
                begun with ``begin_download``); generated when omitted.
            source_name: where the bundle came from, for the records.

        Raises:
            OSError: ``source`` is a path that cannot be opened (nothing changed).
            InvalidTransitionError: another update is in progress.
            NoTrustRootError: no trust root pinned (nothing changed).
            StorageError: ``state.json`` could not be written; the update
                resumes from the recovery table on the next call or start.
            AgentError: the agent is read-only.
        """
        self._check_writable()
        self.trust_root()
        uid = update_id or new_update_id()
        if not valid_update_id(uid):
            raise ValueError(f"update id {uid!r} must be letters, digits and ._:- (<= 128)")
        with contextlib.ExitStack() as stack:
            if isinstance(source, (str, Path)):
                name = source_name or str(source)
                bundle: IO[bytes] | bytes | bytearray | memoryview = stack.enter_context(
                    open(source, "rb")
                )
            else:
                in_memory = isinstance(source, (bytes, bytearray, memoryview))
                name = source_name or ("memory" if in_memory else "stream")
                bundle = source
            with self._op_lock:
                self._settle()
                self._bundle = bundle
                try:
                    self._drive(BeginInstall(uid, name))
                finally:
                    self._bundle = None
                return self._result(uid)

    def begin_download(self, update_id: str, source: str) -> None:
        """Record that the daemon starts downloading update ``update_id``.

        Raises:
            InvalidTransitionError: another update is in progress.
            StorageError: the state could not be stored.
        """
        self._check_writable()
        if not valid_update_id(update_id):
            raise ValueError(f"update id {update_id!r} is not valid")
        with self._op_lock:
            self._settle()
            self._drive(BeginDownload(update_id, source))

    def abort_download(self, update_id: str, error: BaseException) -> InstallResult:
        """End update ``update_id`` whose download failed; reports it as aborted.

        Raises:
            InvalidTransitionError: that update is not downloading.
            StorageError: the state could not be stored.
        """
        self._check_writable()
        with self._op_lock:
            upd = self._state.update
            if (
                self._state.state is not UpdateState.DOWNLOADING
                or upd is None
                or (upd.id != update_id)
            ):
                raise InvalidTransitionError(f"update {update_id} is not downloading")
            self._drive(DownloadFailed(ErrorInfo.from_exception(error)))
            return self._result(update_id)

    def rollback(self, *, update_id: str | None = None) -> InstallResult:
        """Point back at the previous committed model (re-checked and re-verified first).

        Raises:
            NothingToRollBackError: there is no previous model.
            InvalidTransitionError: an update is in progress.
            StorageError: the state could not be stored.
        """
        self._check_writable()
        uid = update_id or new_update_id("rollback")
        with self._op_lock:
            self._settle()
            self._drive(BeginRollback(uid))
            return self._result(uid)

    def recover(self) -> dict[str, Any]:
        """Finish or undo whatever update the persisted state is in (as at start-up).

        Raises:
            StorageError: a recovery step could not be stored.
        """
        self._check_writable()
        with self._op_lock:
            self._settle()
        return self.status()

    def _settle(self) -> None:
        """Finish an update interrupted in this process (e.g. by a storage error)."""
        state = self._state
        if state.state not in (UpdateState.IDLE, UpdateState.DOWNLOADING) or (
            self.serving != state.active
        ):
            self._drive(Boot())

    def _result(self, update_id: str) -> InstallResult:
        for event in reversed(self._state.history):
            if event.update_id == update_id:
                return InstallResult.from_event(event)
        raise AgentError(f"update {update_id} left no outcome (state {self._state.state.value})")

    def _check_writable(self) -> None:
        if self.readonly:
            raise AgentError("this agent was opened read-only")

    # ------------------------------------------------------------ the loop

    def _drive(self, event: Event) -> None:
        while True:
            next_event = self._perform(self._step(event))
            if next_event is None:
                return
            event = next_event

    def _step(self, event: Event) -> Action:
        tr = advance(self._state, event, now=format_utc(self._clock()), limits=self._limits)
        if tr.state is not self._state:
            self._store(tr.state)
        return tr.action

    def _store(self, new: AgentState) -> None:
        try:
            store_state(self._fs, self.layout.state_file, new)
        except OSError as exc:
            # The rename may have happened before the failure (the directory sync
            # failed): the file is the truth.
            with contextlib.suppress(OSError, EdgefleetError):
                self._state = load_state(self._fs, self.layout.state_file)
            if self._state == new:
                log.warning("state %s stored, but syncing it failed: %s", new.state.value, exc)
                return
            raise _storage(
                exc,
                f"cannot store state {new.state.value} in {self.layout.state_file}; "
                f"the update stays {self._state.state.value}",
            ) from exc
        self._state = new

    def _perform(self, action: Action) -> Event | None:
        if isinstance(action, Stop):
            return None
        if isinstance(action, VerifyInto):
            return self._verify_into(action.slot)
        if isinstance(action, Stage):
            try:
                stage_slot(self._fs, self.layout.slot_dir(action.staged.slot))
            except OSError as exc:
                return Failed(ErrorInfo.from_exception(_storage(exc, "staging the slot failed")))
            return Staged()
        if isinstance(action, CheckSlot):
            try:
                self._checked = check_slot(self._fs, self.layout, action.ref)
            except (EdgefleetError, OSError) as exc:
                return SlotChecked(_info(exc, "re-reading the staged slot failed"))
            return SlotChecked(None)
        if isinstance(action, HealthCheck):
            return self._health_check(action.ref)
        if isinstance(action, CheckTarget):
            return self._check_target(action.ref)
        if isinstance(action, Clean):
            try:
                clean_slot(self._fs, self.layout, action.slot)
            except OSError as exc:  # leftovers are harmless: the next install cleans again
                log.warning("cleaning slot %s failed: %s", action.slot, exc)
            return Cleaned()
        if isinstance(action, Report):
            self._report(action.event)
            return Reported()
        if isinstance(action, LoadActive):
            return self._load_active(action.ref)
        raise AssertionError(f"unknown action {action!r}")

    def _verify_into(self, slot: str) -> Event:
        from edgefleet.bundle import signatures_bytes
        from edgefleet.trust import verify_bundle

        source = self._bundle
        if source is None:
            return Failed(
                ErrorInfo.from_exception(
                    InterruptedUpdateError("the bundle is no longer available to verify")
                )
            )
        slot_dir = self.layout.slot_dir(slot)

        touched = False

        def touch() -> None:
            nonlocal touched
            action = self._step(PayloadStarting())
            assert isinstance(action, Continue), action
            touched = True
            clean_slot(self._fs, self.layout, slot)

        writer = SlotWriter(self._fs, slot_dir, on_first_begin=touch)
        try:
            verified = verify_bundle(
                source,
                trust_root=self.trust_root(),
                device=self.device_facts(),
                installed=self._state.rollback_floor,
                now=self._clock(),
                sink=writer,
                limits=self.options.verifier_limits,
            )
            writer.write_metadata(verified.manifest_bytes, signatures_bytes(verified.signatures))
        except (EdgefleetError, OSError) as exc:
            writer.discard()
            if touched:
                # Free the space now: on a full disk, recording the abort needs it.
                with contextlib.suppress(OSError):
                    clean_slot(self._fs, self.layout, slot)
            return Failed(_info(exc, f"writing slot {slot} failed"))
        m = verified.manifest
        return Verified(SlotRef(slot, m.name, m.version, verified.manifest_sha256))

    def _load(self, ref: SlotRef, contents: SlotContents | None = None) -> LoadedModel:
        """Check a slot and create its session.

        Raises SlotIntegrityError, ModelLoadError or OSError.
        """
        contents = contents or check_slot(self._fs, self.layout, ref)
        session = self._session_factory(contents.model_bytes, self.options.intra_op_threads)
        return LoadedModel.create(ref, contents.manifest, session)

    def _health_check(self, ref: SlotRef) -> Event:
        checked, self._checked = self._checked, None
        try:
            loaded = self._load(
                ref, checked if checked is not None and checked.ref == ref else None
            )
            run_health_check(
                loaded.session,
                loaded.manifest,
                runs=self.options.health_runs,
                latency_factor=self.options.latency_budget_factor,
            )
        except (EdgefleetError, OSError) as exc:
            return HealthChecked(_info(exc, "reading the slot failed"))
        self._candidate = loaded
        return HealthChecked(None)

    def _check_target(self, ref: SlotRef | None) -> Event:
        if ref is None:
            return TargetChecked(None)
        if self._serving is not None and self._serving.ref == ref:
            return TargetChecked(None)  # it is serving right now: proven
        try:
            contents = check_slot(self._fs, self.layout, ref)
            verify_slot_signatures(contents, self.trust_root())
            self._candidate = self._load(ref, contents)
        except (EdgefleetError, OSError) as exc:
            return TargetChecked(_info(exc, "reading the previous slot failed"))
        return TargetChecked(None)

    def _load_active(self, ref: SlotRef | None) -> Event:
        candidate, self._candidate = self._candidate, None
        if ref is None:
            self._serving = None
            return ActiveLoaded(None)
        if self._serving is not None and self._serving.ref == ref:
            return ActiveLoaded(None)
        try:
            model = candidate if candidate is not None and candidate.ref == ref else self._load(ref)
        except (EdgefleetError, OSError) as exc:
            return ActiveLoaded(_info(exc, "reading the active slot failed"))
        self._serving = model
        return ActiveLoaded(None)

    def _report(self, event: UpdateEvent) -> None:
        log.info(
            "update %s %s: %s",
            event.update_id,
            event.outcome,
            event.error.message if event.error else "ok",
        )
        sink = self._event_sink
        if sink is None:
            self._undelivered = [*self._undelivered, event][-HISTORY_LIMIT:]
            return
        self._deliver(sink, event)

    @staticmethod
    def _deliver(sink: EventSink, event: UpdateEvent) -> None:
        try:
            sink(event)
        except Exception:  # the sink is local (telemetry spool); never wedge the machine
            log.exception("event sink failed for update %s", event.update_id)

    # ------------------------------------------------------------ inference

    def predict(self, inputs: Mapping[str, np.ndarray] | np.ndarray) -> list[np.ndarray]:
        """Run the serving model; return its outputs in manifest order.

        Args:
            inputs: input name -> array, or one array for a single-input model.

        Raises:
            NoActiveModelError: no model is installed.
            InvalidInputError: the inputs do not fit the model (names, dtype, shape).
        """
        model = self._serving
        if model is None:
            raise NoActiveModelError(f"no model installed in {self.layout.root}")
        feed = inputs if type(inputs) is dict else self._feed(model, inputs)
        if not self._hooked:
            try:
                out: list[np.ndarray] = model.session.run(model.output_names, feed)
            except Exception as exc:
                raise _bad_input(model, exc) from exc
            return out
        return self._predict_hooked(model, feed, next(self._ids))

    def predict_with_id(
        self, inputs: Mapping[str, np.ndarray] | np.ndarray
    ) -> tuple[int, list[np.ndarray]]:
        """Like ``predict`` but also return the prediction id ``feedback`` refers to.

        Raises:
            NoActiveModelError: no model is installed.
            InvalidInputError: the inputs do not fit the model.
        """
        model = self._serving
        if model is None:
            raise NoActiveModelError(f"no model installed in {self.layout.root}")
        feed = inputs if type(inputs) is dict else self._feed(model, inputs)
        pid = next(self._ids)
        return pid, self._predict_hooked(model, feed, pid)

    def _predict_hooked(self, model: LoadedModel, feed: Any, pid: int) -> list[np.ndarray]:
        start = time.perf_counter()
        try:
            out: list[np.ndarray] = model.session.run(model.output_names, feed)
        except Exception as exc:
            raise _bad_input(model, exc) from exc
        elapsed = time.perf_counter() - start
        observer = self._observer
        if observer is not None:
            try:
                observer(feed, out, elapsed, pid)
            except Exception:  # telemetry must never break inference
                self.observer_errors += 1
        shadow = self._shadow
        if shadow is not None:
            shadow.submit(feed, out, elapsed, pid)
        return out

    @staticmethod
    def _feed(model: LoadedModel, inputs: Any) -> dict[str, Any]:
        if isinstance(inputs, Mapping):
            return dict(inputs)
        if model.single_input is None:
            raise InvalidInputError(
                f"{model.ref.model} has inputs {list(model.input_names)}: pass a dict"
            )
        return {model.single_input: inputs}

    def feedback(self, prediction_id: int, label: Any) -> None:
        """Record the ground truth of an earlier prediction.

        The label goes to the feedback sink (telemetry) and, while a shadow
        model runs, scores both models' top-1 answers.
        """
        self.feedback_count += 1
        sink = self._feedback_sink
        if sink is not None:
            sink(prediction_id, label)
        shadow = self._shadow
        if shadow is not None:
            shadow.feedback(prediction_id, label)

    # --------------------------------------------------------------- shadow

    def set_shadow(self, source: BundleSource) -> dict[str, Any]:
        """Evaluate another model beside the serving one, never serving its outputs.

        ``source`` is a bundle (path, bytes or stream), verified like an install
        into ``slots/shadow/`` (without the rollback check: a shadow never
        serves, so comparing against an older release is allowed), or the
        string ``"previous"`` for the committed model in the inactive slot.
        The shadow passes the same health check before it starts.

        Returns:
            The initial ``shadow_stats()``.

        Raises:
            VerificationError: the bundle is rejected or fails its health check.
            OutputSpecError: its inputs differ from the serving model's.
            NoActiveModelError: nothing serves to compare against.
            NothingToRollBackError: ``"previous"`` without a previous model.
            StorageError: writing the shadow slot failed.
        """
        self._check_writable()
        with self._op_lock:
            serving = self._serving
            if serving is None:
                raise NoActiveModelError("shadow mode needs a serving model to compare against")
            if isinstance(source, str) and source == "previous":
                ref = self._state.previous
                if ref is None:
                    raise NothingToRollBackError("no previous model to run as shadow")
                loaded = self._load(ref)
            else:
                loaded = self._stage_shadow(source)
            run_health_check(
                loaded.session,
                loaded.manifest,
                runs=self.options.health_runs,
                latency_factor=self.options.latency_budget_factor,
            )
            if not _compatible_inputs(loaded.manifest, serving.manifest):
                raise OutputSpecError(
                    f"shadow inputs {_describe_inputs(loaded.manifest)} differ from the serving "
                    f"model's {_describe_inputs(serving.manifest)}"
                )
            self.clear_shadow()
            self._shadow = ShadowRunner(
                loaded, self.options.shadow_queue, self.options.feedback_memory
            )
            self._refresh_hook()
            return self._shadow.stats()

    def _stage_shadow(self, source: BundleSource) -> LoadedModel:
        from edgefleet.bundle import signatures_bytes
        from edgefleet.trust import verify_bundle

        slot_dir = self.layout.slot_dir(SHADOW_SLOT)
        writer = SlotWriter(self._fs, slot_dir)
        with contextlib.ExitStack() as stack:
            bundle = (
                stack.enter_context(open(source, "rb"))
                if isinstance(source, (str, Path))
                else source
            )
            try:
                clean_slot(self._fs, self.layout, SHADOW_SLOT)
                verified = verify_bundle(
                    bundle,
                    trust_root=self.trust_root(),
                    device=self.device_facts(),
                    installed=None,
                    now=self._clock(),
                    sink=writer,
                    limits=self.options.verifier_limits,
                )
                writer.write_metadata(
                    verified.manifest_bytes, signatures_bytes(verified.signatures)
                )
                stage_slot(self._fs, slot_dir)
            except OSError as exc:
                writer.discard()
                raise _storage(exc, "writing the shadow slot failed") from exc
            except BaseException:
                writer.discard()
                raise
        m = verified.manifest
        ref = SlotRef(SHADOW_SLOT, m.name, m.version, verified.manifest_sha256)
        return self._load(ref)

    def clear_shadow(self) -> None:
        """Stop the shadow model (its slot stays on disk until the next one)."""
        shadow, self._shadow = self._shadow, None
        self._refresh_hook()
        if shadow is not None:
            shadow.close()

    def shadow_stats(self, *, wait: bool = False) -> dict[str, Any] | None:
        """Agreement and latency of the shadow vs the serving model (None without one).

        Args:
            wait: first let the worker finish the comparisons already queued.
        """
        shadow = self._shadow
        if shadow is None:
            return None
        if wait:
            shadow.drain()
        return shadow.stats()

    # ------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Stop the shadow worker and release the state directory."""
        self.clear_shadow()
        self._release()

    def abandon(self) -> None:
        """What the kernel does when the agent's process dies: drop the lock, stop threads.

        Nothing is written or cleaned up. ``firmware_sim`` calls this for a
        power cut or a crash before it constructs the next ``Agent`` (the reboot).
        """
        shadow, self._shadow = self._shadow, None
        if shadow is not None:
            shadow.close()
        self._release()

    def _release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _info(exc: BaseException, storage_what: str) -> ErrorInfo:
    if isinstance(exc, OSError):
        exc = _storage(exc, storage_what)
    return ErrorInfo.from_exception(exc)


def _compatible_inputs(a: Manifest, b: Manifest) -> bool:
    """Same input names and dtypes, same ranks, equal wherever both dimensions are fixed."""
    specs = {t.name: t for t in b.inputs}
    if sorted(specs) != sorted(t.name for t in a.inputs):
        return False
    for t in a.inputs:
        other = specs[t.name]
        if t.dtype != other.dtype or len(t.shape) != len(other.shape):
            return False
        for x, y in zip(t.shape, other.shape, strict=True):
            if isinstance(x, int) and isinstance(y, int) and x != y:
                return False
    return True


def _describe_inputs(m: Manifest) -> str:
    return ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in m.inputs)


def _bad_input(model: LoadedModel, exc: Exception) -> InvalidInputError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return InvalidInputError(
        f"inputs do not fit {model.ref.model} v{model.ref.version} "
        f"(expects {list(model.input_names)}): {text[:500]}"
    )
