"""The schema machinery every wire message shares (msgspec), and its guarantees.

Flow: a message type is a frozen ``WireStruct`` whose fields carry their
bounds as ``Annotated[..., Meta(...)]`` (from ``edgefleet.ids``). A
receiver calls ``decode(data, Type, what, max_bytes)`` (or ``convert`` for an
object already parsed, as signed documents are); a sender calls ``encode``.

Guarantees of ``decode`` (each one has a test in ``tests/edgefleet/wire/``):

- the length bound is checked before any parsing;
- UTF-8 only (msgspec refuses invalid UTF-8 and never sniffs UTF-16/32);
- a lone UTF-16 surrogate escape (``"\\ud800"``) is refused: it is not text;
- no NaN or Infinity: JSON has no spelling for them and float fields are
  bounded to the finite range, so ``1e400`` is refused too;
- strict types: ``1.0`` and ``true`` are not the integer ``1``;
- identifiers full-match their rule (no trailing newline);
- every key is required and no other key is allowed, including keys whose
  Python constructor has a default (``wire_default`` below);
- cross-field rules live in each type's ``_check`` and run on decode too.

Duplicate keys are not refused by msgspec (the last one wins, as in
``json.loads``); that is harmless for unsigned messages, and signed documents
go through ``edgefleet.canonical.decode_strict`` first, which refuses them
along with every non-canonical spelling, before the signature is checked.

Construction validates as well: building a message in Python with a bad
value raises ``MalformedMessageError`` at once, because ``__post_init__``
round-trips a hand-built instance through the same schema. A thread-local
depth marks "inside the schema" (decode, convert, that round trip), where the
instance was just produced by msgspec and only ``_check`` needs to run.

Why msgspec: it decodes and validates in C straight into typed objects, with
declarative bounds (``Meta``) and ``forbid_unknown_fields``, at a fraction of
the cost of ``json.loads`` plus hand checks (``benchmarks/ingest.py``); it
ships binary wheels for aarch64, so the agent can use it on a Raspberry Pi.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from datetime import date, datetime
from typing import Any, ClassVar, TypeVar

import msgspec

from edgefleet import canonical
from edgefleet.errors import VerificationError

__all__ = [
    "MalformedMessageError",
    "WireStruct",
    "convert",
    "decode",
    "decode_canonical",
    "encode",
    "trusted",
    "wire_default",
    "wire_default_factory",
]

T = TypeVar("T")
S = TypeVar("S", bound="WireStruct")


class MalformedMessageError(VerificationError):
    """A message is not well formed (size, JSON, keys, types or bounds)."""

    code = 26


def fail(what: str, msg: str) -> MalformedMessageError:
    """The one error shape: ``"<message>: <problem>"``."""
    return MalformedMessageError(f"{what}: {msg}")


_state = threading.local()


def _inside() -> bool:
    return getattr(_state, "depth", 0) > 0


def _enter() -> int:
    depth: int = getattr(_state, "depth", 0)
    _state.depth = depth + 1
    return depth


def wire_default(name: str, value: T) -> T:
    """A constructor default for an immutable ``value`` that is still required on the wire.

    msgspec would fill a missing key with the field's default; this factory
    refuses instead when called inside the schema, so a payload must carry
    every key (as docs/protocol.md says), while Python callers may omit it.
    """

    def factory() -> T:
        if _inside():
            raise MalformedMessageError(f"missing key {name!r}")
        return value

    result: T = msgspec.field(default_factory=factory)
    return result


def wire_default_factory(name: str, make: Callable[[], T]) -> T:
    """``wire_default`` for a mutable default (a fresh ``make()`` per instance)."""

    def factory() -> T:
        if _inside():
            raise MalformedMessageError(f"missing key {name!r}")
        return make()

    result: T = msgspec.field(default_factory=factory)
    return result


_KEEP = (bytes, bytearray, memoryview, datetime, date)


class WireStruct(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Base of every wire message: frozen, strict, validated however it is made."""

    what: ClassVar[str] = "message"  # the name errors use

    def __post_init__(self) -> None:
        if _inside():
            self._check()
            return
        _revalidate(self)

    def _check(self) -> None:
        """Cross-field rules (bounds that relate two fields); none by default."""

    @classmethod
    def from_dict(cls: type[S], d: Any, what: str | None = None) -> S:
        """Validate a decoded JSON object (e.g. a part kept in a state file) into ``cls``.

        Raises:
            MalformedMessageError: refused by the schema; ``what`` names it.
        """
        return convert(d, cls, what or cls.what)

    def to_dict(self) -> dict[str, Any]:
        """The message as decoded JSON: dicts, lists, base64 strings for bytes (as on the wire)."""
        out: dict[str, Any] = msgspec.json.decode(_encoder.encode(self))
        return out


