"""A small HTTP client for the server's REST API (used by the CLI verbs).

Flow: ``ApiClient(server, token)`` wraps ``httpx.Client``; each method sends
one request (one method per API call, with typed arguments; the URL is built
here, never by the caller) and returns the decoded JSON (``manifest`` returns
the raw bytes to sign), or raises ``ApiError`` carrying the
HTTP status and the server's ``detail`` message. Connection failures become
``edgefleet.errors.TransportError`` (exit code 30), so the CLI reports one
error family. ``transport`` is the test seam (an ``httpx`` transport).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

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

    def get_version(self, name: str, version: int) -> dict[str, Any]:
        """``GET /models/{name}/versions/{version}``."""
        return cast(dict[str, Any], self.json("GET", f"/models/{name}/versions/{version}"))

    def list_models(self) -> dict[str, Any]:
        """``GET /models``."""
        return cast(dict[str, Any], self.json("GET", "/models"))

    def get_model(self, name: str) -> dict[str, Any]:
        """``GET /models/{name}``: the model and its versions."""
        return cast(dict[str, Any], self.json("GET", f"/models/{name}"))

    def manifest(self, name: str, version: int) -> bytes:
        """``GET /models/{name}/versions/{version}/manifest``: the exact bytes to sign."""
        return self.request("GET", f"/models/{name}/versions/{version}/manifest").content

    def add_signature(self, name: str, version: int, *, keyid: str, sig: str) -> dict[str, Any]:
        """``POST /models/{name}/versions/{version}/signatures`` (``sig`` is base64)."""
        return cast(
            dict[str, Any],
            self.json(
                "POST",
                f"/models/{name}/versions/{version}/signatures",
                json={"keyid": keyid, "sig": sig},
            ),
        )

    def publish_version(self, name: str, version: int) -> dict[str, Any]:
        """``POST /models/{name}/versions/{version}/publish``."""
        return cast(dict[str, Any], self.json("POST", f"/models/{name}/versions/{version}/publish"))

    def get_job(self, job_id: str) -> dict[str, Any]:
        """``GET /jobs/{job_id}``."""
        return cast(dict[str, Any], self.json("GET", f"/jobs/{job_id}"))

    def create_token(self, name: str, role: str) -> dict[str, Any]:
        """``POST /tokens``: the response carries the token, shown once."""
        return cast(dict[str, Any], self.json("POST", "/tokens", json={"name": name, "role": role}))

    def list_tokens(self) -> list[dict[str, Any]]:
        """``GET /tokens``."""
        return cast(list[dict[str, Any]], self.json("GET", "/tokens"))

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        """``DELETE /tokens/{token_id}``."""
        return cast(dict[str, Any], self.json("DELETE", f"/tokens/{token_id}"))

    def enroll_device(
        self,
        *,
        device_id: str | None,
        device_class: str,
        groups: list[str],
        tags: list[str],
    ) -> dict[str, Any]:
        """``POST /devices``: the response carries the broker credentials, shown once."""
        body = {
            "device_id": device_id,
            "device_class": device_class,
            "groups": groups,
            "tags": tags,
        }
        return cast(dict[str, Any], self.json("POST", "/devices", json=body))

    def list_devices(
        self,
        *,
        limit: int,
        group: str | None = None,
        tag: str | None = None,
        device_class: str | None = None,
        online: bool = False,
    ) -> dict[str, Any]:
        """``GET /devices`` (filters left out when not given)."""
        params: dict[str, Any] = {"limit": limit}
        for key, value in (("group", group), ("tag", tag), ("device_class", device_class)):
            if value:
                params[key] = value
        if online:
            params["online"] = "true"
        return cast(dict[str, Any], self.json("GET", "/devices", params=params))

    def get_device(self, device_id: str) -> dict[str, Any]:
        """``GET /devices/{device_id}``."""
        return cast(dict[str, Any], self.json("GET", f"/devices/{device_id}"))

    def remove_device(self, device_id: str) -> dict[str, Any]:
        """``DELETE /devices/{device_id}``."""
        return cast(dict[str, Any], self.json("DELETE", f"/devices/{device_id}"))

    def device_desired(self, device_id: str) -> dict[str, Any]:
        """``GET /devices/{device_id}/desired``."""
        return cast(dict[str, Any], self.json("GET", f"/devices/{device_id}/desired"))

    def deploy(
        self,
        model: str,
        version: int,
        *,
        device: str | None = None,
        group: str | None = None,
        shadow: tuple[str, int] | None = None,
        rollout_id: str | None = None,
        expires_days: int | None = None,
    ) -> dict[str, Any]:
        """``POST /deployments`` to one device or (without ``device``) one group."""
        body: dict[str, Any] = {"model": model, "version": version}
        if shadow is not None:
            body["shadow"] = {"model": shadow[0], "version": shadow[1]}
        if rollout_id:
            body["rollout_id"] = rollout_id
        if expires_days:
            body["expires_days"] = expires_days
        body["target"] = {"device": device} if device else {"group": group}
        return cast(dict[str, Any], self.json("POST", "/deployments", json=body))

    def list_deployments(
        self, *, limit: int, device: str | None = None, group: str | None = None
    ) -> dict[str, Any]:
        """``GET /deployments``, newest first."""
        params: dict[str, Any] = {"limit": limit}
        if device:
            params["device"] = device
        if group:
            params["group"] = group
        return cast(dict[str, Any], self.json("GET", "/deployments", params=params))

    def telemetry(
        self,
        *,
        limit: int,
        device_id: str | None = None,
        model: str | None = None,
        version: int | None = None,
        since: str | None = None,
        until: str | None = None,
    ) -> dict[str, Any]:
        """``GET /telemetry`` (filters left out when None)."""
        params: dict[str, Any] = {"limit": limit}
        for key, value in (
            ("device_id", device_id),
            ("model", model),
            ("version", version),
            ("since", since),
            ("until", until),
        ):
            if value is not None:
                params[key] = value
        return cast(dict[str, Any], self.json("GET", "/telemetry", params=params))

    def drift_report(
        self,
        model: str,
        *,
        version: int | None = None,
        group: str | None = None,
        device_id: str | None = None,
        since: str | None = None,
        until: str | None = None,
        min_n: int | None = None,
    ) -> dict[str, Any]:
        """``GET /drift`` (filters left out when None)."""
        params: dict[str, Any] = {"model": model}
        for key, value in (
            ("version", version),
            ("group", group),
            ("device_id", device_id),
            ("since", since),
            ("until", until),
            ("min_n", min_n),
        ):
            if value is not None:
                params[key] = value
        return cast(dict[str, Any], self.json("GET", "/drift", params=params))

    def drift_alerts(
        self,
        *,
        model: str | None = None,
        level: str | None = None,
        scope: str | None = None,
        limit: int = 100,
    ) -> dict[str, Any]:
        """``GET /drift/alerts`` (filters left out when None)."""
        params: dict[str, Any] = {"limit": limit}
        for key, value in (("model", model), ("level", level), ("scope", scope)):
            if value is not None:
                params[key] = value
        return cast(dict[str, Any], self.json("GET", "/drift/alerts", params=params))

    def feedback_audit(self, model: str, *, version: int | None = None) -> dict[str, Any]:
        """``GET /drift/feedback``."""
        params: dict[str, Any] = {"model": model}
        if version is not None:
            params["version"] = version
        return cast(dict[str, Any], self.json("GET", "/drift/feedback", params=params))

    def retrain_requests(self, *, model: str | None = None, limit: int = 100) -> dict[str, Any]:
        """``GET /retrain-requests``."""
        params: dict[str, Any] = {"limit": limit}
        if model is not None:
            params["model"] = model
        return cast(dict[str, Any], self.json("GET", "/retrain-requests", params=params))

    def retrain_request(self, request_id: str) -> dict[str, Any]:
        """``GET /retrain-requests/{id}``."""
        return cast(dict[str, Any], self.json("GET", f"/retrain-requests/{quote(request_id)}"))

    def retrain_policy(self, model: str) -> dict[str, Any]:
        """``GET /models/{name}/retrain-policy``."""
        return cast(dict[str, Any], self.json("GET", f"/models/{quote(model)}/retrain-policy"))

    def set_retrain_policy(self, model: str, policy: dict[str, Any]) -> dict[str, Any]:
        """``PUT /models/{name}/retrain-policy``."""
        path = f"/models/{quote(model)}/retrain-policy"
        return cast(dict[str, Any], self.json("PUT", path, json=policy))

    def start_rollout(self, spec: dict[str, Any]) -> dict[str, Any]:
        """``POST /rollouts``."""
        return cast(dict[str, Any], self.json("POST", "/rollouts", json=spec))

    def rollouts(self, *, limit: int = 100) -> dict[str, Any]:
        """``GET /rollouts``."""
        return cast(dict[str, Any], self.json("GET", "/rollouts", params={"limit": limit}))

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        """``GET /rollouts/{id}``."""
        return cast(dict[str, Any], self.json("GET", f"/rollouts/{quote(rollout_id)}"))

    def rollout_command(self, rollout_id: str, command: str) -> dict[str, Any]:
        """``POST /rollouts/{id}/{command}`` (pause, resume, abort, promote)."""
        path = f"/rollouts/{quote(rollout_id)}/{quote(command)}"
        return cast(dict[str, Any], self.json("POST", path))

    def verify_audit(self) -> dict[str, Any]:
        """``GET /audit/verify``."""
        return cast(dict[str, Any], self.json("GET", "/audit/verify"))

    def list_audit(self, *, after: int, limit: int) -> dict[str, Any]:
        """``GET /audit`` entries with id > ``after``."""
        return cast(
            dict[str, Any], self.json("GET", "/audit", params={"after": after, "limit": limit})
        )
