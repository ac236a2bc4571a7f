"""API hardening (issue 9, findings 4-7) on a real uvicorn server and a real SQLite file.

* Bodies before authentication: a request with a body to a protected route is
  authenticated (401/403/429) before one byte of its body is read; a
  ``Content-Length`` over the route's cap is 413 before the body; a chunked or
  lying body is cut off with 413 once it passes the cap; one uploaded file
  over ``max_upload_bytes`` is cut off near that size. Each test measures what
  the server really took: ``BodyCounter`` counts the body bytes uvicorn handed
  to the application, ``exchange`` counts what the client's socket could push
  before the server answered (bounded by the kernel's socket buffers), and the
  JSON test reads the peak RSS of a real ``edgefleet server run`` process.
* JSON bodies of write routes: UTF-8 only, and a lone surrogate anywhere is 422
  naming where it is (it was a plain-text 500), a surrogate pair is accepted.
* ``X-Forwarded-For`` is believed only from ``forwarded_allow_ips``.
* ``server init --json`` creates a missing ``data_dir`` and reports any failure
  as one JSON object.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy import select as sql_select

from edgefleet.cli import main
from server.cli import uvicorn_config
from server.db import make_engine, session_factory, upgrade_schema
from server.models import AuthFailure
from server.settings import Settings, load_settings
from tests.mosquitto import free_port
from tests.server.conftest import (
    Api,
    Keys,
    bootstrap_tokens,
    make_api,
    make_settings,
    onnx_model,
    run_jobs,
    upload,
)

KiB, MiB = 1 << 10, 1 << 20
MAX_UPLOAD = 1 * MiB  # max_upload_bytes of the live server
MAX_JSON = 64 * KiB  # max_json_body_bytes of the live server
UPLOAD_FILE_FIELDS = 5  # model, calib, eval, health_check, drift_reference
FORM_ALLOWANCE = 1 * MiB  # documented allowance for the non-file form fields
UPLOAD = "/api/v1/models/m/versions"
BOUNDARY = "edgefleet-hardening-boundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
SNDBUF = 64 * KiB  # the raw client's socket send buffer (the kernel doubles it)
HANG_GUARD_S = 30.0  # a test fails instead of hanging when the server never answers


def _tcp_buffer_max() -> int:
    """The largest receive buffer Linux may give the server's socket (tcp_rmem max)."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 6 * MiB


# What a client can push into a server that reads nothing more: the server's
# receive buffer, our send buffer, and uvicorn's own read-ahead (64 KiB high
# water mark plus one read).
SOCKET_SLACK = _tcp_buffer_max() + 4 * SNDBUF + 1 * MiB
# A rejected body much larger than that slack, so "read it all" cannot pass.
BIG = 2 * SOCKET_SLACK + 64 * MiB


# ------------------------------------------------------------------ servers


class BodyCounter:
    """ASGI wrapper between uvicorn and the app: counts the request-body bytes the app took."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.bytes = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counted() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                self.bytes += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


class Live:
    """The app on a real uvicorn, configured by ``server run``'s own ``uvicorn_config``."""

    def __init__(self, api: Api) -> None:
        import uvicorn

        self.api = api
        self.counter = BodyCounter(api.app)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn_config(self.counter, api.settings, host="127.0.0.1", port=self.port)
        config.log_level = "warning"
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Live:
        self.thread.start()
        deadline = time.monotonic() + HANG_GUARD_S
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(HANG_GUARD_S)

    def auth(self, role: str) -> dict[str, str]:
        return self.api.headers(role)


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[tuple[str, Engine]]:
    url = f"sqlite:///{tmp_path / 'edgefleet.db'}"
    engine = make_engine(url)
    upgrade_schema(engine)
    yield url, engine
    engine.dispose()


