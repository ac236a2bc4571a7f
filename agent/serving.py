"""Inference and feedback: the model answering ``predict`` and the per-prediction hooks.

Flow of a prediction: ``predict(inputs)`` -> the serving session's ``run``
with pre-resolved output names -> outputs. When an observer (telemetry's
buffer) or a shadow runner is attached it also times the call and hands
(inputs, outputs, seconds, prediction id) to them; binning and comparison
happen elsewhere. ``feedback(prediction_id, label)`` goes to the feedback sink
and to the shadow runner.

Invariants: the hot path takes no lock. The serving model is one attribute
(``model``) that the update runner replaces atomically, and ``predict`` reads
it once, so a swap mid-call is never seen half-done. An observer that raises
is counted (``observer_errors``), never passed to the caller.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.errors import InvalidInputError, NoActiveModelError
from agent.runtime import LoadedModel
from agent.state import SlotRef

if TYPE_CHECKING:  # agent.shadow (a thread, a queue, statistics) loads with the first shadow
    from agent.shadow import ShadowRunner

__all__ = ["FeedbackSink", "Observer", "Serving"]

_clock = time.perf_counter  # bound once: two calls per observed prediction

# observe(inputs, outputs, latency_s, prediction_id); must only append to a buffer.
Observer = Callable[[Mapping[str, np.ndarray], Sequence[np.ndarray], float, int], None]
FeedbackSink = Callable[[int, Any], None]  # (prediction_id, label)


class Serving:
    """The serving model, its observer, feedback sink and shadow runner.

    Args:
        where: names the agent in ``NoActiveModelError`` (its state directory).
        observer: called after each prediction (see ``Observer``).
        feedback: receives ``feedback(prediction_id, label)`` calls.
    """

    def __init__(
        self, where: str, *, observer: Observer | None, feedback: FeedbackSink | None
    ) -> None:
        self.model: LoadedModel | None = None
        self.shadow: ShadowRunner | None = None
        self.observer_errors = 0
        self.feedback_count = 0
        self._where = where
        self._observer = observer
        self._feedback_sink = feedback
        self._ids = itertools.count(1)
        self._hooked = False
        self._refresh_hook()

    @property
    def ref(self) -> SlotRef | None:
        """The slot answering ``predict`` now (None before the first install)."""
        model = self.model
        return None if model is None else model.ref

    def set_observer(self, observer: Observer | None) -> None:
        """Attach (or detach) the per-prediction observer."""
        self._observer = observer
        self._refresh_hook()

    def set_feedback_sink(self, feedback: FeedbackSink | None) -> None:
        """Attach (or detach) the receiver of ground-truth labels."""
        self._feedback_sink = feedback

    def set_shadow(self, shadow: ShadowRunner | None) -> ShadowRunner | None:
        """Attach (or detach) the shadow runner; returns the one it replaces (not closed)."""
        previous, self.shadow = self.shadow, shadow
        self._refresh_hook()
        return previous

    def _refresh_hook(self) -> None:
        self._hooked = self._observer is not None or self.shadow is not None

    def predict(self, inputs: Mapping[str, np.ndarray] | np.ndarray) -> list[np.ndarray]:
        """Run the serving model; return its outputs in manifest order.

        Raises:
            NoActiveModelError: no model is installed.
            InvalidInputError: the inputs do not fit the model (names, dtype, shape).
        """
        model = self.model
        if model is None:
            raise NoActiveModelError(f"no model installed in {self._where}")
        feed = inputs if type(inputs) is dict else _feed(model, inputs)
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
        model = self.model
        if model is None:
            raise NoActiveModelError(f"no model installed in {self._where}")
        feed = inputs if type(inputs) is dict else _feed(model, inputs)
        pid = next(self._ids)
        return pid, self._predict_hooked(model, feed, pid)

    def _predict_hooked(self, model: LoadedModel, feed: Any, pid: int) -> list[np.ndarray]:
        start = _clock()
        try:
            out: list[np.ndarray] = model.session.run(model.output_names, feed)
        except Exception as exc:
            raise _bad_input(model, exc) from exc
        elapsed = _clock() - start
        observer = self._observer
        if observer is not None:
            try:
                observer(feed, out, elapsed, pid)
            except Exception:  # telemetry must never break inference
                self.observer_errors += 1
        shadow = self.shadow
        if shadow is not None:
            shadow.submit(feed, out, elapsed, pid)
        return out

    def feedback(self, prediction_id: int, label: Any) -> None:
        """Record the ground truth of an earlier prediction.

        The label goes to the feedback sink (telemetry) and, while a shadow
        model runs, scores both models' top-1 answers.
        """
        self.feedback_count += 1
        sink = self._feedback_sink
        if sink is not None:
            sink(prediction_id, label)
        shadow = self.shadow
        if shadow is not None:
            shadow.feedback(prediction_id, label)


def _feed(model: LoadedModel, inputs: Any) -> dict[str, Any]:
    if isinstance(inputs, Mapping):
        return dict(inputs)
    if model.single_input is None:
        raise InvalidInputError(
            f"{model.ref.model} has inputs {list(model.input_names)}: pass a dict"
        )
    return {model.single_input: inputs}


def _bad_input(model: LoadedModel, exc: Exception) -> InvalidInputError:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return InvalidInputError(
        f"inputs do not fit {model.ref.model} v{model.ref.version} "
        f"(expects {list(model.input_names)}): {text[:500]}"
    )
