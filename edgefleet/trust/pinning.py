"""Trust-root pinning: which root does the device trust next?

``accept_root`` is the pure decision behind ``Agent.pin_trust_root`` and
``Agent.update_trust_root``; the agent keeps the file I/O (the atomic write of
the pinned root) and calls it. Rules:

* first use (nothing pinned): the candidate must be signed by a threshold of
  its own root keys and be unexpired;
* the same root again: accepted as is (a no-op; the caller need not write);
* otherwise the candidate must be the pinned root's successor: version N+1
  (older or equal -> ``RollbackError``, skipping -> ``VerificationError``),
  signed by a threshold of the old root's root keys and of its own, and
  unexpired; the error names both versions;
* a chain (oldest first) is walked link by link from the pinned root;
  intermediate roots may be expired, only the final one's expiry matters.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from edgefleet.errors import VerificationError
from edgefleet.trust.root import TrustRoot

__all__ = ["accept_root", "accept_root_chain"]


def accept_root(current: TrustRoot | None, candidate: bytes, now: datetime) -> TrustRoot:
    """The root to pin when ``candidate`` is offered while ``current`` is pinned.

    Returns ``current`` itself when the candidate is the same root.

    Raises:
        MalformedTrustRootError: ``candidate`` is not a trust root.
        VerificationError: not self-signed, expired, or not a valid successor
            of ``current`` (the precise subclass, with both versions named).
    """
    root = TrustRoot.from_bytes(candidate)
    if current is None:
        root.check_self_signed()
        root.check_not_expired(now)
        return root
    if root.to_bytes() == current.to_bytes():
        return current
    try:
        new = current.verify_successor(candidate)
        new.check_not_expired(now)
    except VerificationError as exc:
        raise type(exc)(
            f"the given trust root (v{root.version}) is not the pinned trust "
            f"root v{current.version} nor a valid successor of it: {exc}"
        ) from exc
    return new


def accept_root_chain(current: TrustRoot, chain: Sequence[bytes], now: datetime) -> TrustRoot:
    """Walk a rotation chain (oldest first) from ``current``; return the newest trusted root.

    Raises:
        VerificationError: a link is rejected or the final root is expired.
    """
    return current.update_chain(chain, now)