def _live(tmp_path: Path, sqlite: tuple[str, Engine], keys: Keys, **overrides: Any) -> Live:
    url, engine = sqlite
    values: dict[str, Any] = {
        "max_upload_bytes": MAX_UPLOAD,
        "max_json_body_bytes": MAX_JSON,
        "auth_failure_limit": 1000,
    }
    values.update(overrides)
    return Live(make_api(make_settings(tmp_path, url, keys, **values), engine))


@pytest.fixture
def live(tmp_path: Path, sqlite_engine: tuple[str, Engine], keys: Keys) -> Iterator[Live]:
    with _live(tmp_path, sqlite_engine, keys) as server:
        yield server


# ------------------------------------------------------------- raw client


@dataclass
class Exchange:
    status: int | None  # None: the server closed without an answer
    headers: dict[str, str]
    body: bytes
    sent: int  # bytes after the request head that the server's socket accepted

    def json(self) -> Any:
        return json.loads(self.body)


def _response_complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def _parse_response(data: bytes) -> tuple[int | None, dict[str, str], bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return None, {}, b""
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def exchange(
    port: int,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: Iterable[bytes] = (),
    content_length: int | None = None,
) -> Exchange:
    """Send a request head, then stream ``body`` until the server answers or closes.

    With ``content_length`` None the body goes chunked. Like a real client,
    it stops sending as soon as the server answers; ``sent`` is what the
    server's socket accepted by then.
    """
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if content_length is None:
        lines.append("Transfer-Encoding: chunked")
    else:
        lines.append(f"Content-Length: {content_length}")

    def frames() -> Iterator[bytes]:
        for piece in body:
            if content_length is None:
                yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
            else:
                yield piece
        if content_length is None:
            yield b"0\r\n\r\n"

    sock = socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_S)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        sock.setblocking(False)
        wire = frames()
        pending, sent, sending = b"", 0, True
        received = bytearray()
        while True:
            if sending and not pending:
                pending = next(wire, b"")
                sending = bool(pending)
            readable, writable, _ = select.select(
                [sock], [sock] if sending else [], [], HANG_GUARD_S
            )
            if not readable and not writable:
                raise TimeoutError(f"no answer and no progress for {HANG_GUARD_S} s")
            if readable:
                try:
                    data = sock.recv(1 << 16)
                except ConnectionResetError:
                    break
                if not data:
                    break
                received += data
                sending = False  # answered: stop sending, read the rest
                if _response_complete(bytes(received)):
                    break
                continue
            try:
                n = sock.send(pending)
            except (BrokenPipeError, ConnectionResetError):
                sending = False
                continue
            sent += n
            pending = pending[n:]
    finally:
        sock.close()
    status, response_headers, response_body = _parse_response(bytes(received))
    return Exchange(status, response_headers, response_body, sent)


def upload_body(size: int, name: str = "model") -> tuple[int, Iterator[bytes]]:
    """A multipart body with one file field of ``size`` bytes: (length, chunks)."""
    head = (
        f"--{BOUNDARY}\r\n"
        f'Content-Disposition: form-data; name="{name}"; filename="{name}.onnx"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    form = (
        f"\r\n--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="signing"\r\n\r\noffline'
        f"\r\n--{BOUNDARY}--\r\n"
    ).encode()

    def chunks() -> Iterator[bytes]:
        yield head
        block = b"\0" * MiB
        left = size
        while left:
            n = min(left, MiB)
            yield block[:n]
            left -= n
        yield form

    return len(head) + size + len(form), chunks()


def json_body(size: int) -> tuple[int, Iterator[bytes]]:
    """``{"name": "xxx...", "role": "viewer"}`` of about ``size`` bytes: (length, chunks)."""
    head, tail = b'{"name": "', b'", "role": "viewer"}'

    def chunks() -> Iterator[bytes]:
        yield head
        block = b"x" * (64 * KiB)
        left = size
        while left:
            n = min(left, len(block))
            yield block[:n]
            left -= n
        yield tail

    return len(head) + size + len(tail), chunks()


# ------------------------------------------- finding 4: bodies before auth


