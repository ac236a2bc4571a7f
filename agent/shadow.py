"""Shadow mode: evaluate a candidate model beside the active one, off the hot path.

Flow: ``Agent.predict`` hands (inputs, active outputs, active latency,
prediction id) to ``ShadowRunner.submit``, which copies them into a bounded
queue and returns at once (a full queue drops the item and counts the drop).
One worker thread runs the shadow session on the same inputs, times it and
compares: top-1 agreement when the first output looks like class scores
(``[batch, classes]`` floats) or labels (integers), and the mean absolute
difference of the first output otherwise (and for scores too). The shadow's
outputs are never returned to a caller.

With ground truth (``Agent.feedback``) the runner also counts how often each
model's top-1 class was right, for the predictions it still remembers.

Staging (``stage_shadow_bundle``): a shadow bundle is verified like an
install, into ``slots/shadow/`` (without the rollback check: a shadow never
serves, so comparing against an older release is allowed); it must take the
serving model's inputs (``compatible_inputs``).

Guarantees: ``submit`` never blocks and never raises; a failing shadow run is
counted in ``errors``; ``close`` stops the worker.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from agent.errors import storage_error
from agent.fs import FileSystem
from agent.runtime import LoadedModel
from agent.slots import SHADOW_SLOT, SlotWriter, StateLayout, clean_slot, stage_slot
from agent.state import SlotRef
from edgefleet.manifest import DeviceFacts, Manifest

if TYPE_CHECKING:
    from edgefleet.trust import TrustRoot, VerifierLimits

__all__ = ["ShadowRunner", "compatible_inputs", "describe_inputs", "stage_shadow_bundle"]

_STOP = object()
_LATENCY_WINDOW = 1024  # latencies kept for the medians
_KINDS = {None: None, True: "classifier", False: "regression"}


def _labels(first: np.ndarray) -> np.ndarray | None:
    """Top-1 labels per row, or None when the output is not a classifier's."""
    if first.dtype.kind in "iub" and first.ndim >= 1:
        return first.reshape(first.shape[0], -1)[:, 0] if first.ndim > 1 else first
    if first.dtype.kind == "f" and first.ndim == 2 and first.shape[1] >= 2:
        return np.asarray(first.argmax(axis=1))
    return None


