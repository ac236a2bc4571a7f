"""The trial health check: does this model work *on this device*?

Flow: a loaded session + its manifest -> ``check_io`` (the session's inputs
and outputs match the manifest's ``io``: names, dtypes, fixed dimensions) ->
the manifest's golden inputs (base64 arrays decoded with numpy; zeros of the
declared shapes when the manifest has no health check) -> one warm-up run ->
output checks (count, dtype, shape vs ``io`` and vs the expected arrays; no NaN
or infinity; expected values within ``atol``/``rtol``) -> ``runs`` timed runs
whose median must fit the latency budget (times the device's factor).

Each failure raises the precise ``HealthCheckError`` child naming what
differs; the caller records it and rolls back. The check reads nothing from
disk and writes nothing.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.errors import (
    GoldenMismatchError,
    LatencyBudgetError,
    ModelRunError,
    NonFiniteOutputError,
    OutputSpecError,
)
from agent.runtime import ORT_DTYPES, Session
from edgefleet.manifest import Manifest, TensorSpec

__all__ = ["HealthReport", "check_io", "decode_array", "golden_inputs", "run_health_check"]


@dataclass(frozen=True)
class HealthReport:
    """What a passing health check measured."""

    golden: bool  # the manifest had golden inputs (else zeros were used)
    median_latency_ms: float
    budget_ms: float | None  # after the device factor; None without a health check
    max_abs_error: float  # largest |actual - expected| (0 without golden outputs)


def decode_array(spec: Mapping[str, Any]) -> np.ndarray:
    """Decode a manifest array ``{"dtype", "shape", "data_b64"}`` (little-endian)."""
    dtype = np.dtype(spec["dtype"]).newbyteorder("<")
    raw = base64.b64decode(spec["data_b64"])
    return np.frombuffer(raw, dtype=dtype).reshape(spec["shape"]).astype(dtype.newbyteorder("="))


def _dims_match(declared: Sequence[int | str], actual: Sequence[Any]) -> bool:
    if len(declared) != len(actual):
        return False
    return all(not isinstance(d, int) or not isinstance(a, int) or d == a
               for d, a in zip(declared, actual, strict=True))  # fmt: skip


def _check_side(kind: str, declared: Sequence[TensorSpec], args: Sequence[Any]) -> None:
    have = {a.name: a for a in args}
    want = [t.name for t in declared]
    if sorted(have) != sorted(want):
        raise OutputSpecError(f"model {kind} are {sorted(have)}, manifest declares {sorted(want)}")
    for spec in declared:
        arg = have[spec.name]
        dtype = ORT_DTYPES.get(arg.type, arg.type)
        if dtype != spec.dtype:
            raise OutputSpecError(
                f"{kind[:-1]} {spec.name!r} is {dtype} in the model, {spec.dtype} in the manifest"
            )
        shape = list(arg.shape) if arg.shape is not None else None
        if shape is not None and not _dims_match(spec.shape, shape):
            raise OutputSpecError(
                f"{kind[:-1]} {spec.name!r} has shape {shape} in the model, "
                f"{list(spec.shape)} in the manifest"
            )


def check_io(session: Session, manifest: Manifest) -> None:
    """The session's inputs and outputs must be the manifest's ``io``.

    Raises:
        OutputSpecError: names, element types or fixed dimensions differ.
    """
    _check_side("inputs", manifest.inputs, session.get_inputs())
    _check_side("outputs", manifest.outputs, session.get_outputs())


def golden_inputs(manifest: Manifest) -> tuple[dict[str, np.ndarray], bool]:
    """The health-check inputs, or zeros of the declared shapes (symbolic dims = 1).

    Returns:
        (feed, golden) where ``golden`` says whether the manifest supplied them.

    Raises:
        OutputSpecError: the golden inputs do not name exactly the model's inputs.
    """
    hc = manifest.health_check
    if hc:
        feed = {name: decode_array(spec) for name, spec in hc["inputs"].items()}
        want = sorted(t.name for t in manifest.inputs)
        if sorted(feed) != want:
            raise OutputSpecError(
                f"health-check inputs are {sorted(feed)}, the model's inputs are {want}"
            )
        return feed, True
    feed = {
        t.name: np.zeros([d if isinstance(d, int) else 1 for d in t.shape], dtype=t.dtype)
        for t in manifest.inputs
    }
    return feed, False


def _check_outputs(
    manifest: Manifest, outputs: Sequence[Any], expected: Mapping[str, np.ndarray]
) -> float:
    if len(outputs) != len(manifest.outputs):
        raise OutputSpecError(
            f"model returned {len(outputs)} outputs, manifest declares {len(manifest.outputs)}"
        )
    worst = 0.0
    for spec, value in zip(manifest.outputs, outputs, strict=True):
        if not isinstance(value, np.ndarray):
            raise OutputSpecError(f"output {spec.name!r} is not a tensor ({type(value).__name__})")
        if str(value.dtype) != spec.dtype:
            raise OutputSpecError(
                f"output {spec.name!r} is {value.dtype}, manifest declares {spec.dtype}"
            )
        if not _dims_match(spec.shape, value.shape):
            raise OutputSpecError(
                f"output {spec.name!r} has shape {list(value.shape)}, manifest declares "
                f"{list(spec.shape)}"
            )
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            bad = int(value.size - np.isfinite(value).sum())
            raise NonFiniteOutputError(
                f"output {spec.name!r} has {bad} NaN/infinite value(s) of {value.size}"
            )
        if spec.name in expected:
            want = expected[spec.name]
            if want.shape != value.shape:
                raise OutputSpecError(
                    f"output {spec.name!r} has shape {list(value.shape)}, the expected "
                    f"output has {list(want.shape)}"
                )
            diff = np.abs(value.astype(np.float64) - want.astype(np.float64))
            worst = max(worst, float(diff.max()) if diff.size else 0.0)
    return worst


def run_health_check(
    session: Session,
    manifest: Manifest,
    *,
    runs: int = 5,
    latency_factor: float = 1.0,
    clock: Callable[[], float] = time.perf_counter,
) -> HealthReport:
    """Run the manifest's health check against ``session``.

    Args:
        session: the candidate model's session.
        manifest: its verified manifest.
        runs: timed runs after the warm-up; their median is compared to the budget.
        latency_factor: multiplies ``latency_budget_ms`` (slower device classes).
        clock: seconds, monotonic (tests inject one).

    Returns:
        The measurements of a passing check.

    Raises:
        OutputSpecError: inputs/outputs differ from the manifest.
        ModelRunError: onnxruntime failed on the inputs.
        NonFiniteOutputError: NaN or infinity in an output.
        GoldenMismatchError: outputs differ from the expected ones beyond tolerance.
        LatencyBudgetError: the median latency is above the budget.
    """
    check_io(session, manifest)
    feed, golden = golden_inputs(manifest)
    hc = manifest.health_check
    expected = (
        {name: decode_array(spec) for name, spec in hc["expected_outputs"].items()} if hc else {}
    )
    unknown = sorted(set(expected) - {t.name for t in manifest.outputs})
    if unknown:
        raise OutputSpecError(f"health check expects outputs {unknown} the model does not have")
    names = [t.name for t in manifest.outputs]
    try:
        outputs = session.run(names, feed)
    except Exception as exc:  # onnxruntime's error hierarchy
        raise ModelRunError(f"onnxruntime failed on the health-check inputs: {exc}") from exc
    worst = _check_outputs(manifest, outputs, expected)
    if expected:
        tol = hc["tolerance"]
        for spec, value in zip(manifest.outputs, outputs, strict=True):
            want = expected.get(spec.name)
            if want is None:
                continue
            if not np.allclose(value, want, atol=tol["atol"], rtol=tol["rtol"], equal_nan=False):
                raise GoldenMismatchError(
                    f"output {spec.name!r} differs from the expected output: max |diff| "
                    f"{worst:.6g} beyond atol {tol['atol']} / rtol {tol['rtol']}"
                )
    times = []
    for _ in range(runs):
        start = clock()
        try:
            session.run(names, feed)
        except Exception as exc:
            raise ModelRunError(f"onnxruntime failed on a repeated run: {exc}") from exc
        times.append((clock() - start) * 1000.0)
    import statistics  # loaded for a health check, not at start-up

    median = statistics.median(times)
    budget = float(hc["latency_budget_ms"]) * latency_factor if hc else None
    if budget is not None and median > budget:
        raise LatencyBudgetError(
            f"median latency {median:.3f} ms over {runs} runs is above the budget of "
            f"{budget:.3f} ms"
        )
    return HealthReport(golden, median, budget, worst)