CALLERS = {
    "no token": ({}, 401),
    "unknown token": ({"Authorization": "Bearer eft_not-a-token"}, 401),
    "viewer token": (None, 403),  # a valid token whose role may not upload
}


@pytest.mark.parametrize(
    "caller, framing",
    [
        ("no token", "content-length"),
        ("no token", "chunked"),
        ("unknown token", "content-length"),
        ("viewer token", "content-length"),
    ],
)
def test_upload_refused_by_auth_before_its_body_is_read(
    live: Live, caller: str, framing: str
) -> None:
    headers, status = CALLERS[caller]
    headers = dict(live.auth("viewer") if headers is None else headers)
    length, chunks = upload_body(BIG)
    assert length > MAX_UPLOAD * UPLOAD_FILE_FIELDS + FORM_ALLOWANCE  # over every cap, too
    ex = exchange(
        live.port,
        "POST",
        UPLOAD,
        headers={**headers, "Content-Type": MULTIPART},
        body=chunks,
        content_length=length if framing == "content-length" else None,
    )
    assert ex.status == status, ex
    assert isinstance(ex.json()["detail"], str)
    if status == 401:
        assert ex.headers["www-authenticate"] == "Bearer"
    else:
        assert "viewer" in ex.json()["detail"]
    assert live.counter.bytes == 0  # the app took no byte of the body
    assert ex.sent <= SOCKET_SLACK < length // 2  # only what the socket buffers hold


def test_rate_limited_client_is_refused_before_its_body_is_read(
    tmp_path: Path, sqlite_engine: tuple[str, Engine], keys: Keys
) -> None:
    with _live(tmp_path, sqlite_engine, keys, auth_failure_limit=2) as server:
        for _ in range(2):
            r = httpx.get(
                f"{server.url}/api/v1/whoami", headers={"Authorization": "Bearer eft_wrong"}
            )
            assert r.status_code == 401
        length, chunks = upload_body(BIG)
        ex = exchange(
            server.port,
            "POST",
            UPLOAD,
            headers={**server.auth("publisher"), "Content-Type": MULTIPART},
            body=chunks,
            content_length=length,
        )
        assert ex.status == 429, ex
        assert int(ex.headers["retry-after"]) >= 1
        assert "too many failed authentications" in ex.json()["detail"]
        assert server.counter.bytes == 0
        assert ex.sent <= SOCKET_SLACK


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * KiB
    raise AssertionError("no VmHWM in /proc/PID/status")


