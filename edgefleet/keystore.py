"""A key directory on the release side: keys, the trust root and its history.

Layout of ``KEYS/`` (docs/keys.md)::

    root-1.key, root-1.key.pub       root keys (keep offline; private files 0600)
    release-1.key, release-1.key.pub release keys (sign bundles)
    director-1.key, ...              director key (signs desired-state messages)
    trust-root.json                  the current trust root (what devices pin)
    trust-root.<N>.json              every version ever published, for devices
                                     that must walk the rotation chain
    revoked/                         key files moved aside by ``keys revoke``

Invariants: no key file or trust-root version is ever overwritten; each new
trust root is version N+1, signed by a threshold of version N's root keys and
of its own root keys (checked with ``TrustRoot.verify_successor`` before it is
written); ``trust-root.json`` is replaced atomically, after its history copy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from edgefleet import canonical
from edgefleet.errors import EdgefleetError
from edgefleet.fsutil import atomic_write_bytes
from edgefleet.keys import PublicKey, SigningKey, generate, load_signing_key
from edgefleet.timeutil import format_utc, utcnow
from edgefleet.trust import TRUST_ROOT_TYPE, TrustRoot, sign_trust_root

__all__ = ["KeyStore", "KeyStoreError"]

TRUST_ROOT_FILE = "trust-root.json"
_KEYFILE = re.compile(r"^(root|release|director)-(\d+)\.key$")


class KeyStoreError(EdgefleetError, ValueError):
    """The key directory cannot do what was asked (names the reason)."""


@dataclass(frozen=True)
class KeyFile:
    role: str
    path: Path
    public: PublicKey

    @property
    def keyid(self) -> str:
        return self.public.keyid


class KeyStore:
    """Operations on one key directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)

    @property
    def trust_root_path(self) -> Path:
        return self.dir / TRUST_ROOT_FILE

    def trust_root(self) -> TrustRoot:
        """Load the current trust root.

        Raises:
            KeyStoreError: there is none.
            MalformedTrustRootError: it is not a valid document.
        """
        try:
            data = self.trust_root_path.read_bytes()
        except FileNotFoundError:
            raise KeyStoreError(f"{self.trust_root_path} does not exist: run 'keys init'") from None
        return TrustRoot.from_bytes(data)

    def key_files(self) -> list[KeyFile]:
        """Every (non-revoked) key file in the directory, by role and number."""
        out = []
        for path in sorted(self.dir.glob("*.key")):
            m = _KEYFILE.fullmatch(path.name)
            if not m:
                continue
            pub_path = path.with_name(path.name + ".pub")
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

            try:
                key = serialization.load_pem_public_key(pub_path.read_bytes())
            except (OSError, ValueError) as exc:
                raise KeyStoreError(f"{pub_path}: missing or unreadable public key") from exc
            if not isinstance(key, Ed25519PublicKey):
                raise KeyStoreError(f"{pub_path}: not an Ed25519 key")
            out.append(KeyFile(m.group(1), path, PublicKey(key)))
        return out

    def _new_key(self, role: str) -> tuple[SigningKey, Path]:
        used = [
            int(m.group(2))
            for p in self.dir.glob(f"{role}-*.key")
            if (m := _KEYFILE.fullmatch(p.name))
        ]
        used += [
            int(m.group(2))
            for p in (self.dir / "revoked").glob(f"{role}-*.key")
            if (m := _KEYFILE.fullmatch(p.name))
        ]
        path = self.dir / f"{role}-{max(used, default=0) + 1}.key"
        key = generate()
        key.save(path)
        return key, path

    def signing_keys(self, keyids: Sequence[str]) -> list[SigningKey]:
        """Load the private keys present here for ``keyids`` (missing ones skipped)."""
        wanted = set(keyids)
        return [load_signing_key(kf.path) for kf in self.key_files() if kf.keyid in wanted]

    def _publish(self, signed: dict[str, Any], signers: Sequence[SigningKey]) -> TrustRoot:
        root = sign_trust_root(signed, signers)
        data = canonical.encode(root.to_dict())
        history = self.dir / f"trust-root.{root.version}.json"
        if history.exists():
            raise KeyStoreError(f"{history} already exists; refusing to overwrite a published root")
        atomic_write_bytes(history, data)
        atomic_write_bytes(self.trust_root_path, data)
        return root

    def init(
        self,
        *,
        root_keys: int = 1,
        root_threshold: int = 1,
        release_keys: int = 1,
        release_threshold: int = 1,
        director_keys: int = 1,
        expires_in: timedelta = timedelta(days=3650),
        now: datetime | None = None,
    ) -> TrustRoot:
        """Create keys and trust root version 1.

        Raises:
            KeyStoreError: the directory already has a trust root or keys, or
                a threshold is out of range.
        """
        for count, threshold, role in (
            (root_keys, root_threshold, "root"),
            (release_keys, release_threshold, "release"),
        ):
            if not 1 <= threshold <= count:
                raise KeyStoreError(f"{role} threshold {threshold} must be in [1, {count}]")
        if director_keys < 1:
            raise KeyStoreError("need at least one director key")
        if self.trust_root_path.exists() or any(self.dir.glob("*.key")):
            raise KeyStoreError(f"{self.dir} already holds keys; use 'keys rotate' to change them")
        self.dir.mkdir(parents=True, exist_ok=True)
        made: dict[str, list[SigningKey]] = {"root": [], "release": [], "director": []}
        for role, count in (
            ("root", root_keys),
            ("release", release_keys),
            ("director", director_keys),
        ):
            for _ in range(count):
                made[role].append(self._new_key(role)[0])
        thresholds = {"root": root_threshold, "release": release_threshold, "director": 1}
        signed = {
            "_type": TRUST_ROOT_TYPE,
            "spec_version": 1,
            "version": 1,
            "expires": format_utc((now or utcnow()) + expires_in),
            "keys": {
                k.keyid: {"keytype": "ed25519", "public": k.public.to_b64()}
                for keys in made.values()
                for k in keys
            },
            "roles": {
                role: {"keyids": [k.keyid for k in keys], "threshold": thresholds[role]}
                for role, keys in made.items()
            },
        }
        root = self._publish(signed, made["root"])
        root.check_self_signed()
        return root

    def rotate(
        self,
        *,
        add: dict[str, int] | None = None,
        remove: Sequence[str] = (),
        thresholds: dict[str, int] | None = None,
        expires_in: timedelta = timedelta(days=3650),
        now: datetime | None = None,
    ) -> TrustRoot:
        """Publish trust root N+1 with keys added/removed and thresholds changed.

        Args:
            add: role -> number of new keys to generate.
            remove: key ids (or unique prefixes of at least 8 hex digits) to drop from
                every role; their key files move to ``revoked/``.
            thresholds: role -> new threshold.
            expires_in: lifetime of the new root.
            now: current time.

        Raises:
            KeyStoreError: a key id is unknown or ambiguous, a threshold is
                out of range, or fewer than the old root threshold of root
                private keys are present to sign.
            VerificationError: the new root would not verify as a successor.
        """
        old = self.trust_root()
        roles = {name: list(role.keyids) for name, role in old.roles.items()}
        new_thresholds = {name: role.threshold for name, role in old.roles.items()}
        new_thresholds.update(thresholds or {})
        keys = {kid: pub for kid, pub in old.keys.items()}
        removed: list[str] = []
        for prefix in remove:
            matches = [kid for kid in keys if kid.startswith(prefix.lower())]
            if len(prefix) < 8 or len(matches) != 1:
                raise KeyStoreError(
                    f"key id {prefix!r} matches {len(matches)} keys; give more digits"
                )
            removed.append(matches[0])
        for kid in removed:
            for ids in roles.values():
                if kid in ids:
                    ids.remove(kid)
            del keys[kid]
        # Old root keys sign before anything is generated or moved.
        old_root_signers = self.signing_keys(old.role("root").keyids)
        if len(old_root_signers) < old.role("root").threshold:
            raise KeyStoreError(
                f"need {old.role('root').threshold} root private keys of trust root "
                f"v{old.version} in {self.dir}, found {len(old_root_signers)}"
            )
        new_keys: list[SigningKey] = []
        for role, count in (add or {}).items():
            if role not in ("root", "release", "director"):
                raise KeyStoreError(f"unknown role {role!r}")
            for _ in range(count):
                key, _ = self._new_key(role)
                new_keys.append(key)
                roles.setdefault(role, []).append(key.keyid)
                keys[key.keyid] = key.public
        for role, ids in roles.items():
            thr = new_thresholds.get(role, 1)
            if not 1 <= thr <= len(ids):
                raise KeyStoreError(
                    f"role {role} would have {len(ids)} key(s) and threshold {thr}: "
                    "add keys or lower the threshold"
                )
        signed = {
            "_type": TRUST_ROOT_TYPE,
            "spec_version": 1,
            "version": old.version + 1,
            "expires": format_utc((now or utcnow()) + expires_in),
            "keys": {
                kid: {"keytype": "ed25519", "public": pub.to_b64()} for kid, pub in keys.items()
            },
            "roles": {
                role: {"keyids": ids, "threshold": new_thresholds.get(role, 1)}
                for role, ids in roles.items()
            },
        }
        new_root_ids = set(roles["root"])
        signers = {k.keyid: k for k in old_root_signers}
        for k in new_keys + self.signing_keys(roles["root"]):
            if k.keyid in new_root_ids:
                signers[k.keyid] = k
        candidate = sign_trust_root(signed, list(signers.values()))
        old.verify_successor(canonical.encode(candidate.to_dict()))
        root = self._publish(signed, list(signers.values()))
        revoked_dir = self.dir / "revoked"
        for kf in self.key_files():
            if kf.keyid in removed:
                revoked_dir.mkdir(exist_ok=True)
                kf.path.rename(revoked_dir / kf.path.name)
                pub = kf.path.with_name(kf.path.name + ".pub")
                pub.rename(revoked_dir / pub.name)
        return root

    def chain_since(self, version: int) -> list[bytes]:
        """The published trust roots after ``version``, oldest first.

        Raises:
            KeyStoreError: a version in between is missing from the history.
        """
        current = self.trust_root().version
        out = []
        for v in range(version + 1, current + 1):
            path = self.dir / f"trust-root.{v}.json"
            try:
                out.append(path.read_bytes())
            except FileNotFoundError:
                raise KeyStoreError(f"{path} is missing from the trust-root history") from None
        return out
