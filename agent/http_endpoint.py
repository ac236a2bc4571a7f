"""A local HTTP endpoint for applications on the device (off by default).

Flow: JSON request -> arrays built with the serving model's declared dtypes ->
``Agent.predict_with_id`` -> JSON response with the prediction id and the
outputs by name. Routes::

    POST /v1/predict   {"inputs": {"x": [[...]]}}  or  {"input": [[...]]}
                       -> {"prediction_id", "model", "version", "outputs": {name: [...]},
                           "exploration" (when telemetry runs: label it whatever the answer)}
    POST /v1/feedback  {"prediction_id": 17, "label": 1} -> {"ok": true}
    GET  /v1/status    the agent's status
    GET  /v1/shadow    shadow-model statistics (null without one)
    GET  /healthz      {"ok": true, "serving": {...} | null}

Guarantees: it binds a loopback address only (refuses anything else), reads
at most ``max_body_bytes`` per request, and answers every failure with a JSON
``{"error", "message"}`` body (400 bad input, 404 unknown route, 413 too large,
503 no model installed). Standard library only (``http.server``), one thread
per request; the agent's predict path takes no lock.
"""

from __future__ import annotations

import ipaddress
import json
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from agent.core import Agent
from agent.errors import InvalidInputError, NoActiveModelError
from edgefleet.errors import EdgefleetError

__all__ = ["HttpEndpoint"]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _BadRequest(Exception):
    def __init__(self, status: HTTPStatus, error: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = error


class HttpEndpoint:
    """Serves one agent on ``http://127.0.0.1:PORT``.

    Args:
        agent: the agent to serve.
        port: TCP port; 0 picks a free one (see ``port`` after ``start``).
        host: a loopback address.
        max_body_bytes: largest request body accepted.
        exploring: says whether a prediction id is in the telemetry's
            exploration share (``TelemetryRecorder.exploring``); when given,
            predict responses carry ``"exploration"``, so the application can
            collect a label for those predictions whatever the model answered.

    Raises:
        ValueError: ``host`` is not a loopback address, or a bound is out of range.
    """

    def __init__(
        self,
        agent: Agent,
        *,
        port: int = 8765,
        host: str = "127.0.0.1",
        max_body_bytes: int = 8 << 20,
        exploring: Callable[[int], bool] | None = None,
    ) -> None:
        if not _loopback(host):
            raise ValueError(f"the HTTP endpoint binds loopback addresses only, not {host!r}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} is out of range")
        if not 1024 <= max_body_bytes <= 1 << 30:
            raise ValueError("max_body_bytes must be in [1 KiB, 1 GiB]")
        self.agent = agent
        self.host = host
        self.max_body_bytes = max_body_bytes
        self._exploring = exploring
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> HttpEndpoint:
        """Serve in a background thread; return self."""
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="edgefleet-http",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HttpEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ routes

    def _predict(self, body: Any) -> dict[str, Any]:
        manifest = self.agent.serving_manifest
        ref = self.agent.serving
        if manifest is None or ref is None:
            raise NoActiveModelError("no model installed")
        if not isinstance(body, dict) or ("inputs" in body) == ("input" in body):
            raise _BadRequest(
                HTTPStatus.BAD_REQUEST, "BadRequest", 'give exactly one of "inputs" or "input"'
            )
        specs = {t.name: t for t in manifest.inputs}
        if "input" in body:
            if len(specs) != 1:
                raise _BadRequest(
                    HTTPStatus.BAD_REQUEST,
                    "BadRequest",
                    f'the model has inputs {sorted(specs)}: use "inputs" with names',
                )
            raw = {next(iter(specs)): body["input"]}
        elif isinstance(body["inputs"], dict):
            raw = body["inputs"]
        else:
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "BadRequest", '"inputs" must be an object')
        unknown = sorted(set(raw) - set(specs))
        if unknown:
            raise InvalidInputError(f"the model has no inputs {unknown} (inputs: {sorted(specs)})")
        try:
            feed = {name: np.asarray(value, dtype=specs[name].dtype) for name, value in raw.items()}
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(
                f"inputs are not {manifest.inputs[0].dtype} arrays: {exc}"
            ) from exc
        pid, outputs = self.agent.predict_with_id(feed)
        response = {
            "prediction_id": pid,
            "model": ref.model,
            "version": ref.version,
            "outputs": {
                spec.name: value.tolist()
                for spec, value in zip(manifest.outputs, outputs, strict=True)
            },
        }
        if self._exploring is not None:
            response["exploration"] = self._exploring(pid)
        return response

    def _feedback(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or set(body) != {"prediction_id", "label"}:
            raise _BadRequest(
                HTTPStatus.BAD_REQUEST, "BadRequest", 'give exactly "prediction_id" and "label"'
            )
        pid = body["prediction_id"]
        if not isinstance(pid, int) or isinstance(pid, bool) or pid < 1:
            raise _BadRequest(
                HTTPStatus.BAD_REQUEST, "BadRequest", "prediction_id must be a positive integer"
            )
        self.agent.feedback(pid, body["label"])
        return {"ok": True}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "edgefleet-agent"
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass  # requests are the application's business, not the journal's

            def _send(self, status: HTTPStatus, payload: Any) -> None:
                data = json.dumps(payload, default=str).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _fail(self, status: HTTPStatus, error: str, message: str) -> None:
                self._send(status, {"error": error, "message": message})

            def _body(self) -> Any:
                try:
                    length = int(self.headers.get("Content-Length", ""))
                except ValueError:
                    raise _BadRequest(
                        HTTPStatus.LENGTH_REQUIRED, "LengthRequired", "Content-Length is required"
                    ) from None
                if length < 0 or length > endpoint.max_body_bytes:
                    self.close_connection = True
                    raise _BadRequest(
                        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        "TooLarge",
                        f"body of {length} bytes is above {endpoint.max_body_bytes}",
                    )
                try:
                    return json.loads(self.rfile.read(length))
                except (UnicodeDecodeError, ValueError) as exc:
                    raise _BadRequest(
                        HTTPStatus.BAD_REQUEST, "BadRequest", f"not JSON: {exc}"
                    ) from exc

            def _route(self, method: str) -> None:
                routes: dict[tuple[str, str], Callable[[], Any]] = {
                    ("POST", "/v1/predict"): lambda: endpoint._predict(self._body()),
                    ("POST", "/v1/feedback"): lambda: endpoint._feedback(self._body()),
                    ("GET", "/v1/status"): endpoint.agent.status,
                    ("GET", "/v1/shadow"): endpoint.agent.shadow_stats,
                    ("GET", "/healthz"): lambda: {
                        "ok": True,
                        "serving": None
                        if endpoint.agent.serving is None
                        else endpoint.agent.serving.to_dict(),
                    },
                }
                handler = routes.get((method, self.path.split("?", 1)[0]))
                if handler is None:
                    self._fail(HTTPStatus.NOT_FOUND, "NotFound", f"no route {method} {self.path}")
                    return
                try:
                    self._send(HTTPStatus.OK, handler())
                except _BadRequest as exc:
                    self._fail(exc.status, exc.error, str(exc))
                except NoActiveModelError as exc:
                    self._fail(HTTPStatus.SERVICE_UNAVAILABLE, type(exc).__name__, str(exc))
                except EdgefleetError as exc:
                    self._fail(HTTPStatus.BAD_REQUEST, type(exc).__name__, str(exc))

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

        return Handler