def _revalidate(msg: WireStruct) -> None:
    depth = _enter()
    try:
        msgspec.convert(msgspec.to_builtins(msg, builtin_types=_KEEP), type(msg))
    except msgspec.ValidationError as exc:
        raise fail(msg.what, str(exc)) from None
    finally:
        _state.depth = depth


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}
_encoder = msgspec.json.Encoder(order="sorted")


def decode(data: Any, type_: type[T], what: str, max_bytes: int) -> T:
    """Parse and validate one message of ``type_`` from ``data``.

    Raises:
        MalformedMessageError: not bytes, longer than ``max_bytes`` (checked
            first), not UTF-8 JSON, or refused by the schema.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise fail(what, "payload must be bytes")
    if len(data) > max_bytes:
        raise fail(what, f"{len(data)} bytes is more than the limit of {max_bytes}")
    decoder = _decoders.get(type_)
    if decoder is None:
        decoder = _decoders[type_] = msgspec.json.Decoder(type_)
    depth = _enter()
    try:
        result: T = decoder.decode(data)
        return result
    except msgspec.ValidationError as exc:
        raise fail(what, str(exc)) from None
    except msgspec.DecodeError as exc:
        if _SURROGATE_ESCAPE.search(data):
            raise fail(what, "a string holds a lone UTF-16 surrogate or is not JSON") from None
        raise fail(what, f"not valid JSON: {exc}") from None
    finally:
        _state.depth = depth


def convert(obj: Any, type_: type[T], what: str) -> T:
    """Validate an already-parsed object (e.g. a signed body) into ``type_``.

    Raises:
        MalformedMessageError: refused by the schema.
    """
    depth = _enter()
    try:
        result: T = msgspec.convert(obj, type_)
        return result
    except msgspec.ValidationError as exc:
        raise fail(what, str(exc)) from None
    finally:
        _state.depth = depth


def encode(msg: WireStruct) -> bytes:
    """UTF-8 JSON with sorted keys (what ``edgefleet.canonical`` also sorts by)."""
    return _encoder.encode(msg)


def trusted(type_: Callable[..., S], *args: Any) -> S:
    """Build ``type_(*args)`` from values a schema has just validated.

    Only the cross-field ``_check`` runs (the round trip would repeat the
    field checks): for messages assembled from a decoded header, such as a
    chunk frame's header plus its payload bytes.
    """
    depth = _enter()
    try:
        return type_(*args)
    finally:
        _state.depth = depth


def decode_canonical(data: Any, type_: type[T], what: str, max_bytes: int) -> T:
    """``decode`` for messages that must be canonical JSON (``edgefleet.canonical``).

    Everything the server and the agent publish besides telemetry is canonical;
    requiring it refuses duplicate keys and alternative spellings as well.

    Raises:
        MalformedMessageError: as ``decode``, or not canonical.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise fail(what, "payload must be bytes")
    if len(data) > max_bytes:
        raise fail(what, f"{len(data)} bytes is more than the limit of {max_bytes}")
    try:
        doc = canonical.decode_strict(bytes(data))
    except canonical.CanonicalError as exc:
        raise fail(what, str(exc)) from None
    return convert(doc, type_, what)
