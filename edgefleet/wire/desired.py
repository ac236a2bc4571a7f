"""Desired state: what the server wants a device (or a group) to run, signed by the director.

Flow: the server builds a ``DesiredState``, signs its canonical ``signed``
body with director keys (``sign`` -> ``SignedDesiredState``) and publishes
the envelope ``{"signed": ..., "signatures": [...]}`` retained. A device
verifies it with ``edgefleet.trust.verify_desired_state``, which checks the
canonical encoding and the signatures over the exact bytes *before* calling
``DesiredState.from_signed_dict`` on the body.

Invariants: ``version`` is the director's sequence number for the target and
only ever rises; ``expires`` is after ``issued``; the target is exactly one of
a device id or a group name; timestamps are spelt ``YYYY-MM-DDTHH:MM:SSZ``
(the one spelling, so a signed body re-encodes to the bytes that were signed).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal

from msgspec import Meta

from edgefleet import canonical
from edgefleet.ids import BundleId, DeviceName, Hex64, ModelName, Version
from edgefleet.timeutil import format_utc, parse_utc
from edgefleet.topics import DeviceTopic, GroupTopic
from edgefleet.wire.base import WireStruct, convert, fail, wire_default

if TYPE_CHECKING:  # edgefleet.trust imports this module to verify; signing needs its type
    from edgefleet.keys import SigningKey  # cryptography loads on signing, not at import
    from edgefleet.trust.root import Signature

__all__ = [
    "CLOCK_SKEW",
    "DESIRED_STATE_TYPE",
    "MAX_BUNDLE_BYTES",
    "MAX_DESIRED_BYTES",
    "BundleRef",
    "DesiredState",
    "DesiredTarget",
    "ModelRef",
    "ShadowSpec",
    "SignedDesiredState",
]

DESIRED_STATE_TYPE: Literal["edgefleet-desired-state"] = "edgefleet-desired-state"
MAX_DESIRED_BYTES = 64 << 10  # bytes; a desired state with 64 signatures is ~10 KiB
MAX_BUNDLE_BYTES = 1 << 40  # bytes; a sanity bound, devices configure a smaller one
CLOCK_SKEW = timedelta(hours=1)  # how far in the future ``issued`` may be

UtcTime = Annotated[datetime, Meta(tz=True)]


class ModelRef(WireStruct, frozen=True):
    """A model by name and integer version (as in the bundle manifest)."""

    what = "model"
    name: ModelName
    version: Version


class BundleRef(WireStruct, frozen=True):
    """Which bundle file to fetch: the chunk service's id, its sha256 and exact size."""

    what = "bundle"
    id: BundleId
    sha256: Hex64
    size: Annotated[int, Meta(ge=1, le=MAX_BUNDLE_BYTES)]


class ShadowSpec(WireStruct, frozen=True):
    """A candidate model to run in shadow next to the primary one."""

    what = "shadow"
    model: ModelRef
    bundle: BundleRef


class DesiredTarget(WireStruct, frozen=True):
    """Exactly one of a device id or a group name: ``{"device": ID}`` or ``{"group": NAME}``."""

    what = "desired.target"
    device: DeviceName | None = None
    group: DeviceName | None = None

    def _check(self) -> None:
        if (self.device is None) == (self.group is None):
            raise fail(self.what, "needs exactly one of device or group")

    @property
    def key(self) -> str:
        """A stable key for per-target bookkeeping: ``device:ID`` or ``group:NAME``."""
        return f"device:{self.device}" if self.device is not None else f"group:{self.group}"

    @property
    def topic(self) -> DeviceTopic | GroupTopic:
        """The retained topic this desired state is published on."""
        if self.device is not None:
            return DeviceTopic.desired(self.device)
        assert self.group is not None
        return GroupTopic(self.group)

    def to_dict(self) -> dict[str, Any]:
        if self.device is not None:
            return {"device": self.device}
        return {"group": self.group}

    @classmethod
    def from_dict(cls, d: Any, what: str | None = None) -> DesiredTarget:
        # The one wire rule msgspec cannot say: exactly one key, never a null one.
        if not isinstance(d, dict) or len(d) != 1 or not set(d) <= {"device", "group"}:
            raise fail(cls.what, 'must be {"device": ID} or {"group": NAME}')
        return convert(d, cls, cls.what)


class _DesiredEnvelope(WireStruct, frozen=True, kw_only=True, rename={"doc_type": "_type"}):
    doc_type: Literal["edgefleet-desired-state"] = wire_default("_type", DESIRED_STATE_TYPE)
    spec_version: Literal[1] = wire_default("spec_version", 1)


class DesiredState(_DesiredEnvelope, frozen=True):
    """What the server wants a device (or a group) to run.

    ``version`` is the director's sequence number for this target: every new
    desired state for the same target carries a strictly higher one.
    """

    what = "desired"
    target: DesiredTarget
    version: Version
    model: ModelRef
    bundle: BundleRef
    issued: UtcTime
    expires: UtcTime
    shadow: ShadowSpec | None = wire_default("shadow", None)
    rollout_id: BundleId | None = wire_default("rollout_id", None)

    def _check(self) -> None:
        if self.expires <= self.issued:
            raise fail(self.what, "expires must be after issued")

    def to_signed_dict(self) -> dict[str, Any]:
        """The ``signed`` body (what director keys sign, canonically encoded)."""
        body = self.to_dict()
        body["target"] = self.target.to_dict()
        body["issued"] = format_utc(self.issued)
        body["expires"] = format_utc(self.expires)
        return body

    @classmethod
    def from_signed_dict(cls, d: Any) -> DesiredState:
        """Parse a ``signed`` body (already checked canonical and signed).

        Raises:
            MalformedMessageError: any structural problem.
        """
        if not isinstance(d, dict):
            raise fail(cls.what, "must be an object")
        body = dict(d)
        for key in ("issued", "expires"):
            if key in body:
                try:
                    body[key] = parse_utc(body[key])
                except (TypeError, ValueError) as exc:
                    raise fail(f"{cls.what}.{key}", str(exc)) from None
        if "target" in body:
            body["target"] = DesiredTarget.from_dict(body["target"])
        return convert(body, cls, cls.what)

    def sign(self, keys: Sequence[SigningKey]) -> SignedDesiredState:
        """Sign with director keys (server side)."""
        from edgefleet.trust.root import Signature

        body = canonical.encode(self.to_signed_dict())
        sigs = tuple(Signature(k.keyid, k.sign(body)) for k in keys)
        return SignedDesiredState(self, sigs)


@dataclass(frozen=True)
class SignedDesiredState:
    """A desired state with its director signatures: the retained payload.

    Not a schema of its own: the envelope is parsed by the verifier, which must
    see the raw ``signed`` object to check signatures before any decoding.
    """

    state: DesiredState
    signatures: tuple[Signature, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "signed": self.state.to_signed_dict(),
            "signatures": [s.to_dict() for s in self.signatures],
        }

    def to_bytes(self) -> bytes:
        return canonical.encode(self.to_dict())

    @property
    def sha256(self) -> str:
        """Digest of the wire bytes (identifies a retained re-delivery)."""
        return hashlib.sha256(self.to_bytes()).hexdigest()
