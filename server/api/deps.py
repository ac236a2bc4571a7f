"""Dependencies shared by every route: settings, a session, and the caller.

``SessionDep`` gives a session per request (closed afterwards; services
commit). ``Reader``, ``Publisher``, ``Operator`` and ``Admin`` authenticate
the bearer token (rate-limited per client IP) and check the role, so a route
states its permission in its signature and nowhere else. The permission is
also recorded on the route (``ROUTE_PERMISSIONS``) for the authorization
matrix test and docs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from server.services.tokens import Permission, Principal, authenticate, require_role
from server.settings import Settings

__all__ = ["Admin", "Operator", "Publisher", "Reader", "SessionDep", "SettingsDep", "permission"]

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


def client_address(request: Request) -> str:
    """The peer address (behind a proxy, configure the proxy to pass the real one)."""
    return request.client.host if request.client else "unknown"


def permission(level: Permission) -> Callable[..., Principal]:
    """A dependency that authenticates the caller and requires ``level``."""

    def dependency(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
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
