"""onnxruntime on the device: sessions, the loaded model, and the device's facts.

Flow: verified model bytes -> ``make_session`` (CPU provider, bounded threads;
any onnxruntime failure becomes ``ModelLoadError``) -> ``LoadedModel``, which
pre-resolves everything the inference hot path needs (output names, the single
input's name, the bound ``run`` method) so ``Agent.predict`` does no lookups.

onnxruntime is imported inside functions only: importing this module (and so
``agent.cli``) stays cheap, and ``status`` never pays for it.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agent.errors import ModelLoadError
from agent.state import SlotRef
from edgefleet import __version__ as EDGEFLEET_VERSION
from edgefleet.manifest import DeviceFacts, Manifest

__all__ = [
    "AGENT_VERSION",
    "ORT_DTYPES",
    "LoadedModel",
    "Session",
    "SessionFactory",
    "device_facts",
    "make_session",
    "onnxruntime_version",
]

AGENT_VERSION = EDGEFLEET_VERSION

# onnxruntime's type strings -> the manifest's dtype names.
ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16",
    "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(bool)": "bool",
}  # fmt: skip


class Session(Protocol):
    """The part of ``onnxruntime.InferenceSession`` the agent uses."""

    def get_inputs(self) -> Sequence[Any]: ...

    def get_outputs(self) -> Sequence[Any]: ...

    def run(self, output_names: Any, input_feed: Any, run_options: Any = None) -> Any: ...


# (model bytes, intra-op threads) -> session; raises ModelLoadError.
SessionFactory = Callable[[bytes, int], Session]


def onnxruntime_version() -> str:
    """The installed onnxruntime release."""
    import onnxruntime

    return str(onnxruntime.__version__)


def device_facts(device_class: str) -> DeviceFacts:
    """What this device says about itself to the verifier (every field filled)."""
    from edgefleet.build import opset_supported_by

    ort_version = onnxruntime_version()
    return DeviceFacts(
        device_class=device_class,
        arch=platform.machine(),
        agent_version=AGENT_VERSION,
        onnxruntime_version=ort_version,
        max_opset=opset_supported_by(ort_version),
    )


def make_session(model_bytes: bytes, intra_op_threads: int) -> Session:
    """Create a CPU ``InferenceSession`` from model bytes.

    Raises:
        ModelLoadError: onnxruntime refused the model (invalid graph, unknown
            operator, unsupported opset, ...).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: warnings would flood a device's journal
    try:
        session = ort.InferenceSession(
            model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own hierarchy and RuntimeError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"onnxruntime cannot load the model: {first[:500]}") from exc
    return session


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model ready to serve: its slot, manifest and session, hot-path fields resolved."""

    ref: SlotRef
    manifest: Manifest
    session: Session
    output_names: list[str]
    input_names: tuple[str, ...]
    single_input: str | None  # the input's name when the model has exactly one

    @classmethod
    def create(cls, ref: SlotRef, manifest: Manifest, session: Session) -> LoadedModel:
        inputs = tuple(i.name for i in session.get_inputs())
        outputs = [o.name for o in session.get_outputs()]
        return cls(ref, manifest, session, outputs, inputs, inputs[0] if len(inputs) == 1 else None)
