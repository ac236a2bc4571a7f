"""The two exception families of edgefleet.

Every failure a caller can act on belongs to exactly one family:

* ``VerificationError``: the *content* is bad. A bundle, manifest, trust root or
  signed message was rejected: it is not what a trusted key published, it is
  not for this device, or it would move the device backwards. Retrying the same
  bytes can never succeed; the bytes must be discarded.
* ``TransportError``: the *delivery* failed (broker down, chunk timeout, disk
  full while downloading). Retrying later may succeed; nothing was decided
  about the content.

Foreign exceptions (paho, OSError, zstd) are converted at the boundary with
``raise ... from`` so callers only ever handle these classes. Each concrete
class has a stable ``code`` used as the CLI exit status (see docs/cli.md).
"""

from __future__ import annotations

__all__ = [
    "BadSignatureError",
    "ConfigError",
    "DecompressionBombError",
    "DuplicateMemberError",
    "EdgefleetError",
    "ExpiredError",
    "HashMismatchError",
    "LengthMismatchError",
    "MalformedBundleError",
    "MissingMemberError",
    "ModelLoadError",
    "OversizedPayloadError",
    "PathTraversalError",
    "RollbackError",
    "ThresholdNotMetError",
    "TransportError",
    "UnknownKeyError",
    "VerificationError",
    "WrongTargetError",
]


class EdgefleetError(Exception):
    """Root of every error edgefleet raises on purpose."""

    code: int = 1


class ConfigError(EdgefleetError, ValueError):
    """A configuration file, setting or option is missing, malformed or out of bounds.

    The one configuration error of every part (``agent.toml``, the server's
    settings, the compression options); the message names the key and the
    rule. A ``ValueError`` too, so pydantic validators may raise it.
    """

    code = 1


class VerificationError(EdgefleetError):
    """Bad content: the bytes were rejected and must never be installed."""

    code = 10


class UnknownKeyError(VerificationError):
    """A signature names a key id that the trust root does not list for the role."""

    code = 11


class BadSignatureError(VerificationError):
    """A signature does not verify over the canonical signed bytes."""

    code = 12


class ThresholdNotMetError(VerificationError):
    """Fewer distinct, valid, authorised signatures than the role's threshold."""

    code = 13


class HashMismatchError(VerificationError):
    """A payload's sha256 differs from the one the signed manifest declares."""

    code = 14


class LengthMismatchError(VerificationError):
    """A payload is shorter (or, decompressed, of another size) than declared."""

    code = 15


class RollbackError(VerificationError):
    """The version is not strictly above the one already installed (or the trust
    root version is not the next one)."""

    code = 16


class ExpiredError(VerificationError):
    """The signed metadata is past its expiry (freeze attack protection)."""

    code = 17


class WrongTargetError(VerificationError):
    """The bundle is validly signed but for another device class, CPU
    architecture or runtime (mix-and-match protection)."""

    code = 18


class OversizedPayloadError(VerificationError):
    """More data than declared (endless-data protection); reading stops at once."""

    code = 19


class MalformedBundleError(VerificationError):
    """The container itself is not a well-formed edgefleet bundle."""

    code = 20


class PathTraversalError(MalformedBundleError):
    """A member or payload path is absolute, contains ``..`` or is not a plain name."""

    code = 21


class DuplicateMemberError(MalformedBundleError):
    """A member name (or payload path) appears twice."""

    code = 22


class MissingMemberError(MalformedBundleError):
    """A required member or a payload entry declared in the manifest is absent."""

    code = 23


class DecompressionBombError(MalformedBundleError):
    """A compressed payload expands beyond its declared size or the ratio limit."""

    code = 24


class ModelLoadError(VerificationError):
    """A model cannot be loaded: the file is missing or not a model, or the runtime refuses it.

    Raised by the agent's runtime (onnxruntime refuses the graph: an invalid
    model or an unknown operator fails the health check) and by compression
    (the MODEL argument is neither ONNX, a ``torch.export`` program nor
    TorchScript).
    """

    code = 41


class TransportError(EdgefleetError):
    """Delivery failed; the content was not judged. Retrying may succeed."""

    code = 30
