"""The trust root: who may sign what, and how that changes over time.

A trust root document (``trust-root.json``) has the TUF root shape::

    {"signed": {"_type": "edgefleet-trust-root", "spec_version": 1, "version": N,
                "expires": "...Z",
                "keys": {KEYID: {"keytype": "ed25519", "public": BASE64_SPKI_DER}},
                "roles": {"root": {"keyids": [...], "threshold": m},
                          "release": {"keyids": [...], "threshold": m},
                          "director": {"keyids": [...], "threshold": m}}},
     "signatures": [{"keyid": KEYID, "sig": BASE64}]}

Signatures cover ``canonical.encode(signed)``. Roles: ``root`` keys (kept
offline) sign trust roots; ``release`` keys sign bundle manifests; ``director``
keys sign desired-state messages.

Trust decisions here are pure: bytes and a clock value in, a ``TrustRoot`` or
one precise ``VerificationError`` out; no file or network I/O.

Rotation invariant (TUF 5.3.4): version N+1 is accepted only if it is signed by
a threshold of version N's root keys *and* a threshold of its own root keys,
and its version is exactly N+1. Revoking a release key is publishing N+1
without it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from edgefleet import canonical
from edgefleet.errors import (
    BadSignatureError,
    ExpiredError,
    RollbackError,
    ThresholdNotMetError,
    UnknownKeyError,
    VerificationError,
)
from edgefleet.keys import PublicKey, SigningKey
from edgefleet.timeutil import format_utc, parse_utc

__all__ = [
    "ROLES",
    "TRUST_ROOT_TYPE",
    "MalformedTrustRootError",
    "Role",
    "Signature",
    "TrustRoot",
    "parse_signatures",
    "sign_trust_root",
    "verify_threshold",
]

TRUST_ROOT_TYPE = "edgefleet-trust-root"
ROLES = ("root", "release", "director")
MAX_SIGNATURES = 64  # bound on signatures per document (each costs a verify)


class MalformedTrustRootError(VerificationError):
    """The trust-root document is not well formed."""

    code = 25


@dataclass(frozen=True)
class Signature:
    """One detached Ed25519 signature by ``keyid``."""

    keyid: str
    sig: bytes

    def to_dict(self) -> dict[str, str]:
        return {"keyid": self.keyid, "sig": base64.b64encode(self.sig).decode("ascii")}


def parse_signatures(value: Any, *, error: type[VerificationError]) -> list[Signature]:
    """Parse a JSON list of ``{"keyid", "sig"}`` objects.

    Raises:
        VerificationError: of class ``error`` when the list is malformed or too long.
    """
    if not isinstance(value, list):
        raise error("signatures must be a list")
    if len(value) > MAX_SIGNATURES:
        raise error(f"too many signatures ({len(value)} > {MAX_SIGNATURES})")
    out = []
    for item in value:
        if not isinstance(item, dict) or set(item) != {"keyid", "sig"}:
            raise error("each signature must be an object with exactly keyid and sig")
        keyid, sig = item["keyid"], item["sig"]
        if not isinstance(keyid, str) or not isinstance(sig, str):
            raise error("signature keyid and sig must be strings")
        try:
            raw = base64.b64decode(sig, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise error(f"signature by {keyid[:12]} is not base64") from exc
        # One spelling per signature: unused bits must be zero (no malleable encodings).
        if base64.b64encode(raw).decode("ascii") != sig:
            raise error(f"signature by {keyid[:12]} is not canonical base64")
        out.append(Signature(keyid, raw))
    return out


@dataclass(frozen=True)
class Role:
    """The keys allowed to sign for a role and how many must."""

    keyids: tuple[str, ...]
    threshold: int


def verify_threshold(
    message: bytes,
    signatures: Sequence[Signature],
    keys: Mapping[str, PublicKey],
    role: Role,
    role_name: str,
) -> set[str]:
    """Check that a threshold of ``role``'s keys signed ``message``.

    Signatures by keys outside the role are ignored when the threshold is met
    (so an old, revoked co-signature does not spoil a bundle), and each key
    counts once.

    Returns:
        The key ids whose valid signatures were counted.

    Raises:
        BadSignatureError: a key of the role signed, but the signature is
            invalid, and the threshold is not met.
        UnknownKeyError: no key of the role signed at all, and some signature
            names a key the role does not list (unknown or revoked).
        ThresholdNotMetError: otherwise, when fewer than ``threshold`` distinct
            keys of the role produced valid signatures.
    """
    valid: set[str] = set()
    bad: list[str] = []
    foreign: list[str] = []
    allowed = set(role.keyids)
    for sig in signatures:
        if sig.keyid not in allowed or sig.keyid not in keys:
            foreign.append(sig.keyid)
            continue
        if sig.keyid in valid:
            continue
        if keys[sig.keyid].verify(sig.sig, message):
            valid.add(sig.keyid)
        else:
            bad.append(sig.keyid)
    if len(valid) >= role.threshold:
        return valid
    if bad:
        raise BadSignatureError(
            f"invalid signature by {role_name} key {bad[0][:12]}: the signed bytes were altered"
        )
    if not valid and foreign:
        raise UnknownKeyError(
            f"signed only by key(s) {', '.join(k[:12] for k in foreign)} that are not "
            f"{role_name} keys of the trust root (unknown or revoked)"
        )
    raise ThresholdNotMetError(
        f"{len(valid)} valid {role_name} signature(s), threshold is {role.threshold}"
    )


@dataclass(frozen=True)
class TrustRoot:
    """A parsed, structurally valid trust root (not yet trusted by itself)."""

    version: int
    expires: datetime
    keys: Mapping[str, PublicKey]
    roles: Mapping[str, Role]
    signed: Mapping[str, Any]
    signatures: tuple[Signature, ...]

    @property
    def signed_bytes(self) -> bytes:
        return canonical.encode(self.signed)

    @classmethod
    def from_bytes(cls, data: bytes) -> TrustRoot:
        """Parse a trust-root document.

        Raises:
            MalformedTrustRootError: any structural problem.
        """
        try:
            doc = canonical.decode_strict(data, require_canonical=False)
        except canonical.CanonicalError as exc:
            raise MalformedTrustRootError(f"trust root: {exc}") from exc
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> TrustRoot:
        """Parse an already-decoded trust-root document.

        Raises:
            MalformedTrustRootError: any structural problem.
        """
        err = MalformedTrustRootError
        if not isinstance(doc, Mapping) or set(doc) != {"signed", "signatures"}:
            raise err("trust root must have exactly 'signed' and 'signatures'")
        signed = doc["signed"]
        if not isinstance(signed, dict) or signed.get("_type") != TRUST_ROOT_TYPE:
            raise err(f"trust root 'signed._type' must be {TRUST_ROOT_TYPE!r}")
        if signed.get("spec_version") != 1:
            raise err("unsupported trust root spec_version")
        version = signed.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise err("trust root version must be an integer >= 1")
        try:
            expires = parse_utc(signed.get("expires"))  # type: ignore[arg-type]
        except ValueError as exc:
            raise err(f"trust root expires: {exc}") from exc
        raw_keys = signed.get("keys")
        if not isinstance(raw_keys, dict):
            raise err("trust root 'keys' must be an object")
        keys: dict[str, PublicKey] = {}
        for keyid, meta in raw_keys.items():
            if not isinstance(meta, dict) or meta.get("keytype") != "ed25519":
                raise err(f"key {keyid[:12]}: only keytype ed25519 is supported")
            try:
                pub = PublicKey.from_b64(meta.get("public", ""))
            except (ValueError, TypeError) as exc:
                raise err(f"key {keyid[:12]}: bad public key") from exc
            if pub.keyid != keyid:
                raise err(f"key id {keyid[:12]} does not match its public key")
            keys[keyid] = pub
        raw_roles = signed.get("roles")
        if not isinstance(raw_roles, dict) or not {"root", "release"} <= set(raw_roles):
            raise err("trust root 'roles' must define at least root and release")
        roles: dict[str, Role] = {}
        for name, meta in raw_roles.items():
            if name not in ROLES:
                raise err(f"unknown role {name!r}")
            if not isinstance(meta, dict) or set(meta) != {"keyids", "threshold"}:
                raise err(f"role {name}: needs exactly keyids and threshold")
            keyids, threshold = meta["keyids"], meta["threshold"]
            if not isinstance(keyids, list) or len(set(keyids)) != len(keyids):
                raise err(f"role {name}: keyids must be a list without duplicates")
            missing = [k for k in keyids if k not in keys]
            if missing:
                raise err(f"role {name}: key {str(missing[0])[:12]} is not in 'keys'")
            if not isinstance(threshold, int) or not 1 <= threshold <= len(keyids):
                raise err(f"role {name}: threshold must be between 1 and {len(keyids)}")
            roles[name] = Role(tuple(keyids), threshold)
        sigs = parse_signatures(doc["signatures"], error=err)
        return cls(version, expires, keys, roles, signed, tuple(sigs))

    def to_dict(self) -> dict[str, Any]:
        return {"signed": dict(self.signed), "signatures": [s.to_dict() for s in self.signatures]}

    def to_bytes(self) -> bytes:
        """Canonical bytes of the whole document (what ``keys init`` writes)."""
        return canonical.encode(self.to_dict())

    def role(self, name: str) -> Role:
        """Return a role.

        Raises:
            MalformedTrustRootError: the trust root defines no such role.
        """
        try:
            return self.roles[name]
        except KeyError:
            raise MalformedTrustRootError(
                f"trust root v{self.version} has no {name} role"
            ) from None

    def verify_role_signatures(
        self, role_name: str, message: bytes, signatures: Sequence[Signature]
    ) -> set[str]:
        """Threshold-verify ``message`` for one of this root's roles (see ``verify_threshold``)."""
        return verify_threshold(message, signatures, self.keys, self.role(role_name), role_name)

    def check_self_signed(self) -> None:
        """Verify that this root is signed by a threshold of its own root keys.

        Raises:
            VerificationError: see ``verify_threshold``.
        """
        self.verify_role_signatures("root", self.signed_bytes, self.signatures)

    def check_not_expired(self, now: datetime) -> None:
        """Raises ExpiredError if ``now`` is at or past ``expires``."""
        if now >= self.expires:
            raise ExpiredError(f"trust root v{self.version} expired at {format_utc(self.expires)}")

    def verify_successor(self, data: bytes) -> TrustRoot:
        """Accept the next trust root in the rotation chain.

        Args:
            data: the candidate version N+1 document.

        Returns:
            The new root, trusted.

        Raises:
            MalformedTrustRootError: not a trust root.
            RollbackError: its version is not above this one.
            VerificationError: it skips versions, or is not signed by a
                threshold of this root's root keys and of its own root keys
                (precise subclasses from ``verify_threshold``).
        """
        new = TrustRoot.from_bytes(data)
        if new.version <= self.version:
            raise RollbackError(
                f"trust root v{new.version} is not newer than the trusted v{self.version}"
            )
        if new.version != self.version + 1:
            raise VerificationError(
                f"trust root v{new.version} skips versions: apply v{self.version + 1} first"
            )
        self.verify_role_signatures("root", new.signed_bytes, new.signatures)
        new.check_self_signed()
        return new

    def update_chain(self, chain: Iterable[bytes], now: datetime) -> TrustRoot:
        """Walk successive trust roots from this one and return the newest trusted.

        Intermediate roots may be expired (TUF 5.3.10: only the final root's
        expiry matters).

        Raises:
            VerificationError: any link is rejected (see ``verify_successor``),
                or the final root is expired.
        """
        current = self
        for data in chain:
            current = current.verify_successor(data)
        current.check_not_expired(now)
        return current


def sign_trust_root(signed: Mapping[str, Any], signers: Iterable[SigningKey]) -> TrustRoot:
    """Build a trust root document from ``signed`` and sign it with each key.

    Raises:
        MalformedTrustRootError: ``signed`` is not a valid trust root body.
    """
    message = canonical.encode(dict(signed))
    sigs = [Signature(k.keyid, k.sign(message)).to_dict() for k in signers]
    return TrustRoot.from_dict({"signed": dict(signed), "signatures": sigs})
