"""The request guard: authentication and body limits before a body byte is read.

What flows through it: every HTTP request, before FastAPI's router (a pure
ASGI middleware, inside the latency metrics). FastAPI reads and parses a body
before it resolves any dependency, so a route's own token check comes too
late to spare the server an unauthenticated body; this layer decides first.
For each request it finds the route the router will pick (the same path
regexes and methods, in the same order) and that route's policy: the
permission its dependencies require (``deps.route_permission``, the one
source of truth), whether it takes a JSON or a multipart body, and its cap:
``max_upload_bytes`` times its file fields plus ``FORM_ALLOWANCE_BYTES`` for
a multipart route, ``max_json_body_bytes`` for every other one.

Guarantees, for a request that carries a body (``Content-Length`` above 0 or
``Transfer-Encoding``):

* To a route that needs a permission, the bearer token is checked first, by
  ``tokens.authenticate`` (the same per-IP failure limit) and
  ``require_role``. A refusal is the app's own ``{"detail": ...}`` 401 (with
  ``WWW-Authenticate``), 403 or 429 (with ``Retry-After``), sent before one
  byte of the body is read, with ``Connection: close`` so the server does not
  drain the rest. The principal goes to the route in the scope
  (``deps.PRINCIPAL_SCOPE_KEY``): the token is looked up once, and the
  route's dependency still checks the role.
* A ``Content-Length`` above the cap is 413 before the body is read.
* The body is counted as it arrives, whatever ``Content-Length`` claimed: a
  chunked or longer body is cut off with 413 as soon as it passes the cap.
  In a multipart upload, a file over ``max_upload_bytes`` is cut off the
  same way as soon as that file passes the limit (the parts are followed as
  they stream). Nothing beyond the cap plus one received chunk is read, and
  the app's answer to a cut-off body is replaced by the 413.
* A JSON body of a route that takes one is read whole (at most its cap) and
  must be UTF-8 (RFC 8259) without a lone surrogate in any key or string
  (``"\\ud800"`` decodes to text no database or JSON encoder can store; a
  pair such as ``"\\ud83d\\ude00"`` is one character and fine). Otherwise it
  is 422 naming the problem and where it is (``body.target.device``); the
  app then gets exactly the bytes that were checked.

Requests without a body pass untouched; public routes are never
authenticated here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import params
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.security.utils import get_authorization_scheme_param
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.deps import PRINCIPAL_SCOPE_KEY, route_permission, scope_client
from server.errors import RateLimitedError, ServerError
from server.services.tokens import Permission, Principal, authenticate, require_role
from server.settings import Settings

__all__ = ["FORM_ALLOWANCE_BYTES", "RequestGuard", "RoutePolicy", "error_response"]

FORM_ALLOWANCE_BYTES = 1 << 20  # a multipart body's non-file fields and part headers

BodyKind = Literal["json", "multipart", "none"]


def error_response(exc: ServerError, *, close: bool = False) -> JSONResponse:
    """``{"detail": message}`` with the error's status (and its 401/429 headers)."""
    headers: dict[str, str] = {}
    if isinstance(exc, RateLimitedError):
        headers["Retry-After"] = str(exc.retry_after)
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if close:
        headers["Connection"] = "close"
    return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers or None)


def _refusal(status: int, detail: str, *, close: bool) -> JSONResponse:
    return JSONResponse(
        {"detail": detail}, status_code=status, headers={"Connection": "close"} if close else None
    )


@dataclass(frozen=True)
class RoutePolicy:
    """What the guard enforces for one route (``route`` None: no route matches)."""

    route: APIRoute | None
    permission: Permission | None
    body: BodyKind
    file_fields: int = 0

    @classmethod
    def of(cls, route: APIRoute) -> RoutePolicy:
        fields = route.dependant.body_params
        if any(isinstance(f.field_info, params.Form) for f in fields):  # File is a Form
            files = sum(isinstance(f.field_info, params.File) for f in fields)
            return cls(route, route_permission(route), "multipart", files)
        return cls(route, route_permission(route), "json" if fields else "none")

    def limit(self, settings: Settings) -> int:
        """The most body bytes a request to this route may carry."""
        if self.body == "multipart":
            return settings.max_upload_bytes * self.file_fields + FORM_ALLOWANCE_BYTES
        return settings.max_json_body_bytes

    def what(self) -> str:
        """How the limit is made up, for the 413 message."""
        if self.body == "multipart":
            return f"{self.file_fields} files of max_upload_bytes and the form fields"
        return "max_json_body_bytes"


_UNMATCHED = RoutePolicy(None, None, "none")


