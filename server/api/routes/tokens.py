"""``/api/v1/tokens`` (admin) and ``/api/v1/whoami`` (any role)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from server.api import schemas
from server.api.deps import Admin, Reader, SessionDep
from server.models import ApiToken
from server.services import tokens

router = APIRouter(tags=["tokens"])


def _public(row: ApiToken) -> schemas.TokenPublic:
    return schemas.TokenPublic(
        id=row.id,
        name=row.name,
        role=row.role,
        prefix=row.prefix,
        created_at=row.created_at,
        created_by=row.created_by,
        revoked_at=row.revoked_at,
    )


@router.get("/whoami", response_model=schemas.WhoAmI)
def whoami(principal: Reader) -> schemas.WhoAmI:
    """The token's own identity and role."""
    return schemas.WhoAmI(
        token_id=principal.token_id, name=principal.name, role=principal.role.value
    )


@router.post("/tokens", response_model=schemas.TokenCreated, status_code=201)
def create_token(
    body: schemas.TokenCreate, session: SessionDep, principal: Admin
) -> schemas.TokenCreated:
    """Create a token; the plaintext appears only in this response."""
    row, plaintext = tokens.create_token(session, body.name, body.role, principal.actor)
    session.commit()
    return schemas.TokenCreated(**_public(row).model_dump(), token=plaintext)


@router.get("/tokens", response_model=list[schemas.TokenPublic])
def list_tokens(session: SessionDep, _: Admin) -> list[schemas.TokenPublic]:
    """Every token (never the token itself or its hash)."""
    return [_public(r) for r in tokens.list_tokens(session)]


@router.delete("/tokens/{token_id}", response_model=schemas.TokenPublic)
def revoke_token(
    token_id: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")], session: SessionDep, principal: Admin
) -> schemas.TokenPublic:
    """Revoke a token at once (on every replica: tokens are checked in the database)."""
    row = tokens.revoke_token(session, token_id, principal.actor)
    session.commit()
    return _public(row)
