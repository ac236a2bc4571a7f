"""Errors the device agent raises, placed in edgefleet's two families.

* Bad content (``VerificationError`` children): besides the verifier's own
  errors, a model that passes signature and hash checks can still be refused
  on the device: ``ModelLoadError`` (shared with compression: onnxruntime
  does not load it), ``HealthCheckError`` and its children (its outputs are
  the wrong shape, NaN, wrong, or too slow) and
  ``SlotIntegrityError`` (the files in a slot no longer match their manifest).
  Retrying the same bytes on the same device cannot succeed.
* Operational problems of the agent itself (``AgentError`` children: no trust
  root pinned, state directory corrupt or locked, no model installed) and
  ``StorageError`` (a ``TransportError``: the disk failed while writing; the
  content was not judged and retrying may succeed).

``OSError`` from the filesystem is converted to ``StorageError`` at the
agent's boundary with ``raise ... from``. Codes 40-48 extend the verification
range and 50-59 are the agent's own; the CLI uses them as exit status.
"""

from __future__ import annotations

from edgefleet.errors import EdgefleetError, ModelLoadError, TransportError, VerificationError

__all__ = [
    "AgentBusyError",
    "AgentError",
    "GoldenMismatchError",
    "HealthCheckError",
    "InterruptedUpdateError",
    "InvalidInputError",
    "InvalidTransitionError",
    "LatencyBudgetError",
    "ModelLoadError",
    "ModelRunError",
    "NoActiveModelError",
    "NoTrustRootError",
    "NonFiniteOutputError",
    "NothingToRollBackError",
    "OutputSpecError",
    "SlotIntegrityError",
    "StateCorruptError",
    "StorageError",
    "StoreLoopError",
    "TrialExhaustedError",
    "storage_error",
]


class HealthCheckError(VerificationError):
    """The model was refused by the on-device health check during its trial."""

    code = 40


class ModelRunError(HealthCheckError):
    """onnxruntime loaded the model but failed running the health-check inputs."""

    code = 42


class OutputSpecError(HealthCheckError):
    """The model's inputs or outputs differ from the manifest (names, dtypes, shapes)."""

    code = 43


class NonFiniteOutputError(HealthCheckError):
    """The model produced NaN or infinite values on the health-check inputs."""

    code = 44


class GoldenMismatchError(HealthCheckError):
    """The outputs on the golden inputs differ from the manifest's expected outputs."""

    code = 45


class LatencyBudgetError(HealthCheckError):
    """The median inference latency is above the manifest's budget on this device."""

    code = 46


class TrialExhaustedError(HealthCheckError):
    """The agent restarted too many times while the model was on trial."""

    code = 47


class SlotIntegrityError(VerificationError):
    """A slot's files no longer match the manifest (or state) that vouches for them."""

    code = 48


class AgentError(EdgefleetError):
    """The agent cannot do what was asked (state, lock, configuration)."""

    code = 50


class StateCorruptError(AgentError):
    """``state.json`` cannot be read or does not have the expected structure."""

    code = 51


class AgentBusyError(AgentError):
    """Another agent process holds the state directory's lock."""

    code = 52


class NoTrustRootError(AgentError):
    """No trust root is pinned in the state directory and none was given."""

    code = 53


class NoActiveModelError(AgentError):
    """No model is installed (or loaded) to serve predictions."""

    code = 54


class NothingToRollBackError(AgentError):
    """There is no previous committed model to roll back to."""

    code = 55


class InterruptedUpdateError(AgentError):
    """An update was interrupted (restart, power loss) before it switched slots."""

    code = 56


class StoreLoopError(AgentError):
    """One update stored its state more often than allowed (loop breaker)."""

    code = 57


class InvalidInputError(AgentError):
    """The inputs given to ``predict`` do not fit the active model."""

    code = 58


class StorageError(TransportError):
    """Writing the state directory failed (disk full, I/O error)."""

    code = 31


def storage_error(exc: OSError, what: str) -> StorageError:
    """``OSError`` -> ``StorageError`` at the agent's boundary, saying what failed and why."""
    detail = exc.strerror or str(exc) or type(exc).__name__
    return StorageError(f"{what}: {detail}")


class InvalidTransitionError(AgentError):
    """The request does not fit the persisted update state (e.g. an update is in progress)."""

    code = 59
