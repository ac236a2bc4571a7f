"""The device agent: one state directory's update runner, serving model and shadow.

``Agent`` composes three parts with one job each:

- ``agent.updater.Updater`` performs what the update machine
  (``agent.machine.advance``) decides: verify into the inactive slot, stage,
  re-check, health-check, report, load; every state change is one atomic
  store of ``state.json`` before the next action runs, so a crash at any point
  resumes from the machine's recovery table. Constructing an ``Agent`` on a
  state directory *is* the reboot: it takes the directory's lock and drives
  the ``Boot`` event.
- ``agent.serving.Serving`` answers ``predict`` (no lock on the hot path: the
  serving model is one attribute the updater replaces atomically) and routes
  feedback.
- ``agent.shadow`` stages and runs a shadow model beside the serving one.

This module holds what they share: the state directory's lock, the pinned
trust root (the decision is ``edgefleet.trust.accept_root``; this module
writes the file under the operation lock), the device facts and the status.

Invariants: a rejected bundle never touches the active slot; a model serves
only after it passed its health check (during the trial the previous model
keeps serving); every filesystem mutation goes through the ``FileSystem``
seam; ``OSError`` becomes ``StorageError`` at this boundary; every method that
drives the update machine holds ``_op_lock``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from agent.errors import (
    AgentBusyError,
    AgentError,
    NoActiveModelError,
    NothingToRollBackError,
    NoTrustRootError,
    OutputSpecError,
    storage_error,
)
from agent.fs import FileSystem, LockHandle, OsFileSystem, atomic_write, ensure_dir
from agent.health import run_health_check
from agent.machine import serving_ref
from agent.options import AgentOptions
from agent.runtime import (
    AGENT_VERSION,
    Session,
    SessionFactory,
    device_facts,
    make_session,
)
from agent.serving import FeedbackSink, Observer, Serving
from agent.slots import StateLayout
from agent.state import AgentState, SlotRef, load_state, valid_update_id
from agent.updater import BundleStream, EventSink, InstallResult, Updater, new_update_id
from edgefleet.manifest import DeviceFacts, Manifest
from edgefleet.timeutil import utcnow

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

BundleSource = Path | str | bytes | bytearray | memoryview | IO[bytes]


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
        self._facts = facts
        self._op_lock = threading.RLock()
        self._lock: LockHandle | None = None
        self._trust: TrustRoot | None = None
        self._serving = Serving(str(self.layout.root), observer=observer, feedback=feedback)
        # Bound once: the hot path pays no extra call for the composition.
        self.predict = self._serving.predict
        self.predict_with_id = self._serving.predict_with_id
        if not readonly:
            try:
                ensure_dir(self._fs, self.layout.root)
                self._lock = self._fs.lock(self.layout.lock_file)
            except BlockingIOError:
                raise AgentBusyError(
                    f"{self.layout.root} is in use by another agent process "
                    f"(lock {self.layout.lock_file})"
                ) from None
            except OSError as exc:
                raise storage_error(
                    exc, f"cannot prepare state directory {self.layout.root}"
                ) from exc
        try:
            if not readonly:
                ensure_dir(self._fs, self.layout.slots_dir)
            self._updater = Updater(
                self.layout,
                self.options,
                fs=self._fs,
                clock=self._clock,
                serving=self._serving,
                trust_root=self.trust_root,
                device_facts=self.device_facts,
                session_factory=session_factory or make_session,
                state=load_state(self._fs, self.layout.state_file),
                event_sink=event_sink,
            )
            if readonly:
                ref = serving_ref(self._updater.state)
                if ref is not None:
                    self._serving.model = self._updater.load(ref)
                return
            self._updater.boot()
        except OSError as exc:
            self._release()
            raise storage_error(exc, f"cannot prepare state directory {self.layout.root}") from exc
        except BaseException:
            self._release()  # as the kernel would if the process died here
            raise

    # ------------------------------------------------------------------ hooks

    def set_observer(self, observer: Observer | None) -> None:
        """Attach (or detach) the per-prediction observer."""
        self._serving.set_observer(observer)

    def set_feedback_sink(self, feedback: FeedbackSink | None) -> None:
        """Attach (or detach) the receiver of ground-truth labels."""
        self._serving.set_feedback_sink(feedback)

    def set_event_sink(self, sink: EventSink | None) -> None:
        """Attach (or detach) the receiver of update outcomes.

        Outcomes reported while no sink was attached (typically re-reports made
        by the recovery in the constructor) are delivered to it first.
        """
        self._updater.set_event_sink(sink)

    # ------------------------------------------------------------------ facts

    @property
    def state(self) -> AgentState:
        """The last persisted state."""
        return self._updater.state

    @property
    def serving(self) -> SlotRef | None:
        """The model answering ``predict`` now (None before the first install)."""
        return self._serving.ref

    @property
    def serving_session(self) -> Session | None:
        """The serving onnxruntime session (diagnostics, benchmarks).

        Running it directly bypasses the observer and the shadow model.
        """
        model = self._serving.model
        return None if model is None else model.session

    @property
    def serving_manifest(self) -> Manifest | None:
        """The verified manifest of the serving model (inputs, outputs, drift reference)."""
        model = self._serving.model
        return None if model is None else model.manifest

    @property
    def observer_errors(self) -> int:
        """Observer calls that raised (counted, never passed to the caller)."""
        return self._serving.observer_errors

    @property
    def feedback_count(self) -> int:
        """Labels received through ``feedback``."""
        return self._serving.feedback_count

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
            self.state,
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
            raise storage_error(exc, f"cannot write {self.layout.trust_root_file}") from exc
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
                bundle: BundleStream = stack.enter_context(open(source, "rb"))
            else:
                in_memory = isinstance(source, (bytes, bytearray, memoryview))
                name = source_name or ("memory" if in_memory else "stream")
                bundle = source
            with self._op_lock:
                return self._updater.install(bundle, uid, name)

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
            self._updater.begin_download(update_id, source)

    def abort_download(self, update_id: str, error: BaseException) -> InstallResult:
        """End update ``update_id`` whose download failed; reports it as aborted.

        Raises:
            InvalidTransitionError: that update is not downloading.
            StorageError: the state could not be stored.
        """
        self._check_writable()
        with self._op_lock:
            return self._updater.abort_download(update_id, error)

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
            return self._updater.rollback(uid)

    def recover(self) -> dict[str, Any]:
        """Finish or undo whatever update the persisted state is in (as at start-up).

        Raises:
            StorageError: a recovery step could not be stored.
        """
        self._check_writable()
        with self._op_lock:
            self._updater.settle()
        return self.status()

    def _check_writable(self) -> None:
        if self.readonly:
            raise AgentError("this agent was opened read-only")

    # ------------------------------------------------------------ inference
    # ``predict`` and ``predict_with_id`` are ``Serving``'s, bound in __init__.

    def feedback(self, prediction_id: int, label: Any) -> None:
        """Record the ground truth of an earlier prediction.

        The label goes to the feedback sink (telemetry) and, while a shadow
        model runs, scores both models' top-1 answers.
        """
        self._serving.feedback(prediction_id, label)

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
        from agent.shadow import (  # loaded with the first shadow, not at start-up
            ShadowRunner,
            compatible_inputs,
            describe_inputs,
            stage_shadow_bundle,
        )

        self._check_writable()
        with self._op_lock:
            serving = self._serving.model
            if serving is None:
                raise NoActiveModelError("shadow mode needs a serving model to compare against")
            if isinstance(source, str) and source == "previous":
                ref = self.state.previous
                if ref is None:
                    raise NothingToRollBackError("no previous model to run as shadow")
            else:
                ref = stage_shadow_bundle(
                    source,
                    fs=self._fs,
                    layout=self.layout,
                    trust_root=self.trust_root(),
                    device=self.device_facts(),
                    now=self._clock(),
                    limits=self.options.verifier_limits,
                )
            loaded = self._updater.load(ref)
            run_health_check(
                loaded.session,
                loaded.manifest,
                runs=self.options.health_runs,
                latency_factor=self.options.latency_budget_factor,
            )
            if not compatible_inputs(loaded.manifest, serving.manifest):
                raise OutputSpecError(
                    f"shadow inputs {describe_inputs(loaded.manifest)} differ from the serving "
                    f"model's {describe_inputs(serving.manifest)}"
                )
            self.clear_shadow()
            runner = ShadowRunner(loaded, self.options.shadow_queue, self.options.feedback_memory)
            self._serving.set_shadow(runner)
            return runner.stats()

    def clear_shadow(self) -> None:
        """Stop the shadow model (its slot stays on disk until the next one)."""
        shadow = self._serving.set_shadow(None)
        if shadow is not None:
            shadow.close()

    def shadow_stats(self, *, wait: bool = False) -> dict[str, Any] | None:
        """Agreement and latency of the shadow vs the serving model (None without one).

        Args:
            wait: first let the worker finish the comparisons already queued.
        """
        shadow = self._serving.shadow
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
        self.clear_shadow()
        self._release()

    def _release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
