"""Desired-state verification: is this retained MQTT payload the director's, for me, and new?

Pure: bytes, the trust root, the clock value and the device's identity in; the
verified ``DesiredState`` out, or exactly one ``VerificationError`` subclass.
The message schema and its strict decoding live in ``edgefleet.wire.desired``.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from edgefleet import canonical
from edgefleet.errors import ExpiredError, RollbackError, WrongTargetError
from edgefleet.timeutil import format_utc
from edgefleet.topics import DeviceTopic, GroupTopic
from edgefleet.trust.root import TrustRoot, parse_signatures
from edgefleet.wire.base import MalformedMessageError, fail
from edgefleet.wire.desired import CLOCK_SKEW, MAX_DESIRED_BYTES, DesiredState

__all__ = ["verify_desired_state"]


def verify_desired_state(
    data: bytes,
    *,
    trust_root: TrustRoot,
    now: datetime,
    topic: DeviceTopic | GroupTopic,
    device_id: str,
    groups: Iterable[str],
    floor: int,
) -> DesiredState:
    """Verify a desired-state payload received on ``topic``.

    Args:
        data: the MQTT payload.
        trust_root: the device's current, trusted root (director role).
        now: current time (aware UTC).
        topic: the parsed topic the payload arrived on.
        device_id: this device.
        groups: the groups this device belongs to.
        floor: the highest version already accepted for this topic's target
            (0 if none); the message must be strictly above it.

    Returns:
        The verified desired state.

    Raises:
        MalformedMessageError: oversized, not canonical JSON, or malformed.
        UnknownKeyError, BadSignatureError, ThresholdNotMetError: not signed by
            a threshold of director keys (forged or tampered).
        MalformedTrustRootError: the trust root has no director role.
        WrongTargetError: the signed target is not this topic's device or
            group, or not this device or one of its groups.
        ExpiredError: the desired state or the trust root is expired.
        RollbackError: the version is not above ``floor`` (replay).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise fail("desired", "payload must be bytes")
    if len(data) > MAX_DESIRED_BYTES:
        raise fail("desired", f"{len(data)} bytes is more than the limit of {MAX_DESIRED_BYTES}")
    try:
        doc = canonical.decode_strict(bytes(data))
    except canonical.CanonicalError as exc:
        raise fail("desired", str(exc)) from None
    if set(doc) != {"signed", "signatures"}:
        raise fail("desired", f"keys must be exactly 'signed' and 'signatures', not {sorted(doc)}")
    if not isinstance(doc["signed"], dict):
        raise fail("desired", "'signed' must be an object")
    sigs = parse_signatures(doc["signatures"], error=MalformedMessageError)
    trust_root.check_not_expired(now)
    trust_root.verify_role_signatures("director", canonical.encode(doc["signed"]), sigs)
    state = DesiredState.from_signed_dict(doc["signed"])
    if state.target.topic != topic:
        raise WrongTargetError(
            f"desired state for {state.target.key} arrived on {topic}: refusing a re-routed message"
        )
    mine = (
        state.target.device == device_id
        if state.target.device is not None
        else state.target.group in set(groups)
    )
    if not mine:
        raise WrongTargetError(f"desired state is for {state.target.key}, not for this device")
    if now >= state.expires:
        raise ExpiredError(
            f"desired state v{state.version} for {state.target.key} expired at "
            f"{format_utc(state.expires)}"
        )
    if state.issued > now + CLOCK_SKEW:
        raise fail("desired", f"issued {format_utc(state.issued)} is in the future")
    if state.version <= floor:
        raise RollbackError(
            f"desired state v{state.version} for {state.target.key} is not above the accepted "
            f"v{floor} (replayed or stale)"
        )
    return state
