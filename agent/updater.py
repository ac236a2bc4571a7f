"""The update action runner: performs what the update machine (``agent.machine``) decides.

Flow: a request (``install``, ``begin_download``, ``abort_download``,
``rollback``, ``boot``) becomes the machine's first event -> ``advance``
answers with a new state and an action -> the state is stored atomically in
``state.json`` *before* the action runs -> the action (verify into the
inactive slot through ``verify_bundle`` with the pinned trust root, this
device's facts, the rollback floor and the clock; stage; re-check;
health-check; check the target; clean; report; load) gives the next event ->
... until the machine says ``Stop``. A crash at any point resumes from the
recovery table in ``agent.machine``: ``boot()`` drives its ``Boot`` event.

Invariants: a rejected bundle never touches the active slot (verification
writes only the inactive slot, through a ``SlotWriter``); a model replaces the
serving one (``Serving.model``) only after it passed its health check and the
machine said ``LoadActive``; every filesystem mutation goes through the
``FileSystem`` seam; ``OSError`` becomes ``StorageError`` here. Callers hold
the agent's operation lock around every method that drives the machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any

from agent.errors import (
    AgentError,
    InterruptedUpdateError,
    InvalidTransitionError,
    storage_error,
)
from agent.fs import FileSystem
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
)
from agent.options import AgentOptions
from agent.runtime import LoadedModel, SessionFactory
from agent.serving import Serving
from agent.slots import (
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
    UpdateOutcome,
    UpdateState,
    load_state,
    store_state,
)
from edgefleet.errors import EdgefleetError
from edgefleet.manifest import DeviceFacts
from edgefleet.timeutil import format_utc

if TYPE_CHECKING:  # the verifier and cryptography load on the first update, not at start-up
    from edgefleet.trust import TrustRoot

__all__ = ["BundleStream", "EventSink", "InstallResult", "Updater", "new_update_id"]

log = logging.getLogger("edgefleet.agent")

EventSink = Callable[[UpdateOutcome], None]
BundleStream = IO[bytes] | bytes | bytearray | memoryview


def new_update_id(prefix: str = "local") -> str:
    """A fresh update id for an update that did not come with one."""
    return f"{prefix}-{os.urandom(8).hex()}"


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
    def from_event(cls, event: UpdateOutcome) -> InstallResult:
        return cls(
            event.update_id,
            event.kind,
            event.outcome,
            event.model,
            event.version,
            event.active,
            event.error,
        )


class Updater:
    """Runs the update machine's actions on one state directory.

    Args:
        layout: the state directory's paths.
        options: bounded settings (verifier limits, health-check runs, limits).
        fs: the filesystem seam.
        clock: current UTC time.
        serving: whose ``model`` a committed update replaces.
        trust_root: the pinned trust root (raises ``NoTrustRootError``).
        device_facts: the facts bundles are matched against.
        session_factory: builds onnxruntime sessions.
        state: the state loaded from ``state.json``.
    """

    def __init__(
        self,
        layout: StateLayout,
        options: AgentOptions,
        *,
        fs: FileSystem,
        clock: Callable[[], datetime],
        serving: Serving,
        trust_root: Callable[[], TrustRoot],
        device_facts: Callable[[], DeviceFacts],
        session_factory: SessionFactory,
        state: AgentState,
        event_sink: EventSink | None = None,
    ) -> None:
        self.layout = layout
        self.options = options
        self.state = state
        self._fs = fs
        self._clock = clock
        self._serving = serving
        self._trust_root = trust_root
        self._device_facts = device_facts
        self._session_factory = session_factory
        self._limits = MachineLimits(options.max_trial_restarts, options.max_stores)
        self._event_sink = event_sink
        self._undelivered: list[UpdateOutcome] = []
        self._bundle: BundleStream | None = None
        self._checked: SlotContents | None = None
        self._candidate: LoadedModel | None = None

    # ------------------------------------------------------------- requests

    def boot(self) -> None:
        """Finish or undo whatever update the persisted state is in (the reboot)."""
        self._drive(Boot())

    def settle(self) -> None:
        """Finish an update interrupted in this process (e.g. by a storage error)."""
        state = self.state
        if state.state not in (UpdateState.IDLE, UpdateState.DOWNLOADING) or (
            self._serving.ref != state.active
        ):
            self._drive(Boot())

    def install(self, bundle: BundleStream, update_id: str, source_name: str) -> InstallResult:
        """Drive one install of ``bundle`` (a stream at its start, or bytes) to its outcome."""
        self.settle()
        self._bundle = bundle
        try:
            self._drive(BeginInstall(update_id, source_name))
        finally:
            self._bundle = None
        return self.result(update_id)

    def begin_download(self, update_id: str, source: str) -> None:
        """Record that update ``update_id`` starts downloading."""
        self.settle()
        self._drive(BeginDownload(update_id, source))

    def abort_download(self, update_id: str, error: BaseException) -> InstallResult:
        """End update ``update_id`` whose download failed.

        Raises:
            InvalidTransitionError: that update is not downloading.
        """
        upd = self.state.update
        if self.state.state is not UpdateState.DOWNLOADING or upd is None or upd.id != update_id:
            raise InvalidTransitionError(f"update {update_id} is not downloading")
        self._drive(DownloadFailed(ErrorInfo.from_exception(error)))
        return self.result(update_id)

    def rollback(self, update_id: str) -> InstallResult:
        """Point back at the previous committed model (re-checked and re-verified first)."""
        self.settle()
        self._drive(BeginRollback(update_id))
        return self.result(update_id)

    def result(self, update_id: str) -> InstallResult:
        """The recorded outcome of update ``update_id``."""
        for event in reversed(self.state.history):
            if event.update_id == update_id:
                return InstallResult.from_event(event)
        raise AgentError(f"update {update_id} left no outcome (state {self.state.state.value})")

    def load(self, ref: SlotRef, contents: SlotContents | None = None) -> LoadedModel:
        """Check a slot and create its session.

        Raises SlotIntegrityError, ModelLoadError or OSError.
        """
        contents = contents or check_slot(self._fs, self.layout, ref)
        session = self._session_factory(contents.model_bytes, self.options.intra_op_threads)
        return LoadedModel.create(ref, contents.manifest, session)

    # ---------------------------------------------------------------- sink

    def set_event_sink(self, sink: EventSink | None) -> None:
        """Attach (or detach) the receiver of update outcomes.

        Outcomes reported while no sink was attached (typically re-reports made
        by the recovery at start-up) are delivered to it first.
        """
        self._event_sink = sink
        if sink is not None:
            pending, self._undelivered = self._undelivered, []
            for event in pending:
                _deliver(sink, event)

    # ------------------------------------------------------------ the loop

    def _drive(self, event: Event) -> None:
        while True:
            next_event = self._perform(self._step(event))
            if next_event is None:
                return
            event = next_event

    def _step(self, event: Event) -> Action:
        tr = advance(self.state, event, now=format_utc(self._clock()), limits=self._limits)
        if tr.state is not self.state:
            self._store(tr.state)
        return tr.action

    def _store(self, new: AgentState) -> None:
        try:
            store_state(self._fs, self.layout.state_file, new)
        except OSError as exc:
            # The rename may have happened before the failure (the directory sync
            # failed): the file is the truth.
            with contextlib.suppress(OSError, EdgefleetError):
                self.state = load_state(self._fs, self.layout.state_file)
            if self.state == new:
                log.warning("state %s stored, but syncing it failed: %s", new.state.value, exc)
                return
            raise storage_error(
                exc,
                f"cannot store state {new.state.value} in {self.layout.state_file}; "
                f"the update stays {self.state.state.value}",
            ) from exc
        self.state = new

    def _perform(self, action: Action) -> Event | None:
        if isinstance(action, Stop):
            return None
        if isinstance(action, VerifyInto):
            return self._verify_into(action.slot)
        if isinstance(action, Stage):
            try:
                stage_slot(self._fs, self.layout.slot_dir(action.staged.slot))
            except OSError as exc:
                return Failed(
                    ErrorInfo.from_exception(storage_error(exc, "staging the slot failed"))
                )
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
                trust_root=self._trust_root(),
                device=self._device_facts(),
                installed=self.state.rollback_floor,
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

    def _health_check(self, ref: SlotRef) -> Event:
        checked, self._checked = self._checked, None
        try:
            loaded = self.load(ref, checked if checked is not None and checked.ref == ref else None)
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
        if self._serving.ref == ref:
            return TargetChecked(None)  # it is serving right now: proven
        try:
            contents = check_slot(self._fs, self.layout, ref)
            verify_slot_signatures(contents, self._trust_root())
            self._candidate = self.load(ref, contents)
        except (EdgefleetError, OSError) as exc:
            return TargetChecked(_info(exc, "reading the previous slot failed"))
        return TargetChecked(None)

    def _load_active(self, ref: SlotRef | None) -> Event:
        candidate, self._candidate = self._candidate, None
        if ref is None:
            self._serving.model = None
            return ActiveLoaded(None)
        if self._serving.ref == ref:
            return ActiveLoaded(None)
        try:
            model = candidate if candidate is not None and candidate.ref == ref else self.load(ref)
        except (EdgefleetError, OSError) as exc:
            return ActiveLoaded(_info(exc, "reading the active slot failed"))
        self._serving.model = model
        return ActiveLoaded(None)

    def _report(self, event: UpdateOutcome) -> None:
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
        _deliver(sink, event)


def _deliver(sink: EventSink, event: UpdateOutcome) -> None:
    try:
        sink(event)
    except Exception:  # the sink is local (telemetry spool); never wedge the machine
        log.exception("event sink failed for update %s", event.update_id)


def _info(exc: BaseException, storage_what: str) -> ErrorInfo:
    if isinstance(exc, OSError):
        exc = storage_error(exc, storage_what)
    return ErrorInfo.from_exception(exc)