class ServerProcess:
    """``edgefleet server run --config FILE [ARGS]`` in its own process, on SQLite."""

    def __init__(self, tmp: Path, keys: Keys, *args: str, **settings: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.database_url = f"sqlite:///{tmp / 'server-process.db'}"
        engine = make_engine(self.database_url)
        upgrade_schema(engine)
        self.tokens = bootstrap_tokens(session_factory(engine))
        engine.dispose()
        values: dict[str, Any] = {
            "env": "production",
            "data_dir": str(tmp / "server-process"),
            "database_url": self.database_url,
            "trust_root": str(keys.trust_root),
            "worker_enabled": False,
            "mqtt_enabled": False,
            "host": "127.0.0.1",
            "port": self.port,
        }
        values.update(settings)
        config = tmp / "server-process.toml"
        config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
        self.log = (tmp / "server-process.log").open("wb")
        argv = [sys.executable, "-m", "edgefleet.cli", "server", "run", "--config", str(config)]
        self.proc = subprocess.Popen(
            [*argv, *args],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + HANG_GUARD_S
        while True:
            assert self.proc.poll() is None, (tmp / "server-process.log").read_text()
            assert time.monotonic() < deadline, "edgefleet server run did not start"
            try:
                if httpx.get(f"{self.url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(HANG_GUARD_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def auth_failure_clients(self) -> set[str]:
        engine = make_engine(self.database_url)
        try:
            with session_factory(engine)() as session:
                return set(session.scalars(sql_select(AuthFailure.client)).all())
        finally:
            engine.dispose()


def test_big_json_body_without_token_leaves_server_memory_flat(tmp_path: Path, keys: Keys) -> None:
    server = ServerProcess(tmp_path, keys)
    try:
        warm_length, warm = json_body(16)
        ex = exchange(server.port, "POST", "/api/v1/tokens", body=warm, content_length=warm_length)
        assert ex.status == 401, ex  # warms up the auth path (imports, first query)
        before = _peak_rss(server.proc.pid)
        size = 64 * MiB
        length, chunks = json_body(size)
        ex = exchange(
            server.port,
            "POST",
            "/api/v1/tokens",
            headers={"Content-Type": "application/json"},
            body=chunks,
            content_length=length,
        )
        assert ex.status == 401, ex
        assert "missing bearer token" in ex.json()["detail"]
        grown = _peak_rss(server.proc.pid) - before
        assert grown < size // 8, f"peak RSS grew by {grown >> 20} MiB for a rejected body"
    finally:
        server.close()


def test_chunked_json_body_over_the_cap_is_cut_off_with_413(live: Live) -> None:
    _, chunks = json_body(16 * MAX_JSON)
    ex = exchange(
        live.port,
        "POST",
        "/api/v1/tokens",
        headers={**live.auth("admin"), "Content-Type": "application/json"},
        body=chunks,
        content_length=None,
    )
    assert ex.status == 413, ex
    assert f"{MAX_JSON} bytes" in ex.json()["detail"]
    assert live.counter.bytes <= MAX_JSON + 128 * KiB  # the cap plus at most one read


def test_body_longer_than_its_content_length_is_cut_off_at_the_cap(
    tmp_path: Path, sqlite_engine: tuple[str, Engine], keys: Keys
) -> None:
    """A body that lies about its length is cut off by what arrives, not by what it claims.

    uvicorn (h11) already stops a body at its ``Content-Length``, so this one
    drives the real app over ASGI directly, as a server that trusted the
    client would.
    """
    import anyio

    url, engine = sqlite_engine
    api = make_api(make_settings(tmp_path, url, keys, max_json_body_bytes=MAX_JSON), engine)
    pieces = [b'{"name": "', *([b"x" * (16 * KiB)] * 64), b'", "role": "viewer"}']
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if not pieces:
            return {"type": "http.disconnect"}
        piece = pieces.pop(0)
        pulled += len(piece)
        return {"type": "http.request", "body": piece, "more_body": bool(pieces)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/v1/tokens",
        "raw_path": b"/api/v1/tokens",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-length", b"100"),  # the lie
            (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {api.tokens['admin']}".encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }
    anyio.run(api.app, scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 413
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert f"{MAX_JSON} bytes" in json.loads(body)["detail"]
    assert pulled <= MAX_JSON + 16 * KiB


@pytest.mark.parametrize(
    "path, role, cap",
    [
        ("/api/v1/tokens", "admin", MAX_JSON),
        (UPLOAD, "publisher", UPLOAD_FILE_FIELDS * MAX_UPLOAD + FORM_ALLOWANCE),
        ("/api/v1/models/m/versions/1/publish", "publisher", MAX_JSON),  # a route without a body
    ],
)
def test_authenticated_content_length_over_the_cap_is_refused_before_the_body(
    live: Live, path: str, role: str, cap: int
) -> None:
    ex = exchange(
        live.port,
        "POST",
        path,
        headers={**live.auth(role), "Content-Type": MULTIPART if path == UPLOAD else "x/y"},
        body=(),  # nothing but the head is ever sent
        content_length=cap + 1,
    )
    assert ex.status == 413, ex
    assert f"limit of {cap} bytes" in ex.json()["detail"]
    assert ex.headers.get("connection") == "close"
    assert live.counter.bytes == 0


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_authenticated_upload_over_max_upload_bytes_stops_near_the_limit(
    live: Live, framing: str
) -> None:
    length, chunks = upload_body(4 * MAX_UPLOAD)
    assert length < UPLOAD_FILE_FIELDS * MAX_UPLOAD  # under the route's cap: one file is too big
    ex = exchange(
        live.port,
        "POST",
        UPLOAD,
        headers={**live.auth("publisher"), "Content-Type": MULTIPART},
        body=chunks,
        content_length=length if framing == "content-length" else None,
    )
    assert ex.status == 413, ex
    detail = ex.json()["detail"]
    assert "'model'" in detail and f"{MAX_UPLOAD} bytes" in detail
    assert live.counter.bytes <= MAX_UPLOAD + 256 * KiB
    uploads = live.api.settings.uploads_dir
    assert not uploads.exists() or not any(p.is_file() for p in uploads.rglob("*"))


def test_upload_of_exactly_max_upload_bytes_reaches_the_service(live: Live) -> None:
    """The limit is inclusive, as the service's own check: the model is then judged (422)."""
    length, chunks = upload_body(MAX_UPLOAD)
    ex = exchange(
        live.port,
        "POST",
        UPLOAD,
        headers={**live.auth("publisher"), "Content-Type": MULTIPART},
        body=chunks,
        content_length=length,
    )
    assert ex.status == 422, ex  # not an ONNX model: the service read it
    assert "model file" in ex.json()["detail"]


def test_real_upload_through_the_live_server_still_works(live: Live) -> None:
    r = httpx.post(
        f"{live.url}{UPLOAD}",
        headers=live.auth("publisher"),
        files={"model": ("model.onnx", onnx_model(), "application/octet-stream")},
        data={"signing": "offline"},
    )
    assert r.status_code == 202, r.text
    r = httpx.post(
        f"{live.url}/api/v1/tokens",
        headers=live.auth("admin"),
        json={"name": "live", "role": "viewer"},
    )
    assert r.status_code == 201, r.text


# ---------------------------------------- finding 5: lone surrogates -> 422


def _escaped(text: str) -> bytes:
    return text.encode("ascii")  # the JSON text itself carries the \\u escapes


SURROGATE_CASES = [
    ("POST", "/api/v1/tokens", r'{"name": "\ud800", "role": "viewer"}', "body.name"),
    ("POST", "/api/v1/devices", r'{"device_class": "cam\udc00"}', "body.device_class"),
    ("PATCH", "/api/v1/devices/d1", r'{"device_class": "\udfff"}', "body.device_class"),
    (
        "POST",
        "/api/v1/deployments",
        r'{"target": {"device": "\ud800"}, "model": "m", "version": 1}',
        "body.target.device",
    ),
    (
        "PUT",
        "/api/v1/devices/d1/desired",
        r'{"model": "m", "version": 1, "rollout_id": "r\udbff"}',
        "body.rollout_id",
    ),
    ("PUT", "/api/v1/groups/g1/desired", r'{"model": "\ud800m", "version": 1}', "body.model"),
    (
        "POST",
        "/api/v1/models/m/versions/1/signatures",
        r'{"keyid": "\ud800", "sig": "AA=="}',
        "body.keyid",
    ),
]


@pytest.fixture
def fleet_api(tmp_path: Path, sqlite_engine: tuple[str, Engine], keys: Keys) -> Iterator[Api]:
    """An app with a device d1 in group g1 and model m version 1 awaiting signatures."""
    url, engine = sqlite_engine
    api = make_api(make_settings(tmp_path, url, keys), engine)
    api.client = TestClient(api.app, raise_server_exceptions=False)  # a 500 is an answer here
    with api.client:
        r = upload(api, "m", onnx_model(), signing="offline")
        assert r.status_code == 202, r.text
        run_jobs(api)
        r = api.post(
            "/api/v1/devices", role="operator", json={"device_class": "cam", "device_id": "d1",
                                                      "groups": ["g1"]},
        )  # fmt: skip
        assert r.status_code == 201, r.text
        yield api


@pytest.mark.parametrize(
    "method, path, body, where", SURROGATE_CASES, ids=[f"{m} {p}" for m, p, _, _ in SURROGATE_CASES]
)
def test_lone_surrogate_in_a_json_body_is_422_naming_where(
    fleet_api: Api, method: str, path: str, body: str, where: str
) -> None:
    r = fleet_api.client.request(
        method,
        path,
        content=_escaped(body),
        headers={**fleet_api.headers("admin"), "Content-Type": "application/json"},
    )
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "lone surrogate" in detail and f"at {where}" in detail


def test_lone_surrogate_in_a_key_or_a_list_is_422(fleet_api: Api) -> None:
    admin = {**fleet_api.headers("admin"), "Content-Type": "application/json"}
    r = fleet_api.client.post(
        "/api/v1/devices",
        content=_escaped(r'{"device_class": "cam", "groups": ["ok", "x\udfff"]}'),
        headers=admin,
    )
    assert r.status_code == 422 and "lone surrogate" in r.json()["detail"]
    assert "at body.groups[1]" in r.json()["detail"]
    r = fleet_api.client.post(
        "/api/v1/tokens",
        content=_escaped(r'{"name": "n", "role": "viewer", "k\ud800": 1}'),
        headers=admin,
    )
    assert r.status_code == 422 and "lone surrogate" in r.json()["detail"]
    assert r"a key" in r.json()["detail"] and r"\ud800" in r.json()["detail"]


def test_surrogate_pair_is_accepted(fleet_api: Api) -> None:
    r = fleet_api.client.post(
        "/api/v1/tokens",
        content=_escaped(r'{"name": "smile \ud83d\ude00", "role": "viewer"}'),
        headers={**fleet_api.headers("admin"), "Content-Type": "application/json"},
    )
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "smile \U0001f600"
    r = fleet_api.client.post(
        "/api/v1/tokens",
        json={"name": "caf\u00e9 \U0001f600 raw", "role": "viewer"},  # raw UTF-8, no escapes
        headers=fleet_api.headers("admin"),
    )
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    "body",
    [
        '{"name": "caf\u00e9", "role": "viewer"}'.encode("latin-1"),
        '{"name": "x", "role": "viewer"}'.encode("utf-16"),
        '{"name": "x", "role": "viewer"}'.encode("utf-16-le"),  # no BOM: valid UTF-8 bytes
        b'{"name": "\xed\xa0\x80", "role": "viewer"}',  # a surrogate encoded as UTF-8
    ],
    ids=["latin-1", "utf-16", "utf-16-le", "encoded surrogate"],
)
def test_json_body_that_is_not_utf8_is_422(fleet_api: Api, body: bytes) -> None:
    r = fleet_api.client.post(
        "/api/v1/tokens",
        content=body,
        headers={**fleet_api.headers("admin"), "Content-Type": "application/json"},
    )
    assert r.status_code == 422, r.text
    assert "UTF-8" in r.json()["detail"]


# ---------------------------------------- finding 6: X-Forwarded-For trust


def _fail_token(url: str, forwarded_for: str) -> int:
    r = httpx.get(
        f"{url}/api/v1/whoami",
        headers={"Authorization": "Bearer eft_wrong", "X-Forwarded-For": forwarded_for},
    )
    return r.status_code


def _failure_clients(api: Api) -> set[str]:
    with api.sessions() as session:
        return set(session.scalars(sql_select(AuthFailure.client)).all())


def test_forwarded_for_from_localhost_is_ignored_by_default(
    tmp_path: Path, sqlite_engine: tuple[str, Engine], keys: Keys
) -> None:
    with _live(tmp_path, sqlite_engine, keys, auth_failure_limit=3) as server:
        assert server.api.settings.forwarded_allow_ips == []
        statuses = [_fail_token(server.url, f"198.51.100.{i}") for i in range(3)]
        assert statuses == [401, 401, 401]
        assert _fail_token(server.url, "198.51.100.99") == 429  # rotating it does not help
        assert _failure_clients(server.api) == {"127.0.0.1"}


def test_forwarded_for_is_used_from_a_configured_proxy(
    tmp_path: Path, sqlite_engine: tuple[str, Engine], keys: Keys
) -> None:
    with _live(
        tmp_path, sqlite_engine, keys, auth_failure_limit=3, forwarded_allow_ips=["127.0.0.1"]
    ) as server:
        assert [_fail_token(server.url, "203.0.113.7") for _ in range(3)] == [401, 401, 401]
        assert _fail_token(server.url, "203.0.113.7") == 429
        assert _fail_token(server.url, "203.0.113.8") == 401  # another client behind the proxy
        assert _failure_clients(server.api) == {"203.0.113.7", "203.0.113.8"}


def test_forwarded_allow_ips_from_env_and_the_uvicorn_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = uvicorn_config(object(), Settings(data_dir=tmp_path))
    assert config.proxy_headers is False  # default: forwarded headers are ignored
    monkeypatch.setenv("EDGEFLEET_FORWARDED_ALLOW_IPS", '["10.0.0.5", "10.0.1.0/24"]')
    settings = load_settings(None, data_dir=tmp_path)
    assert settings.forwarded_allow_ips == ["10.0.0.5", "10.0.1.0/24"]
    config = uvicorn_config(object(), settings)
    assert config.proxy_headers is True
    assert config.forwarded_allow_ips == ["10.0.0.5", "10.0.1.0/24"]


def test_server_run_forwarded_allow_ips_option(tmp_path: Path, keys: Keys) -> None:
    server = ServerProcess(tmp_path, keys, "--forwarded-allow-ips", "127.0.0.1")
    try:
        assert _fail_token(server.url, "192.0.2.44") == 401
        assert server.auth_failure_clients() == {"192.0.2.44"}
    finally:
        server.close()


# --------------------------------------------- finding 7: server init --json


def _config(tmp_path: Path, **values: Any) -> Path:
    path = tmp_path / "init.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


@pytest.mark.parametrize("verb", ["init", "migrate"])
def test_server_init_creates_a_missing_data_dir(tmp_path: Path, capsys: Any, verb: str) -> None:
    data_dir = tmp_path / "not" / "yet"
    config = _config(tmp_path, data_dir=str(data_dir))
    code = main(["server", verb, "--config", str(config), "--json"])
    out = capsys.readouterr()
    assert code == 0, out
    result = json.loads(out.out)
    assert result["ok"] is True
    if verb == "init":
        assert result["token"].startswith("eft_")
    assert (data_dir / "edgefleet.db").is_file()


def test_server_init_creates_the_sqlite_files_parent(tmp_path: Path, capsys: Any) -> None:
    db = tmp_path / "elsewhere" / "deep" / "ef.db"
    config = _config(tmp_path, data_dir=str(tmp_path / "d"), database_url=f"sqlite:///{db}")
    assert main(["server", "init", "--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert db.is_file()


@pytest.mark.parametrize("verb", ["init", "migrate"])
@pytest.mark.parametrize("problem", ["data_dir under a file", "database unreachable"])
def test_server_init_failure_is_one_json_error(
    tmp_path: Path, capsys: Any, problem: str, verb: str
) -> None:
    if problem == "data_dir under a file":
        (tmp_path / "file").write_text("not a directory")
        config = _config(tmp_path, data_dir=str(tmp_path / "file" / "data"))
    else:
        url = f"postgresql://edgefleet:secret-pw@127.0.0.1:{free_port()}/nothing"
        config = _config(tmp_path, data_dir=str(tmp_path / "d"), database_url=url)
    code = main(["server", verb, "--config", str(config), "--json"])
    out = capsys.readouterr()
    assert code == 1
    assert out.err == ""  # no traceback
    lines = out.out.splitlines()
    assert len(lines) == 1
    error = json.loads(lines[0])
    assert error["ok"] is False and error["code"] == 1 and error["error"]
    assert "secret-pw" not in error["message"]
    if problem == "data_dir under a file":
        assert str(tmp_path / "file") in error["message"]
    else:
        assert "127.0.0.1" in error["message"]