class _BodyTooLarge(HTTPException):
    """Raised into the app from ``receive`` when the body passes a limit."""

    def __init__(self, detail: str) -> None:
        super().__init__(413, detail, headers={"Connection": "close"})


class _Disconnected(Exception):
    pass


class _FileParts:
    """Follows a streaming multipart body; notes the first file over ``limit`` bytes."""

    def __init__(self, boundary: bytes, limit: int) -> None:
        self.limit = limit
        self.problem: str | None = None
        self._field = b""
        self._value = b""
        self._disposition = b""
        self._name = ""
        self._is_file = False
        self._size = 0
        self._parser: MultipartParser | None = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._data,
            },
        )

    def _begin(self) -> None:
        self._disposition, self._is_file, self._size = b"", False, 0

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self._field.lower() == b"content-disposition":
            self._disposition = self._value
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._is_file = b"filename" in options  # as Starlette tells files from fields
        self._name = options.get(b"name", b"").decode("utf-8", "replace")

    def _data(self, data: bytes, start: int, end: int) -> None:
        if not self._is_file:
            return
        self._size += end - start
        if self._size > self.limit and self.problem is None:
            self.problem = (
                f"the file field {self._name!r} is larger than the limit of {self.limit} "
                "bytes (max_upload_bytes)"
            )

    def feed(self, chunk: bytes) -> str | None:
        """Follow ``chunk``; return the problem once a file is over the limit."""
        if self._parser is not None:
            try:
                self._parser.write(chunk)
            except Exception:  # malformed: the form parser behind us refuses it (400)
                self._parser = None
        return self.problem


class _Body:
    """The request's ``receive``, counted against the caps."""

    def __init__(self, receive: Receive, limit: int, what: str, parts: _FileParts | None) -> None:
        self._receive = receive
        self.limit = limit
        self.what = what
        self.parts = parts
        self.total = 0
        self.exceeded: str | None = None

    async def receive(self) -> Message:
        if self.exceeded is not None:
            raise _BodyTooLarge(self.exceeded)
        message = await self._receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            self.total += len(chunk)
            if self.total > self.limit:
                self.exceeded = (
                    f"the request body is larger than the limit of {self.limit} bytes for "
                    f"this route ({self.what})"
                )
            elif self.parts is not None:
                self.exceeded = self.parts.feed(chunk)
            if self.exceeded is not None:
                raise _BodyTooLarge(self.exceeded)
        return message

    async def read_all(self) -> bytes:
        """The whole body (raises ``_BodyTooLarge`` past the cap, ``_Disconnected``)."""
        chunks = []
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)


# ------------------------------------------------------------------ JSON text

_SURROGATE = re.compile("[\ud800-\udfff]")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _key_path(path: str, key: str) -> str:
    if _IDENTIFIER.fullmatch(key):
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key)}]"  # ASCII: a surrogate shows as its \\u escape


def _lone_surrogate(value: Any) -> str | None:
    """Where the first lone surrogate of a parsed JSON value is (``body.a[2]``), or None."""
    stack: list[tuple[Any, str]] = [(value, "body")]
    while stack:  # iterative: a deeply nested body cannot exhaust the stack
        item, path = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found:
                return f"{path} (\\u{ord(found.group()):04x})"
        elif isinstance(item, dict):
            children = []
            for key, child in item.items():
                where = _key_path(path, key)
                found = _SURROGATE.search(key)
                if found:
                    return f"{where} (\\u{ord(found.group()):04x} in a key)"
                children.append((child, where))
            stack.extend(reversed(children))
        elif isinstance(item, list):
            stack.extend(reversed([(child, f"{path}[{i}]") for i, child in enumerate(item)]))
    return None


def json_body_problem(data: bytes) -> str | None:
    """Why a JSON request body is refused (422), or None to let the route judge it.

    UTF-8 only: ``json.loads`` would also take UTF-16 and UTF-32 (and pass
    their lone surrogates through). Text that is not JSON at all is left to
    the route, which names the JSON error.
    """
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return (
            f"the request body is not UTF-8 (byte {exc.start}: {exc.reason}); "
            "send JSON encoded as UTF-8"
        )
    if json.detect_encoding(data) not in ("utf-8", "utf-8-sig"):
        return "the request body is not UTF-8 (it looks like UTF-16 or UTF-32); send UTF-8"
    if b"\\u" not in data:
        return None  # valid UTF-8 has no surrogates: only a \u escape can make one
    try:
        value = json.loads(data)  # the very parse the route does
    except (ValueError, RecursionError):
        return None
    where = _lone_surrogate(value)
    if where is None:
        return None
    return (
        f"the request body holds a lone surrogate at {where}: text must be valid Unicode "
        "(a surrogate pair such as \\ud83d\\ude00 is one character and fine)"
    )