class ShadowRunner:
    """Runs one shadow model on a background thread and keeps comparison stats."""

    def __init__(self, model: LoadedModel, queue_size: int, remember: int) -> None:
        self.model = model
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._remember = remember
        self._seen = 0
        self._dropped = 0
        self._compared = 0
        self._errors = 0
        self._last_error: str | None = None
        self._rows = 0
        self._agree = 0
        self._classifier: bool | None = None
        self._abs_sum = 0.0
        self._abs_count = 0
        self._active_ms: collections.deque[float] = collections.deque(maxlen=_LATENCY_WINDOW)
        self._shadow_ms: collections.deque[float] = collections.deque(maxlen=_LATENCY_WINDOW)
        self._labels: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = (
            collections.OrderedDict()
        )
        self._labelled = 0
        self._active_right = 0
        self._shadow_right = 0
        self._thread = threading.Thread(target=self._work, name="edgefleet-shadow", daemon=True)
        self._thread.start()

    def submit(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[Any],
        latency_s: float,
        prediction_id: int,
    ) -> None:
        """Queue one comparison; drop it (counted) when the queue is full."""
        with self._lock:
            self._seen += 1
        # Copies: the caller may reuse its arrays once predict returns.
        item = (
            {k: np.array(v, copy=True) for k, v in inputs.items()},
            np.array(outputs[0], copy=True),
            latency_s,
            prediction_id,
        )
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            with self._lock:
                self._dropped += 1

    def _work(self) -> None:
        run = self.model.session.run
        names = self.model.output_names
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            feed, active_first, active_s, pid = item
            start = time.perf_counter()
            try:
                out = run(names, feed)
            except Exception as exc:  # the shadow must never disturb serving
                with self._lock:
                    self._errors += 1
                    self._last_error = f"{type(exc).__name__}: {str(exc)[:300]}"
                continue
            shadow_s = time.perf_counter() - start
            self._compare(active_first, np.asarray(out[0]), active_s, shadow_s, pid)

    def _compare(
        self, active: np.ndarray, shadow: np.ndarray, active_s: float, shadow_s: float, pid: int
    ) -> None:
        a_labels, s_labels = _labels(active), _labels(shadow)
        with self._lock:
            self._compared += 1
            self._active_ms.append(active_s * 1000.0)
            self._shadow_ms.append(shadow_s * 1000.0)
            if a_labels is not None and s_labels is not None and a_labels.shape == s_labels.shape:
                self._classifier = True
                self._rows += int(a_labels.size)
                self._agree += int((a_labels == s_labels).sum())
                if self._remember:
                    self._labels[pid] = (a_labels, s_labels)
                    while len(self._labels) > self._remember:
                        self._labels.popitem(last=False)
            elif self._classifier is None:
                self._classifier = False
            if active.shape == shadow.shape and active.dtype.kind in "fiub":
                diff = np.abs(active.astype(np.float64) - shadow.astype(np.float64))
                self._abs_sum += float(diff.sum())
                self._abs_count += int(diff.size)

    def feedback(self, prediction_id: int, label: Any) -> bool:
        """Score both models against a ground-truth label; False if the prediction is unknown."""
        with self._lock:
            pair = self._labels.pop(prediction_id, None)
            if pair is None:
                return False
            truth = np.asarray(label).reshape(-1)
            a_labels, s_labels = pair
            if truth.size not in (1, a_labels.size):
                return False
            self._labelled += int(a_labels.size)
            self._active_right += int((a_labels == truth).sum())
            self._shadow_right += int((s_labels == truth).sum())
            return True

    def stats(self) -> dict[str, Any]:
        """A JSON-ready snapshot of the comparison."""
        with self._lock:
            ref = self.model.ref
            out: dict[str, Any] = {
                "model": ref.model,
                "version": ref.version,
                "manifest_sha256": ref.manifest_sha256,
                "seen": self._seen,
                "compared": self._compared,
                "dropped": self._dropped,
                "pending": self._queue.qsize(),
                "errors": self._errors,
                "last_error": self._last_error,
                "kind": _KINDS[self._classifier],
                "top1_agreement": (self._agree / self._rows) if self._rows else None,
                "mean_abs_diff": (self._abs_sum / self._abs_count) if self._abs_count else None,
                "active_latency_ms_p50": (
                    statistics.median(self._active_ms) if self._active_ms else None
                ),
                "shadow_latency_ms_p50": (
                    statistics.median(self._shadow_ms) if self._shadow_ms else None
                ),
                "labelled": self._labelled,
                "active_accuracy": (
                    self._active_right / self._labelled if self._labelled else None
                ),
                "shadow_accuracy": (
                    self._shadow_right / self._labelled if self._labelled else None
                ),
            }
        return out

    def drain(self, timeout_s: float = 10.0) -> None:
        """Wait until every queued comparison has been processed (tests, status)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                done = self._compared + self._errors
            if done >= self._seen - self._dropped:
                return
            time.sleep(0.001)

    def close(self) -> None:
        """Stop the worker thread (pending comparisons are discarded)."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._queue.put(_STOP)
        self._thread.join(timeout=5.0)


def stage_shadow_bundle(
    source: Path | str | IO[bytes] | bytes | bytearray | memoryview,
    *,
    fs: FileSystem,
    layout: StateLayout,
    trust_root: TrustRoot,
    device: DeviceFacts,
    now: datetime,
    limits: VerifierLimits | None,
) -> SlotRef:
    """Verify a bundle into the shadow slot and stage it; returns the slot's reference.

    Raises:
        VerificationError: the bundle is rejected.
        StorageError: writing the shadow slot failed.
    """
    from edgefleet.bundle import signatures_bytes
    from edgefleet.trust import verify_bundle

    slot_dir = layout.slot_dir(SHADOW_SLOT)
    writer = SlotWriter(fs, slot_dir)
    with contextlib.ExitStack() as stack:
        bundle = (
            stack.enter_context(open(source, "rb")) if isinstance(source, (str, Path)) else source
        )
        try:
            clean_slot(fs, layout, SHADOW_SLOT)
            verified = verify_bundle(
                bundle,
                trust_root=trust_root,
                device=device,
                installed=None,
                now=now,
                sink=writer,
                limits=limits,
            )
            writer.write_metadata(verified.manifest_bytes, signatures_bytes(verified.signatures))
            stage_slot(fs, slot_dir)
        except OSError as exc:
            writer.discard()
            raise storage_error(exc, "writing the shadow slot failed") from exc
        except BaseException:
            writer.discard()
            raise
    m = verified.manifest
    return SlotRef(SHADOW_SLOT, m.name, m.version, verified.manifest_sha256)


def compatible_inputs(a: Manifest, b: Manifest) -> bool:
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


def describe_inputs(m: Manifest) -> str:
    """``name dtype[shape], ...`` for messages."""
    return ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in m.inputs)
