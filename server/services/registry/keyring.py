"""Registry keyring: the trust root devices pin and the server's online release key.

Flow: ``load_trust_root`` reads ``EDGEFLEET_TRUST_ROOT`` on each call (its
release role decides who may sign and how many signatures publish a version);
``load_release_key`` reads ``EDGEFLEET_RELEASE_KEY`` when the server signs
online, and answers None when it signs offline only.

Invariants: keys are read from the configured files at use time, never
cached here; a configured but missing, unreadable or malformed file raises
``UnavailableError`` (the API answers 503), never a silent fallback.
"""

from __future__ import annotations

from edgefleet.errors import VerificationError
from edgefleet.keys import KeyFileError, SigningKey, load_signing_key
from edgefleet.trust import TrustRoot
from server.errors import (
    UnavailableError,
)
from server.settings import Settings


def load_trust_root(settings: Settings) -> TrustRoot:
    """The trust root devices pin (its release role decides who may sign).

    Raises:
        UnavailableError: not configured, unreadable or malformed.
    """
    if settings.trust_root is None:
        raise UnavailableError("this server has no trust root configured (EDGEFLEET_TRUST_ROOT)")
    try:
        return TrustRoot.from_bytes(settings.trust_root.read_bytes())
    except (OSError, VerificationError) as exc:
        raise UnavailableError(f"cannot load trust root {settings.trust_root}: {exc}") from exc


def load_release_key(settings: Settings) -> SigningKey | None:
    """The online release key, or None when the server signs offline only.

    Raises:
        UnavailableError: configured but unreadable.
    """
    if settings.release_key is None:
        return None
    try:
        return load_signing_key(settings.release_key)
    except KeyFileError as exc:
        raise UnavailableError(str(exc)) from exc