# ------------------------------------------------------------------ middleware


def _route_path(scope: Scope) -> str:
    """The path the router matches (``root_path`` removed), as Starlette computes it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (path == root or path[len(root)] == "/"):
        return path[len(root) :]
    return path


def _content_length(headers: Headers) -> int | None:
    value = headers.get("content-length")
    if value is None or not value.strip().isdigit():
        return None  # absent, or invalid (the HTTP server refuses those itself)
    return int(value)


def _replay(data: bytes, receive: Receive) -> Receive:
    """A ``receive`` that delivers ``data`` whole, then what the connection says."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": data, "more_body": False}
        return await receive()

    return replay


def _authorize(state: Any, scope: Scope, headers: Headers, level: Permission) -> Principal:
    """The route's own check: ``deps.permission`` (bearer token, rate limit, role)."""
    settings: Settings = state.settings
    scheme, credentials = get_authorization_scheme_param(headers.get("authorization"))
    token = credentials if scheme.lower() == "bearer" and credentials else None
    principal = authenticate(
        state.session_factory,
        token,
        scope_client(scope),
        limit=settings.auth_failure_limit,
        window=settings.auth_failure_window_seconds,
    )
    require_role(principal, level)
    return principal


class RequestGuard:
    """Pure ASGI middleware enforcing the module's guarantees (``app.add_middleware``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._table: list[tuple[re.Pattern[str], frozenset[str], RoutePolicy]] | None = None

    def _build(
        self, routes: Sequence[Any]
    ) -> list[tuple[re.Pattern[str], frozenset[str], RoutePolicy]]:
        table = []
        for ctx in iter_route_contexts(routes):
            route = ctx.original_route
            if isinstance(route, APIRoute):
                table.append((ctx.path_regex, frozenset(ctx.methods or ()), RoutePolicy.of(route)))
        return table

    def policy(self, scope: Scope) -> RoutePolicy:
        """The policy of the route the router will pick for ``scope`` (first full match)."""
        if self._table is None:
            self._table = self._build(scope["app"].routes)
        path, method = _route_path(scope), scope["method"]
        for regex, methods, policy in self._table:
            if method in methods and regex.match(path):
                return policy
        return _UNMATCHED

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        length = _content_length(headers)
        if not length and "transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body: the route's dependencies decide
            return
        state = scope["app"].state
        settings: Settings = state.settings
        policy = self.policy(scope)

        async def refuse(response: JSONResponse) -> None:
            if policy.route is not None:
                scope["route"] = policy.route  # the latency metric's label
            await response(scope, receive, send)

        if policy.permission is not None:
            try:
                principal = await run_in_threadpool(
                    _authorize, state, scope, headers, policy.permission
                )
            except ServerError as exc:
                await refuse(error_response(exc, close=True))
                return
            scope[PRINCIPAL_SCOPE_KEY] = principal
        limit = policy.limit(settings)
        if length is not None and length > limit:
            await refuse(
                _refusal(
                    413,
                    f"the request body of {length} bytes is larger than the limit of {limit} "
                    f"bytes for this route ({policy.what()})",
                    close=True,
                )
            )
            return
        parts = None
        if policy.body == "multipart":
            content_type, options = parse_options_header(headers.get("content-type", ""))
            if content_type == b"multipart/form-data" and options.get(b"boundary"):
                parts = _FileParts(options[b"boundary"], settings.max_upload_bytes)
        body = _Body(receive, limit, policy.what(), parts)

        if policy.body == "json":
            try:
                data = await body.read_all()
            except _BodyTooLarge as exc:
                await refuse(_refusal(413, exc.detail, close=True))
                return
            except _Disconnected:
                return
            problem = json_body_problem(data)
            if problem is not None:
                await refuse(_refusal(422, problem, close=False))
                return
            await self.app(scope, _replay(data, receive), send)
            return
        await self._streamed(scope, body, send, refuse)

    async def _streamed(
        self,
        scope: Scope,
        body: _Body,
        send: Send,
        refuse: Callable[[JSONResponse], Any],
    ) -> None:
        """Run the app on the counted body; a cut-off body's answer is our 413."""
        started = False
        replaced = False

        async def guarded_send(message: Message) -> None:
            nonlocal started, replaced
            if body.exceeded is not None and not started:
                if not replaced:
                    replaced = True
                    await refuse(_refusal(413, body.exceeded, close=True))
                return  # the app's own answer to the cut-off body is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, body.receive, guarded_send)
        except Exception:
            if body.exceeded is None or started:
                raise
        if body.exceeded is not None and not started and not replaced:
            await refuse(_refusal(413, body.exceeded, close=True))
