"""Canonical JSON: the exact bytes that signatures cover.

Flow: a Python value -> ``encode`` -> UTF-8 bytes that are signed and stored
as-is. On the way back ``decode_strict`` parses bytes, refusing duplicate keys,
NaN/Infinity and non-canonical spellings, so that two parsers can never see two
different documents behind one signature (parser-differential attacks).

The encoding is ``json.dumps(value, sort_keys=True, separators=(",", ":"),
ensure_ascii=False, allow_nan=False)`` encoded as UTF-8; docs/bundle-format.md
states it for other implementations.
"""

from __future__ import annotations

import json
from typing import Any

from edgefleet.errors import VerificationError

__all__ = ["CanonicalError", "decode_strict", "encode"]


class CanonicalError(VerificationError, ValueError):
    """The bytes are not one canonical JSON object."""


def encode(value: Any) -> bytes:
    """Return the canonical UTF-8 encoding of ``value``.

    Raises:
        ValueError: if ``value`` holds NaN/Infinity or non-JSON types.
    """
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, val in pairs:
        if key in out:
            raise CanonicalError(f"duplicate JSON key {key!r}")
        out[key] = val
    return out


def _no_constants(name: str) -> Any:
    raise CanonicalError(f"non-finite number {name} is not allowed")


def decode_strict(data: bytes, *, require_canonical: bool = True) -> dict[str, Any]:
    """Parse one JSON object from ``data``.

    Args:
        data: UTF-8 bytes.
        require_canonical: also require ``encode(result) == data``.

    Returns:
        The parsed object.

    Raises:
        CanonicalError: invalid UTF-8 or JSON, duplicate keys, non-finite
            numbers, a top level that is not an object, or (when required)
            bytes that are not the canonical spelling.
    """
    try:
        text = data.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except CanonicalError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CanonicalError(f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise CanonicalError("top level is not a JSON object")
    if require_canonical and encode(value) != data:
        raise CanonicalError("JSON is not in canonical form (sorted keys, no spaces)")
    return value
