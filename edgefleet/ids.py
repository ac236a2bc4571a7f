"""Identifier rules and numeric bounds: the one place every schema takes them from.

Each rule is written once as a ``^...$`` pattern (the spelling JSON Schema,
pydantic and docs/protocol.md use) and offered in the forms the checkers
need: ``*_RE`` compiled for a full match in Python (``$`` would also accept a
trailing newline, so the compiled form ends with ``\\Z``), and an
``Annotated`` msgspec type whose ``Meta`` bounds the wire schemas use (msgspec
searches, so the same ``\\Z`` anchoring applies).

The manifest, topics, the agent's state file, the server's API schemas and
the wire messages (``edgefleet.wire``) all import from here; a rule changed
here changes everywhere at once. This module imports nothing from edgefleet,
so every layer may use it.
"""

from __future__ import annotations

import re
import sys
from typing import Annotated

from msgspec import Meta

__all__ = [
    "HEX64_PATTERN",
    "HEX64_RE",
    "ID_PATTERN",
    "ID_RE",
    "KIND_PATTERN",
    "KIND_RE",
    "MAX_UNIX_TS",
    "MAX_VERSION",
    "MODEL_NAME_PATTERN",
    "MODEL_NAME_RE",
    "NAME_PATTERN",
    "NAME_RE",
    "BundleId",
    "Count",
    "DeviceName",
    "Finite",
    "Hex64",
    "Kind",
    "ModelName",
    "NonNegative",
    "UnitInterval",
    "UnixTs",
    "Version",
    "fullmatch_re",
]

MAX_VERSION = 2**53 - 1  # the largest integer every JSON implementation holds exactly
# Unix-seconds fields end at 9999-12-31T23:59:59Z, the last second a datetime can hold.
MAX_UNIX_TS = 253_402_300_799.0

HEX64_PATTERN = r"^[0-9a-f]{64}$"  # sha256 digests, key ids
# Bundle ids, rollout ids and payload paths: 128 characters, no leading dot or dash.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# Device ids, group names, device classes: one MQTT topic level, no wildcards.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
KIND_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"  # event kinds, error kinds


def _python(pattern: str) -> str:
    """``^...$`` -> ``^...\\Z``: Python's ``$`` also matches before a final newline."""
    if not (pattern.startswith("^") and pattern.endswith("$")):
        raise ValueError(f"identifier pattern {pattern!r} must be anchored with ^...$")
    return pattern[:-1] + r"\Z"


def fullmatch_re(pattern: str) -> re.Pattern[str]:
    """Compile a ``^...$`` rule so that ``.match`` is a true full match."""
    return re.compile(_python(pattern))


HEX64_RE = fullmatch_re(HEX64_PATTERN)
ID_RE = fullmatch_re(ID_PATTERN)
NAME_RE = fullmatch_re(NAME_PATTERN)
MODEL_NAME_RE = fullmatch_re(MODEL_NAME_PATTERN)
KIND_RE = fullmatch_re(KIND_PATTERN)

_FMAX = sys.float_info.max  # bounds a float to finite values: inf and NaN fail ge/le

Hex64 = Annotated[str, Meta(min_length=64, max_length=64, pattern=_python(HEX64_PATTERN))]
BundleId = Annotated[str, Meta(max_length=128, pattern=_python(ID_PATTERN))]
DeviceName = Annotated[str, Meta(max_length=64, pattern=_python(NAME_PATTERN))]
ModelName = Annotated[str, Meta(max_length=64, pattern=_python(MODEL_NAME_PATTERN))]
Kind = Annotated[str, Meta(max_length=32, pattern=_python(KIND_PATTERN))]
Version = Annotated[int, Meta(ge=1, le=MAX_VERSION)]
Count = Annotated[int, Meta(ge=0, le=MAX_VERSION)]
Finite = Annotated[float, Meta(ge=-_FMAX, le=_FMAX)]
NonNegative = Annotated[float, Meta(ge=0, le=_FMAX)]
UnitInterval = Annotated[float, Meta(ge=0, le=1)]
UnixTs = Annotated[float, Meta(ge=0, le=MAX_UNIX_TS)]
