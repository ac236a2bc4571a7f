"""Ed25519 keys: generation, key ids, and PEM files on disk.

A key id is the lowercase hex sha256 of the public key's DER SubjectPublicKeyInfo,
so anyone can recompute it with ``openssl pkey -pubin -outform DER | sha256sum``.
Private keys are PKCS#8 PEM files written atomically with mode 0600; when the
environment variable ``EDGEFLEET_KEY_PASSPHRASE`` is set they are encrypted with
it (and it is needed to load them).
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgefleet.errors import EdgefleetError
from edgefleet.fsutil import atomic_write_bytes

__all__ = [
    "PASSPHRASE_ENV",
    "KeyFileError",
    "PublicKey",
    "SigningKey",
    "generate",
    "load_signing_key",
]

PASSPHRASE_ENV = "EDGEFLEET_KEY_PASSPHRASE"


class KeyFileError(EdgefleetError, ValueError):
    """A key file is missing, unreadable, not Ed25519, or needs a passphrase."""


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key with its key id."""

    key: Ed25519PublicKey

    @property
    def spki_der(self) -> bytes:
        return self.key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def keyid(self) -> str:
        return hashlib.sha256(self.spki_der).hexdigest()

    def to_b64(self) -> str:
        return base64.b64encode(self.spki_der).decode("ascii")

    def to_pem(self) -> bytes:
        return self.key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @classmethod
    def from_b64(cls, text: str) -> PublicKey:
        """Parse a base64 DER SubjectPublicKeyInfo.

        Raises:
            ValueError: not base64, not DER, or not an Ed25519 key.
        """
        der = base64.b64decode(text, validate=True)
        key = serialization.load_der_public_key(der)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("public key is not Ed25519")
        return cls(key)

    def verify(self, signature: bytes, message: bytes) -> bool:
        """Return True if ``signature`` is this key's Ed25519 signature of ``message``."""
        try:
            self.key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key and where it came from."""

    key: Ed25519PrivateKey

    @property
    def public(self) -> PublicKey:
        return PublicKey(self.key.public_key())

    @property
    def keyid(self) -> str:
        return self.public.keyid

    def sign(self, message: bytes) -> bytes:
        return self.key.sign(message)

    def save(self, path: Path) -> None:
        """Write the private key (0600) and ``<path>.pub`` (PEM public key) atomically."""
        passphrase = os.environ.get(PASSPHRASE_ENV)
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase.encode())
            if passphrase
            else serialization.NoEncryption()
        )
        pem = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
        )
        atomic_write_bytes(path, pem, mode=0o600)
        atomic_write_bytes(path.with_name(path.name + ".pub"), self.public.to_pem(), mode=0o644)


def generate() -> SigningKey:
    """Return a fresh Ed25519 signing key."""
    return SigningKey(Ed25519PrivateKey.generate())


def load_signing_key(path: Path) -> SigningKey:
    """Load a PEM PKCS#8 Ed25519 private key.

    Raises:
        KeyFileError: missing/unreadable file, wrong or missing passphrase, not Ed25519.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from exc
    passphrase = os.environ.get(PASSPHRASE_ENV)
    try:
        key = serialization.load_pem_private_key(
            data, password=passphrase.encode() if passphrase else None
        )
    except TypeError as exc:
        raise KeyFileError(f"key file {path} is encrypted: set {PASSPHRASE_ENV}") from exc
    except ValueError as exc:
        raise KeyFileError(f"key file {path} is not a readable private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"key file {path} is not an Ed25519 key")
    return SigningKey(key)
