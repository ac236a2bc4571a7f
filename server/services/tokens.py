"""API tokens, roles, and rate limiting of failed authentications.

Flow: ``create_token`` returns the plaintext token once and stores only its
sha256; ``authenticate`` checks the client's recent failures, then looks the
token's hash up; a miss is recorded in ``auth_failures`` (committed on its own,
so the record survives the failed request). ``require_role`` decides whether a
role may call an endpoint of a given permission level.

Invariants: a plaintext token never reaches the database or the audit log
(tokens carry 256 bits of randomness, so a fast hash cannot be brute-forced);
the failure counter lives in the database, so the limit holds across replicas;
once a client IP exceeds ``limit`` failures in ``window`` seconds, every token
from it (valid or not) is refused with 429 until the window has passed.
"""

from __future__ import annotations

import enum
import hashlib
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from server.errors import (
    AuthenticationError,
    ConflictError,
    ForbiddenError,
    InvalidInputError,
    NotFoundError,
    RateLimitedError,
)
from server.models import ApiToken, AuthFailure
from server.services import audit

__all__ = [
    "TOKEN_PREFIX",
    "Permission",
    "Principal",
    "Role",
    "allowed_roles",
    "authenticate",
    "create_token",
    "has_admin",
    "hash_token",
    "list_tokens",
    "record_failure",
    "require_role",
    "revoke_token",
]

TOKEN_PREFIX = "eft_"


class Role(str, enum.Enum):
    """What a token may do (see ``allowed_roles``)."""

    ADMIN = "admin"
    PUBLISHER = "publisher"
    OPERATOR = "operator"
    VIEWER = "viewer"


class Permission(str, enum.Enum):
    """The permission level an endpoint requires."""

    READ = "read"  # every role
    PUBLISH = "publish"  # registry changes: publisher, admin
    OPERATE = "operate"  # fleet changes: operator, admin
    ADMIN = "admin"  # tokens, audit log: admin


_ALLOWED: dict[Permission, frozenset[Role]] = {
    Permission.READ: frozenset(Role),
    Permission.PUBLISH: frozenset({Role.PUBLISHER, Role.ADMIN}),
    Permission.OPERATE: frozenset({Role.OPERATOR, Role.ADMIN}),
    Permission.ADMIN: frozenset({Role.ADMIN}),
}


def allowed_roles(permission: Permission) -> frozenset[Role]:
    """The roles that hold ``permission``."""
    return _ALLOWED[permission]


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    token_id: str
    name: str
    role: Role

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return f"token:{self.name}"


