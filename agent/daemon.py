"""The agent daemon: MQTT in, verified desired state, chunked download, install, telemetry out.

Flow (three threads besides paho's network loop, which only hands work over):

* network (``agent.mqtt``): chunk-data frames go straight to the active
  ``Downloader`` (``deliver`` checks and writes them); desired-state payloads
  and connection changes are queued for the control thread.
* control: verifies each desired state with the pinned trust root's
  *director* role (``edgefleet.trust.verify_desired_state``), against the
  highest version already accepted for that target, which is persisted in
  ``<state>/daemon/desired.json`` so a replay stays refused after a restart. A
  forged, tampered, replayed, expired or re-routed message is counted,
  reported as a ``desired-rejected`` event and otherwise ignored. The control
  thread also publishes status and facts on (re)connect and pumps spooled
  telemetry to the broker.
* worker: applies the *effective* desired state: the device's own one if any,
  else the first configured group (in ``device.groups`` order) that has one.
  It downloads the bundle over chunks (resumable, see ``agent.download``),
  hands the sha256-verified file to the core's ``install`` (which verifies the
  bundle's release signatures, stages, health-checks and commits or rolls
  back), then starts or clears the shadow model. A newer desired state
  preempts a running download. The outcome per target version is persisted,
  so a retained re-delivery after a restart does not redo finished work, and
  an update interrupted by a crash is resumed (the download from its bitmap).

Invariants: nothing acts on a desired state before its director signatures
verified; only the core writes slots; every failure ends as an event with a
reason on the status topic and in the next telemetry record; the process keeps
serving predictions whatever the network or the disk does.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from agent.config import AgentConfig
from agent.download import (
    DownloadCancelledError,
    Downloader,
    MqttChunkTransport,
    NetworkFaults,
    cleanup_downloads,
)
from agent.mqtt import MqttConnection, MqttError, Will
from agent.telemetry import Spool, TelemetryPublisher, TelemetryRecorder
from edgefleet import canonical
from edgefleet.errors import EdgefleetError, TransportError, VerificationError
from edgefleet.fsutil import atomic_write_bytes
from edgefleet.manifest import DeviceFacts, Manifest
from edgefleet.timeutil import utcnow
from edgefleet.topics import DeviceChannel, DeviceTopic, GroupTopic, TopicError, parse
from edgefleet.trust import TrustRoot, verify_desired_state
from edgefleet.wire import (
    BundleRef,
    DesiredState,
    DeviceFactsMessage,
    ModelRef,
    StatusMessage,
    UpdateEvent,
)

__all__ = ["AgentCore", "Daemon", "DesiredBook"]

log = logging.getLogger(__name__)

FINAL_OUTCOMES = ("committed", "serving", "rolled-back", "aborted", "failed")
RETRY_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # seconds between download attempts


class AgentCore(Protocol):
    """What the daemon uses of ``agent.core.Agent``."""

    @property
    def serving(self) -> Any: ...

    def trust_root(self) -> TrustRoot: ...

    def pin_trust_root(self, data: bytes) -> TrustRoot: ...

    def has_trust_root(self) -> bool: ...

    @property
    def serving_manifest(self) -> Manifest | None: ...

    def device_facts(self) -> DeviceFacts: ...

    def begin_download(self, update_id: str, source: str) -> None: ...

    def abort_download(self, update_id: str, error: BaseException) -> Any: ...

    def install(
        self, source: Any, *, update_id: str | None = None, source_name: str | None = None
    ) -> Any: ...

    def set_shadow(self, source: Any) -> dict[str, Any]: ...

    def clear_shadow(self) -> None: ...

    def shadow_stats(self, *, wait: bool = False) -> dict[str, Any] | None: ...

    def status(self) -> dict[str, Any]: ...

    def set_observer(self, observer: Any) -> None: ...

    def set_feedback_sink(self, feedback: Any) -> None: ...

    def set_event_sink(self, sink: Any) -> None: ...


@dataclass
class _Target:
    version: int
    sha256: str


@dataclass
class _Applied:
    version: int
    outcome: str
    reason: str | None = None
    shadow: str | None = None  # the shadow bundle id started for this version


class DesiredBook:
    """Per-target accepted versions and applied outcomes, persisted atomically.

    ``desired.json``: ``{"accepted": {KEY: {"version", "sha256"}},
    "applied": {KEY: {"version", "outcome", "reason", "shadow"}}}`` where KEY
    is ``device:ID`` or ``group:NAME``. Accepted versions only grow.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.accepted: dict[str, _Target] = {}
        self.applied: dict[str, _Applied] = {}
        try:
            doc = canonical.decode_strict(self.path.read_bytes())
            for key, t in doc.get("accepted", {}).items():
                self.accepted[str(key)] = _Target(int(t["version"]), str(t["sha256"]))
            for key, a in doc.get("applied", {}).items():
                self.applied[str(key)] = _Applied(
                    int(a["version"]), str(a["outcome"]), a.get("reason"), a.get("shadow")
                )
        except FileNotFoundError:
            pass
        except (canonical.CanonicalError, KeyError, TypeError, ValueError, AttributeError) as exc:
            # Refusing to start would brick the device; the retained desired states
            # are re-verified anyway. The replay floor restarts from what arrives.
            log.error("daemon: %s is unreadable (%s); starting with an empty book", self.path, exc)

    def floor(self, key: str) -> int:
        t = self.accepted.get(key)
        return 0 if t is None else t.version

    def save(self) -> None:
        """Persist (atomic write; ``OSError`` on failure)."""
        doc = {
            "accepted": {
                k: {"version": t.version, "sha256": t.sha256} for k, t in self.accepted.items()
            },
            "applied": {
                k: {
                    "version": a.version,
                    "outcome": a.outcome,
                    "reason": a.reason,
                    "shadow": a.shadow,
                }
                for k, a in self.applied.items()
            },
        }
        atomic_write_bytes(self.path, canonical.encode(doc), mode=0o600)


