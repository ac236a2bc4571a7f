"""Registry signing and release: offline signatures and publishing.

Flow::

    manifest_bytes  (clients fetch the exact manifest to sign offline)
    add_signature   (verified against the trust root's release role; stored)
    publish         (threshold met -> final bundle written -> "published")

Invariants: only a version ``awaiting_signatures`` accepts signatures or is
published; a published version's bundle, manifest and signatures never change
(``publish`` twice answers 409). The bundle file is written atomically at its
final path before the row says "published", and its signatures verify
against the trust root (checked again on the written file).
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from sqlalchemy import update
from sqlalchemy.orm import Session

from edgefleet.errors import EdgefleetError, VerificationError
from edgefleet.manifest import Manifest
from edgefleet.release import attach_signatures
from edgefleet.trust import Signature, TrustRoot, read_header
from server.errors import (
    ConflictError,
    InvalidInputError,
    UnavailableError,
)
from server.models import ModelVersion, VersionSignature
from server.services import audit
from server.services.registry.catalog import (
    STATUS_AWAITING,
    STATUS_PUBLISHED,
    BuildError,
    _now,
    bundle_path,
    get_version,
)
from server.services.registry.keyring import load_trust_root
from server.settings import Settings


def manifest_bytes(session: Session, name: str, version: int) -> bytes:
    """The exact canonical manifest bytes release keys sign.

    Raises:
        NotFoundError: no such version.
        ConflictError: the version has no manifest yet (still building or failed).
    """
    row = get_version(session, name, version)
    if row.manifest is None:
        raise ConflictError(f"{name} version {version} has no manifest yet (status {row.status})")
    return bytes(row.manifest)


def _signatures(row: ModelVersion) -> list[Signature]:
    return [Signature(s.keyid, base64.b64decode(s.sig)) for s in row.signatures]


def _threshold_met(row: ModelVersion, root: TrustRoot) -> bool:
    if row.manifest is None:
        return False
    try:
        root.verify_role_signatures("release", bytes(row.manifest), _signatures(row))
    except VerificationError:
        return False
    return True


def add_signature(
    session: Session,
    settings: Settings,
    name: str,
    version: int,
    *,
    keyid: str,
    sig: str,
    actor: str,
) -> ModelVersion:
    """Verify and store one release signature over the version's manifest; commit.

    Raises:
        NotFoundError: no such version.
        ConflictError: the version is not awaiting signatures.
        InvalidInputError: the key is not a release key of the trust root, the
            signature is not base64, or it does not verify.
        UnavailableError: no trust root configured.
    """
    root = load_trust_root(settings)
    row = get_version(session, name, version)
    if row.status != STATUS_AWAITING:
        raise ConflictError(
            f"{name} version {version} is {row.status}; signatures are accepted only while "
            "awaiting_signatures"
        )
    assert row.manifest is not None
    if keyid not in root.role("release").keyids or keyid not in root.keys:
        raise InvalidInputError(
            f"key {keyid[:12]} is not a release key of trust root v{root.version}"
        )
    try:
        raw = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError("sig must be the base64 Ed25519 signature") from None
    if len(raw) != 64 or not root.keys[keyid].verify(raw, bytes(row.manifest)):
        raise InvalidInputError(
            f"the signature by {keyid[:12]} does not verify over this version's manifest "
            f"(sha256 {row.manifest_sha256})"
        )
    canonical_sig = base64.b64encode(raw).decode()
    existing = next((s for s in row.signatures if s.keyid == keyid), None)
    if existing is None:
        row.signatures.append(
            VersionSignature(keyid=keyid, sig=canonical_sig, added_by=actor, added_at=_now())
        )
    else:
        existing.sig, existing.added_by, existing.added_at = canonical_sig, actor, _now()
    audit.record(session, actor, "version.sign", f"model/{name}/{version}", {"keyid": keyid})
    session.commit()
    return row


def _publish_locked(
    session: Session, settings: Settings, row: ModelVersion, root: TrustRoot, actor: str
) -> None:
    name, version = row.model.name, row.version
    claimed = session.execute(
        update(ModelVersion)
        .where(ModelVersion.id == row.id, ModelVersion.status == STATUS_AWAITING)
        .values(status=STATUS_PUBLISHED, published_at=_now())
    )
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        raise ConflictError(f"{name} version {version} is already published or not ready")
    assert row.manifest is not None
    Manifest.from_bytes(bytes(row.manifest))  # refuse a corrupt stored manifest early
    signatures = _signatures(row)
    signed_by = root.verify_role_signatures("release", bytes(row.manifest), signatures)
    staged = bundle_path(settings, name, version, signed=False)
    final = bundle_path(settings, name, version)
    try:
        with open(staged, "rb") as fh:
            if read_header(fh).manifest_bytes != bytes(row.manifest):
                raise BuildError("the staged bundle does not carry the recorded manifest")
        attach_signatures(staged, signatures, final)
    except (OSError, EdgefleetError, BuildError) as exc:
        raise UnavailableError(
            f"cannot write the bundle of {name} version {version}: {exc}"
        ) from exc
    digest = hashlib.sha256()
    with open(final, "rb") as fh:
        check = read_header(fh)
        fh.seek(0)
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    size = final.stat().st_size
    root.verify_role_signatures("release", check.manifest_bytes, check.signatures)
    session.refresh(row)
    row.bundle_file = str(final.relative_to(settings.bundles_dir))
    row.bundle_sha256 = digest.hexdigest()
    row.bundle_size = size
    audit.record(
        session,
        actor,
        "version.publish",
        f"model/{name}/{version}",
        {"bundle_sha256": row.bundle_sha256, "size": size, "signed_by": sorted(signed_by)},
    )
    staged.unlink(missing_ok=True)


def publish(
    session: Session, settings: Settings, name: str, version: int, *, actor: str
) -> ModelVersion:
    """Write the signed bundle once the release threshold is met, and commit.

    Raises:
        NotFoundError: no such version.
        ConflictError: already published (immutable), not built yet, failed,
            or fewer valid release signatures than the threshold.
        UnavailableError: no trust root, or the bundle could not be written.
    """
    root = load_trust_root(settings)
    row = get_version(session, name, version)
    if row.status == STATUS_PUBLISHED:
        raise ConflictError(
            f"{name} version {version} is already published; versions are immutable"
        )
    if row.status != STATUS_AWAITING:
        raise ConflictError(f"{name} version {version} is {row.status}, not awaiting_signatures")
    if not _threshold_met(row, root):
        have = len(row.signatures)
        raise ConflictError(
            f"{name} version {version} has {have} valid release signature(s); trust root "
            f"v{root.version} needs {root.role('release').threshold}"
        )
    _publish_locked(session, settings, row, root, actor)
    session.commit()
    return row
