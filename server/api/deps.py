"""Dependencies shared by every route: settings, a session, and the caller.

``SessionDep`` gives a session per request (closed afterwards; services
commit). ``Reader``, ``Publisher``, ``Operator`` and ``Admin`` authenticate
the bearer token (rate-limited per client IP) and check the role, so a route
states its permission in its signature and nowhere else. ``route_permission``
reads it back from a route's dependencies: the request guard
(``server.api.guard``, which authenticates requests that carry a body before
the body is read), the authorization matrix test and the docs all use it.
When the guard has authenticated the caller, the principal is in the scope
(``PRINCIPAL_SCOPE_KEY``) and the dependency checks its role without looking
the token up again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session
from starlette.types import Scope

from server.services.tokens import Permission, Principal, authenticate, require_role
from server.settings import Settings

__all__ = [
    "PRINCIPAL_SCOPE_KEY",
    "Admin",
    "Operator",
    "Publisher",
    "Reader",
    "SessionDep",
    "SettingsDep",
    "client_address",
    "permission",
    "route_permission",
    "scope_client",
]

PRINCIPAL_SCOPE_KEY = "edgefleet.principal"  # set by the request guard (server-side only)

_bearer = HTTPBearer(auto_error=False, description="an API token: 'Authorization: Bearer eft_...'")


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    factory: Callable[[], Session] = request.app.state.session_factory
    with factory() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]


def scope_client(scope: Scope) -> str:
    """The peer address: the rate-limit key (a trusted proxy's X-Forwarded-For, see
    ``forwarded_allow_ips``, is applied by uvicorn before the app sees it)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def client_address(request: Request) -> str:
    """The peer address of ``request`` (``scope_client``)."""
    return scope_client(request.scope)


def permission(level: Permission) -> Callable[..., Principal]:
    """A dependency that authenticates the caller and requires ``level``."""

    def dependency(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        principal = request.scope.get(PRINCIPAL_SCOPE_KEY)
        if not isinstance(principal, Principal):
            settings: Settings = request.app.state.settings
            principal = authenticate(
                request.app.state.session_factory,
                credentials.credentials if credentials else None,
                client_address(request),
                limit=settings.auth_failure_limit,
                window=settings.auth_failure_window_seconds,
            )
        require_role(principal, level)
        return principal

    dependency.permission = level  # type: ignore[attr-defined]
    return dependency


Reader = Annotated[Principal, Depends(permission(Permission.READ))]
Publisher = Annotated[Principal, Depends(permission(Permission.PUBLISH))]
Operator = Annotated[Principal, Depends(permission(Permission.OPERATE))]
Admin = Annotated[Principal, Depends(permission(Permission.ADMIN))]


def route_permission(route: Any) -> Permission | None:
    """The permission a route's dependencies require (None: public route)."""
    dependant = getattr(route, "dependant", None)
    stack = list(dependant.dependencies) if dependant is not None else []
    while stack:
        dep = stack.pop()
        level = getattr(dep.call, "permission", None)
        if level is not None:
            return Permission(level)
        stack.extend(dep.dependencies)
    return None
