"""UTC timestamps in the one spelling signed documents use: ``YYYY-MM-DDTHH:MM:SSZ``."""

from __future__ import annotations

from datetime import datetime, timezone

__all__ = ["format_utc", "parse_utc", "utcnow"]

_FMT = "%Y-%m-%dT%H:%M:%SZ"


def utcnow() -> datetime:
    """Current time, timezone-aware UTC, whole seconds."""
    return datetime.now(timezone.utc).replace(microsecond=0)


def format_utc(when: datetime) -> str:
    """Format an aware datetime as ``YYYY-MM-DDTHH:MM:SSZ``.

    Raises:
        ValueError: ``when`` is naive.
    """
    if when.tzinfo is None:
        raise ValueError("naive datetime: pass a timezone-aware UTC time")
    return when.astimezone(timezone.utc).strftime(_FMT)


def parse_utc(text: str) -> datetime:
    """Parse ``YYYY-MM-DDTHH:MM:SSZ`` into an aware UTC datetime.

    Raises:
        ValueError: any other spelling.
    """
    if not isinstance(text, str) or len(text) != 20 or not text.endswith("Z"):
        raise ValueError(f"timestamp {text!r} is not YYYY-MM-DDTHH:MM:SSZ")
    return datetime.strptime(text, _FMT).replace(tzinfo=timezone.utc)
