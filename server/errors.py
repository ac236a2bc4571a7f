"""Service-layer errors: each names the problem and carries its HTTP status.

Services raise these and nothing HTTP-specific; the API maps ``status`` to the
response code and ``str(error)`` to ``{"detail": ...}``, and the CLI prints the
same message. A service raises before it changes anything, so a rejected
request never damages an existing row.
"""

from __future__ import annotations

from edgefleet.errors import EdgefleetError

__all__ = [
    "AuthenticationError",
    "ConflictError",
    "ForbiddenError",
    "InvalidInputError",
    "NotFoundError",
    "PayloadTooLargeError",
    "RateLimitedError",
    "ServerError",
    "UnavailableError",
]


class ServerError(EdgefleetError):
    """Root of the server's deliberate errors (under the project's ``EdgefleetError``)."""

    status = 500


class InvalidInputError(ServerError):
    """The request is well formed but its content is not acceptable."""

    status = 422


class NotFoundError(ServerError):
    """The named model, version, job, device or token does not exist."""

    status = 404


class ConflictError(ServerError):
    """The request contradicts the current state (immutable version, duplicate id)."""

    status = 409


class AuthenticationError(ServerError):
    """No token, or a token that is unknown or revoked."""

    status = 401


class ForbiddenError(ServerError):
    """The token's role may not call this endpoint."""

    status = 403


class RateLimitedError(ServerError):
    """Too many failed authentications from this client; retry after ``retry_after`` s."""

    status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PayloadTooLargeError(ServerError):
    """An uploaded file exceeds ``max_upload_bytes``."""

    status = 413


class UnavailableError(ServerError):
    """A feature needs configuration or an optional package this server lacks."""

    status = 503