def _key_of(topic: DeviceTopic | GroupTopic) -> str:
    if isinstance(topic, GroupTopic):
        return f"group:{topic.group}"
    return f"device:{topic.device_id}"


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1024]


def _ram_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


class Daemon:
    """Wires the MQTT connection, the desired-state logic, downloads, the core and telemetry."""

    def __init__(
        self,
        config: AgentConfig,
        core: AgentCore,
        *,
        faults: NetworkFaults | None = None,
        clock: Callable[[], datetime] = utcnow,
        on_event: Callable[[UpdateEvent], None] | None = None,
    ) -> None:
        """Prepare everything (nothing connects until ``start``).

        Raises:
            ConfigError: the broker password file is unreadable or unsafe.
            VerificationError: ``device.trust_root`` cannot be pinned (first start).
            OSError: the daemon directory cannot be created.
        """
        self.config = config
        self.core = core
        self.faults = faults
        self._clock = clock
        self._on_event = on_event
        self.device_id = config.device.id
        self.dir = config.daemon_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        if config.device.trust_root is not None and not core.has_trust_root():
            # First start only: later roots arrive as successors (the pinned one may
            # already be newer than the file the configuration names).
            core.pin_trust_root(config.device.trust_root.read_bytes())
        self.book = DesiredBook(self.dir / "desired.json")
        self._states: dict[str, DesiredState] = {}
        self._priority = [f"device:{self.device_id}"] + [f"group:{g}" for g in config.device.groups]
        self._status_topic = str(DeviceTopic.status(self.device_id))
        self._started = time.time()
        offline = StatusMessage(self.device_id, "offline", round(self._started, 3))
        self.conn = MqttConnection(
            config.mqtt_options(will=Will(self._status_topic, offline.to_bytes())),
            on_message=self._on_message,
            on_connect=self._on_connect,
        )
        self.conn.subscribe(str(DeviceTopic.desired(self.device_id)), qos=1)
        self.conn.subscribe(str(DeviceTopic.chunk_data(self.device_id)), qos=1)
        for group in config.device.groups:
            self.conn.subscribe(str(GroupTopic(group)), qos=1)
        self.transport = MqttChunkTransport(self.conn, self.device_id)
        self.spool = Spool(
            self.dir / "telemetry",
            max_records=config.telemetry.spool_max_records,
            max_bytes=config.telemetry.spool_max_bytes,
        )
        self.recorder = TelemetryRecorder(
            self.device_id,
            self.spool,
            config.telemetry_options(),
            shadow_stats=core.shadow_stats,
        )
        self.publisher = TelemetryPublisher(
            self.spool, self.conn, str(DeviceTopic.telemetry(self.device_id))
        )
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=256)
        self._wake = threading.Condition()
        self._dirty = True
        self._interrupt = threading.Event()
        self._stopping = threading.Event()
        self._download: Downloader | None = None
        self._threads: list[threading.Thread] = []
        self._last_event: UpdateEvent | None = None
        self._serving_seen: tuple[str, int] | None = None
        self.counters = {"desired_rejected": 0, "desired_accepted": 0, "inbox_dropped": 0}

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Attach to the core, start telemetry, connect, and start the worker threads."""
        self.core.set_observer(self.recorder.observe)
        self.core.set_feedback_sink(self.recorder.feedback)
        self.core.set_event_sink(self.core_event)
        self._refresh_model()
        self.recorder.start()
        for name, target in (("control", self._control_loop), ("worker", self._worker_loop)):
            thread = threading.Thread(target=target, name=f"edgefleet-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self.conn.start()

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """Stop threads, flush telemetry to the spool, publish ``offline`` and disconnect."""
        self._stopping.set()
        self._interrupt.set()
        with self._wake:
            self._wake.notify_all()
        for thread in self._threads:
            thread.join(timeout_s)
        self._threads.clear()
        self.recorder.stop(flush=True)
        self.publisher.pump()
        if self.conn.connected:
            offline = StatusMessage(
                self.device_id, "offline", round(time.time(), 3), **self._status_fields()
            )
            with contextlib.suppress(MqttError):
                self.conn.publish(self._status_topic, offline.to_bytes(), qos=1, retain=True)
        deadline = time.monotonic() + min(timeout_s, 3.0)
        while self.conn.connected and self.conn.pending_acks() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.conn.stop(timeout_s=timeout_s)
        self.core.set_observer(None)
        self.core.set_feedback_sink(None)
        self.core.set_event_sink(None)

    def run_forever(self, stop: threading.Event) -> None:
        """``start``, block until ``stop`` is set, then ``stop``."""
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()

    # ------------------------------------------------------------ MQTT intake

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """Network thread: chunk frames to the downloader, the rest to the control queue."""
        try:
            parsed = parse(topic)
        except TopicError:
            return
        if isinstance(parsed, DeviceTopic) and parsed.channel is DeviceChannel.CHUNK_DATA:
            download = self._download
            if download is not None:
                download.deliver(payload)
            return
        if isinstance(parsed, GroupTopic) or parsed.channel is DeviceChannel.DESIRED:
            self._enqueue(("desired", (parsed, payload)))

    def _on_connect(self, session_present: bool) -> None:
        self._enqueue(("connected", session_present))

    def _enqueue(self, item: tuple[str, Any]) -> None:
        try:
            self._inbox.put_nowait(item)
        except queue.Full:
            self.counters["inbox_dropped"] += 1

    # ---------------------------------------------------------- control thread

    def _control_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                kind, value = self._inbox.get(timeout=0.25)
            except queue.Empty:
                kind, value = "tick", None
            try:
                if kind == "desired":
                    self._handle_desired(*value)
                elif kind == "connected":
                    self._publish_status()
                    self._publish_facts()
                self.publisher.pump()
            except Exception:  # the control loop must survive anything
                log.exception("daemon: control step %s failed", kind)

    def _handle_desired(self, topic: DeviceTopic | GroupTopic, payload: bytes) -> None:
        key = _key_of(topic)
        if not payload:
            log.info(
                "daemon: retained desired state for %s was cleared; keeping the current one", key
            )
            return
        digest = hashlib.sha256(payload).hexdigest()
        known = self.book.accepted.get(key)
        redelivery = known is not None and known.sha256 == digest
        if redelivery and key in self._states:
            return  # the retained copy again (reconnect): nothing new
        floor = self.book.floor(key) - (1 if redelivery else 0)
        try:
            state = verify_desired_state(
                payload,
                trust_root=self.core.trust_root(),
                now=self._clock(),
                topic=topic,
                device_id=self.device_id,
                groups=self.config.device.groups,
                floor=floor,
            )
        except EdgefleetError as exc:  # VerificationError, or no trust root pinned
            self.counters["desired_rejected"] += 1
            log.warning("daemon: desired state on %s rejected: %s", topic, exc)
            self._event("desired-rejected", reason=_reason(exc))
            return
        before = self.effective()
        self._states[key] = state
        if not redelivery:
            self.book.accepted[key] = _Target(state.version, digest)
            self._save_book()
            self.counters["desired_accepted"] += 1
            self._event("desired-accepted", desired_version=state.version, model=state.model)
        self._reschedule(preempt=self.effective() != before)

    def _save_book(self) -> None:
        try:
            self.book.save()
        except OSError as exc:
            log.error("daemon: cannot persist %s: %s", self.book.path, exc)

    def effective(self) -> tuple[str, DesiredState] | None:
        """The desired state to apply: the device's own, else the first group's."""
        for key in self._priority:
            state = self._states.get(key)
            if state is not None:
                return key, state
        return None

    def _reschedule(self, *, preempt: bool) -> None:
        with self._wake:
            self._dirty = True
            if preempt:
                self._interrupt.set()  # stop a download for a superseded desired state
            self._wake.notify_all()

    # ----------------------------------------------------------- worker thread

    def _worker_loop(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            with self._wake:
                if not self._dirty:
                    self._wake.wait(timeout=1.0)
                self._dirty = False
                self._interrupt.clear()
            if self._stopping.is_set():
                return
            chosen = self.effective()
            if chosen is None:
                continue
            key, state = chosen
            done = self.book.applied.get(key)
            if (
                done is not None
                and done.version == state.version
                and done.outcome in FINAL_OUTCOMES
            ):
                continue
            try:
                self._apply(key, state)
                failures = 0
            except Exception as exc:  # keep the worker alive; retry with a growing delay
                log.exception("daemon: applying %s v%d failed", key, state.version)
                self._event(
                    "install-failed",
                    desired_version=state.version,
                    model=state.model,
                    reason=_reason(exc),
                )
                delay = RETRY_BACKOFF_S[min(failures, len(RETRY_BACKOFF_S) - 1)]
                failures += 1
                self._interrupt.wait(delay)

    def _apply(self, key: str, state: DesiredState) -> None:
        uid = f"{key}:v{state.version}"
        serving = self.core.serving
        if serving is not None and (serving.model, serving.version) == (
            state.model.name,
            state.model.version,
        ):
            outcome, reason = "serving", None
        else:
            path = self._fetch(state, state.bundle, uid, primary=True)
            if path is None:
                return  # preempted or stopping: decided again by the loop
            if isinstance(path, BaseException):
                outcome, reason = "failed", _reason(path)
            else:
                self._event("install-started", desired_version=state.version, model=state.model)
                result = self.core.install(
                    path, update_id=uid, source_name=f"mqtt:{state.bundle.id}"
                )
                outcome = str(result.outcome)
                reason = (
                    None
                    if result.error is None
                    else f"{result.error.error}: {result.error.message}"
                )
                self._refresh_model()
        shadow_id = self._apply_shadow(state, uid)
        if shadow_id == "preempted":
            return
        self.book.applied[key] = _Applied(state.version, outcome, reason, shadow_id)
        self._save_book()
        cleanup_downloads(self.dir, keep=set())
        self._publish_status()

    def _apply_shadow(self, state: DesiredState, uid: str) -> str | None:
        if state.shadow is None:
            if self.core.shadow_stats() is not None:
                self.core.clear_shadow()
                self._event("shadow-stopped", desired_version=state.version)
            return None
        path = self._fetch(state, state.shadow.bundle, uid, primary=False)
        if path is None:
            return "preempted"
        if isinstance(path, BaseException):
            self._event("shadow-failed", desired_version=state.version, model=state.shadow.model,
                        reason=_reason(path))  # fmt: skip
            return None
        try:
            self.core.set_shadow(path)
        except EdgefleetError as exc:
            self._event("shadow-failed", desired_version=state.version, model=state.shadow.model,
                        reason=_reason(exc))  # fmt: skip
            return None
        self._event("shadow-started", desired_version=state.version, model=state.shadow.model)
        return state.shadow.bundle.id

    def _fetch(
        self, state: DesiredState, bundle: BundleRef, uid: str, *, primary: bool
    ) -> Path | BaseException | None:
        """Download ``bundle``.

        Returns:
            The verified file's path; the content error that condemns the
            bundle; or ``None`` when preempted or stopping.
        """
        model = state.model if primary else (state.shadow.model if state.shadow else None)
        if primary and not self._begin(uid, bundle):
            return None
        self._event("download-started", desired_version=state.version, model=model)
        attempt = 0
        while True:
            try:
                downloader = Downloader(
                    self.dir,
                    bundle,
                    self.transport,
                    self.config.download_options(),
                    faults=self.faults,
                )
            except EdgefleetError as exc:  # oversized declaration, or no disk
                if isinstance(exc, VerificationError):
                    return self._download_failed(state, uid, exc, primary, model)
                if not self._backoff(attempt, state, exc, model):
                    return None
                attempt += 1
                continue
            self._download = downloader
            try:
                path = downloader.run(stop=self._interrupt)
            except DownloadCancelledError:
                if primary and not self._stopping.is_set():
                    with contextlib.suppress(EdgefleetError):
                        self.core.abort_download(uid, DownloadCancelledError("superseded"))
                return None
            except VerificationError as exc:
                return self._download_failed(state, uid, exc, primary, model)
            except TransportError as exc:
                if not self._backoff(attempt, state, exc, model):
                    return None
                attempt += 1
                continue
            finally:
                self._download = None
                downloader.close()
            self._event("download-complete", desired_version=state.version, model=model)
            return path

    def _begin(self, uid: str, bundle: BundleRef) -> bool:
        """Tell the core a download starts; wait while it is busy. False if interrupted."""
        while True:
            try:
                self.core.begin_download(uid, f"mqtt:{bundle.id}")
                return True
            except EdgefleetError as exc:
                log.info("daemon: core not ready for %s: %s", uid, exc)
                if self._interrupt.wait(2.0):
                    return False

    def _download_failed(
        self,
        state: DesiredState,
        uid: str,
        exc: VerificationError,
        primary: bool,
        model: ModelRef | None,
    ) -> BaseException:
        self._event(
            "download-failed", desired_version=state.version, model=model, reason=_reason(exc)
        )
        if primary:
            with contextlib.suppress(EdgefleetError):
                self.core.abort_download(uid, exc)
        return exc

    def _backoff(
        self, attempt: int, state: DesiredState, exc: BaseException, model: ModelRef | None
    ) -> bool:
        """Report a transport failure and wait before the next attempt; False if interrupted."""
        self._event(
            "download-retry", desired_version=state.version, model=model, reason=_reason(exc)
        )
        delay = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
        return not self._interrupt.wait(delay)

    # ------------------------------------------------------- status and events

    def core_event(self, ev: Any) -> None:
        """Report one of the core's update outcomes (installs, rollbacks, recovery).

        The daemon is the core's event sink once started; outcomes the core
        produced earlier (its recovery when it was opened) are handed over
        with this method by whoever opened it (``agent run`` does).
        """
        reason = None
        if getattr(ev, "error", None) is not None:
            reason = f"{ev.error.error}: {ev.error.message}"
        model = None
        with contextlib.suppress(Exception):
            if ev.model is not None and ev.version is not None:
                model = ModelRef(ev.model, ev.version)
        desired = self.effective()
        self._event(
            str(ev.outcome),
            desired_version=desired[1].version if desired else None,
            model=model,
            reason=reason,
        )
        self._refresh_model()
        self._publish_status()

    def _event(
        self,
        kind: str,
        *,
        desired_version: int | None = None,
        model: ModelRef | None = None,
        reason: str | None = None,
    ) -> None:
        ev = self.recorder.event(kind, desired_version=desired_version, model=model, reason=reason)
        self._last_event = ev
        log.info("daemon: %s v%s %s %s", kind, desired_version, model, reason or "")
        if self._on_event is not None:
            with contextlib.suppress(Exception):
                self._on_event(ev)
        if kind not in ("download-started", "download-complete", "install-started"):
            self._publish_status()

    def _refresh_model(self) -> None:
        serving = self.core.serving
        current = None if serving is None else (serving.model, serving.version)
        if current == self._serving_seen:
            return
        self._serving_seen = current
        manifest = self.core.serving_manifest
        ref = None if serving is None else ModelRef(serving.model, serving.version)
        drift = None if manifest is None else manifest.drift_reference
        self.recorder.set_model(ref, drift)

    def _status_fields(self) -> dict[str, Any]:
        serving = self.core.serving
        desired = self.effective()
        return {
            "agent_version": self.core.device_facts().agent_version,
            "model": None if serving is None else ModelRef(serving.model, serving.version),
            "desired_version": desired[1].version if desired else None,
            "update": self._last_event,
        }

    def _publish_status(self) -> None:
        msg = StatusMessage(
            self.device_id, "online", round(time.time(), 3), **self._status_fields()
        )
        try:
            self.conn.publish(self._status_topic, msg.to_bytes(), qos=1, retain=True)
        except MqttError as exc:
            log.info("daemon: status not published: %s", exc)

    def facts(self) -> DeviceFactsMessage:
        """This device's facts message."""
        f = self.core.device_facts()
        return DeviceFactsMessage(
            device_id=self.device_id,
            device_class=f.device_class or self.config.device.device_class,
            arch=f.arch or platform.machine(),
            ram_bytes=_ram_bytes(),
            cpu_count=os.cpu_count(),
            onnxruntime_version=f.onnxruntime_version,
            agent_version=f.agent_version or "0",
            max_opset=f.max_opset,
            python_version=platform.python_version(),
            os=f"{platform.system()} {platform.release()}"[:128],
        )

    def _publish_facts(self) -> None:
        try:
            self.conn.publish(
                str(DeviceTopic.facts(self.device_id)), self.facts().to_bytes(), qos=1, retain=True
            )
        except MqttError as exc:
            log.info("daemon: facts not published: %s", exc)

    def status(self) -> dict[str, Any]:
        """JSON-ready status of the daemon (for ``run --json`` and the HTTP endpoint)."""
        desired = self.effective()
        download = self._download
        progress = None if download is None else download.progress()
        return {
            "device_id": self.device_id,
            "connected": self.conn.connected,
            "broker_error": None if self.conn.last_error is None else str(self.conn.last_error),
            "desired": None
            if desired is None
            else {
                "target": desired[0],
                "version": desired[1].version,
                "model": desired[1].model.to_dict(),
            },
            "download": None if progress is None else {"blocks": progress[0], "total": progress[1]},
            "telemetry": {
                "spooled": len(self.spool),
                "written": self.recorder.records_written,
                "lost": self.recorder.records_lost,
                "acked": self.publisher.acked,
            },
            "counters": dict(self.counters),
            "last_event": None if self._last_event is None else self._last_event.to_dict(),
        }