def hash_token(token: str) -> str:
    """The stored form of a token (hex sha256)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _now() -> datetime:
    return datetime.now(timezone.utc)


def create_token(session: Session, name: str, role: Role | str, actor: str) -> tuple[ApiToken, str]:
    """Create a token; return its row and the plaintext (shown once).

    Raises:
        InvalidInputError: unknown role or a name outside 1-64 printable characters.
        ConflictError: an active token already has this name.
    """
    try:
        role = Role(role)
    except ValueError:
        raise InvalidInputError(
            f"unknown role {role!r}: use one of {', '.join(r.value for r in Role)}"
        ) from None
    if not 1 <= len(name) <= 64 or not name.isprintable():
        raise InvalidInputError("token name must be 1-64 printable characters")
    clash = session.scalar(
        select(ApiToken).where(ApiToken.name == name, ApiToken.revoked_at.is_(None))
    )
    if clash is not None:
        raise ConflictError(f"an active token named {name!r} exists; revoke it first")
    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(
        id=uuid.uuid4().hex,
        name=name,
        role=role.value,
        token_hash=hash_token(plaintext),
        prefix=plaintext[:10],
        created_at=_now(),
        created_by=actor,
    )
    session.add(row)
    session.flush()
    audit.record(
        session, actor, "token.create", f"token/{row.id}", {"name": name, "role": role.value}
    )
    return row, plaintext


def list_tokens(session: Session) -> list[ApiToken]:
    """Every token, newest first (hashes are never exposed by callers)."""
    return list(session.scalars(select(ApiToken).order_by(ApiToken.created_at.desc())).all())


def revoke_token(session: Session, token_id: str, actor: str) -> ApiToken:
    """Revoke a token (idempotent for an already revoked one).

    Raises:
        NotFoundError: no such token.
        ConflictError: it is the last active admin token (the server refuses to
            start without one, and nobody could create another).
    """
    row = session.get(ApiToken, token_id)
    if row is None:
        raise NotFoundError(f"no token with id {token_id!r}")
    if row.revoked_at is None and row.role == Role.ADMIN.value:
        # Lock every active admin token: two revocations at once cannot both pass.
        active = session.scalars(
            select(ApiToken.id)
            .where(ApiToken.role == Role.ADMIN.value, ApiToken.revoked_at.is_(None))
            .with_for_update()
        ).all()
        if set(active) <= {row.id}:
            raise ConflictError(
                f"token {row.name!r} is the last active admin token: create another admin "
                "token first"
            )
    if row.revoked_at is None:
        row.revoked_at = _now()
        audit.record(session, actor, "token.revoke", f"token/{row.id}", {"name": row.name})
    return row


def has_admin(session: Session) -> bool:
    """True when at least one active admin token exists."""
    return (
        session.scalar(
            select(ApiToken.id)
            .where(ApiToken.role == Role.ADMIN.value, ApiToken.revoked_at.is_(None))
            .limit(1)
        )
        is not None
    )


def _recent_failures(session: Session, client: str, since: datetime) -> tuple[int, datetime | None]:
    count, oldest = session.execute(
        select(func.count(), func.min(AuthFailure.at)).where(
            AuthFailure.client == client, AuthFailure.at > since
        )
    ).one()
    return int(count or 0), oldest


def record_failure(
    session: Session, client: str, window: int, *, now: datetime | None = None
) -> None:
    """Record one failed authentication and prune rows older than the window."""
    now = now or _now()
    session.execute(delete(AuthFailure).where(AuthFailure.at <= now - timedelta(seconds=window)))
    session.add(AuthFailure(client=client[:64], at=now))


def authenticate(
    session_factory: Callable[[], Session],
    token: str | None,
    client: str,
    *,
    limit: int,
    window: int,
    now: datetime | None = None,
) -> Principal:
    """Resolve a bearer token to its principal.

    Args:
        session_factory: opens short sessions (a failure is committed on its own).
        token: the presented token, or None when the header is missing.
        client: the client's address (rate limiting key).
        limit: failures allowed per client within ``window``.
        window: seconds.
        now: the current time (tests).

    Raises:
        RateLimitedError: the client has ``limit`` recent failures.
        AuthenticationError: no token, or unknown or revoked.
    """
    now = now or _now()
    since = now - timedelta(seconds=window)
    with session_factory() as session:
        failures, oldest = _recent_failures(session, client, since)
        if failures >= limit:
            retry = window
            if oldest is not None:
                retry = max(1, int((oldest + timedelta(seconds=window) - now).total_seconds()) + 1)
            raise RateLimitedError(
                f"too many failed authentications from {client}; retry in {retry} s", retry
            )
        if token is None:
            raise AuthenticationError("missing bearer token: send 'Authorization: Bearer <token>'")
        row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))
        if row is not None and row.revoked_at is None:
            return Principal(row.id, row.name, Role(row.role))
    with session_factory() as session, session.begin():
        record_failure(session, client, window, now=now)
    raise AuthenticationError("invalid or revoked token")


def require_role(principal: Principal, permission: Permission) -> None:
    """Allow the call or raise.

    Raises:
        ForbiddenError: the principal's role lacks ``permission``.
    """
    if principal.role not in _ALLOWED[permission]:
        roles = ", ".join(sorted(r.value for r in _ALLOWED[permission]))
        raise ForbiddenError(
            f"role {principal.role.value!r} may not do this; it needs one of: {roles}"
        )
