"""A small HTTP client for the server's REST API (used by the CLI verbs).

Flow: ``ApiClient(server, token)`` wraps ``httpx.Client``; each method sends
one request and returns the decoded JSON, or raises ``ApiError`` carrying the
HTTP status and the server's ``detail`` message. Connection failures become
``edgefleet.errors.TransportError`` (exit code 30), so the CLI reports one
error family. ``transport`` is the test seam (an ``httpx`` transport).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx

from edgefleet.errors import TransportError

__all__ = ["DEFAULT_SERVER", "SERVER_ENV", "TOKEN_ENV", "ApiClient", "ApiError"]

SERVER_ENV = "EDGEFLEET_SERVER"
TOKEN_ENV = "EDGEFLEET_TOKEN"
DEFAULT_SERVER = "http://127.0.0.1:8080"


class ApiError(Exception):
    """The server answered with an error status."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class ApiClient:
    """Authenticated calls to ``/api/v1``."""

    def __init__(
        self,
        server: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.server = (server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER).rstrip("/")
        token = token or os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.server + "/api/v1", headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send one request; return the response if its status is 2xx.

        Raises:
            ApiError: the server answered 4xx/5xx.
            TransportError: the server could not be reached.
        """
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise TransportError(f"cannot reach {self.server}: {exc}") from exc
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            if not isinstance(detail, str):
                detail = "; ".join(
                    f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}"
                    if isinstance(d, dict)
                    else str(d)
                    for d in (detail if isinstance(detail, list) else [detail])
                )
            raise ApiError(response.status_code, detail)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.request(method, path, **kwargs).json()

    # ------------------------------------------------------------- verbs

    def submit(
        self,
        name: str,
        model: Path,
        *,
        calib: Path | None,
        eval_data: Path | None,
        form: dict[str, str],
        health_check: Path | None = None,
        drift_reference: Path | None = None,
    ) -> dict[str, Any]:
        with open(model, "rb") as mf:
            files: dict[str, Any] = {"model": (model.name, mf, "application/octet-stream")}
            handles = []
            try:
                for key, path in (
                    ("calib", calib),
                    ("eval", eval_data),
                    ("health_check", health_check),
                    ("drift_reference", drift_reference),
                ):
                    if path is not None:
                        fh = open(path, "rb")  # noqa: SIM115 - closed below
                        handles.append(fh)
                        files[key] = (path.name, fh, "application/octet-stream")
                result: dict[str, Any] = self.json(
                    "POST", f"/models/{name}/versions", files=files, data=form
                )
                return result
            finally:
                for fh in handles:
                    fh.close()
