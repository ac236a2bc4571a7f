"""Authorization matrix over every route, token storage, revocation, rate limiting."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import select

from server.api.deps import route_permission
from server.models import ApiToken
from server.services.tokens import Permission, hash_token
from tests.server.conftest import ROLES, Api, make_api

P = Permission
# Every route of the app and the permission it must require (None: public).
# A new endpoint without an entry here fails test_every_route_is_in_the_matrix.
EXPECTED: dict[tuple[str, str], Permission | None] = {
    ("GET", "/healthz"): None,
    ("GET", "/metrics"): P.READ,
    ("GET", "/api/v1/whoami"): P.READ,
    ("POST", "/api/v1/tokens"): P.ADMIN,
    ("GET", "/api/v1/tokens"): P.ADMIN,
    ("DELETE", "/api/v1/tokens/{token_id}"): P.ADMIN,
    ("GET", "/api/v1/models"): P.READ,
    ("GET", "/api/v1/models/{name}"): P.READ,
    ("POST", "/api/v1/models/{name}/versions"): P.PUBLISH,
    ("GET", "/api/v1/models/{name}/versions/{version}"): P.READ,
    ("GET", "/api/v1/models/{name}/versions/{version}/manifest"): P.READ,
    ("POST", "/api/v1/models/{name}/versions/{version}/signatures"): P.PUBLISH,
    ("POST", "/api/v1/models/{name}/versions/{version}/publish"): P.PUBLISH,
    ("GET", "/api/v1/models/{name}/versions/{version}/bundle"): P.READ,
    ("GET", "/api/v1/jobs"): P.READ,
    ("GET", "/api/v1/jobs/{job_id}"): P.READ,
    ("POST", "/api/v1/devices"): P.OPERATE,
    ("GET", "/api/v1/devices"): P.READ,
    ("GET", "/api/v1/devices/{device_id}"): P.READ,
    ("PATCH", "/api/v1/devices/{device_id}"): P.OPERATE,
    ("DELETE", "/api/v1/devices/{device_id}"): P.OPERATE,
    ("POST", "/api/v1/deployments"): P.OPERATE,
    ("GET", "/api/v1/deployments"): P.READ,
    ("PUT", "/api/v1/devices/{device_id}/desired"): P.OPERATE,
    ("GET", "/api/v1/devices/{device_id}/desired"): P.READ,
    ("DELETE", "/api/v1/devices/{device_id}/desired"): P.OPERATE,
    ("PUT", "/api/v1/groups/{group}/desired"): P.OPERATE,
    ("GET", "/api/v1/groups/{group}/desired"): P.READ,
    ("DELETE", "/api/v1/groups/{group}/desired"): P.OPERATE,
    ("GET", "/api/v1/telemetry"): P.READ,
    ("GET", "/api/v1/drift"): P.READ,
    ("GET", "/api/v1/drift/alerts"): P.READ,
    ("GET", "/api/v1/drift/feedback"): P.READ,
    ("GET", "/api/v1/models/{name}/retrain-policy"): P.READ,
    ("PUT", "/api/v1/models/{name}/retrain-policy"): P.OPERATE,
    ("GET", "/api/v1/retrain-requests"): P.READ,
    ("GET", "/api/v1/retrain-requests/{request_id}"): P.READ,
    ("POST", "/api/v1/rollouts"): P.OPERATE,
    ("GET", "/api/v1/rollouts"): P.READ,
    ("GET", "/api/v1/rollouts/{rollout_id}"): P.READ,
    ("POST", "/api/v1/rollouts/{rollout_id}/{command}"): P.OPERATE,
    ("GET", "/api/v1/audit"): P.ADMIN,
    ("GET", "/api/v1/audit/verify"): P.ADMIN,
}
ALLOWED = {
    P.READ: set(ROLES),
    P.PUBLISH: {"admin", "publisher"},
    P.OPERATE: {"admin", "operator"},
    P.ADMIN: {"admin"},
}
PARAMS = {
    "{name}": "m",
    "{version}": "1",
    "{token_id}": "f" * 32,
    "{device_id}": "dev-matrix",
    "{job_id}": "0" * 32,
    "{group}": "grp-matrix",
    "{request_id}": "0" * 32,
    "{rollout_id}": "0" * 32,
    "{command}": "pause",
}


def _routes(app: Any) -> list[tuple[str, str, APIRoute]]:
    """Every API route the app serves, with its full path (prefixes applied)."""
    out = []
    for ctx in iter_route_contexts(app.routes):
        if isinstance(ctx.original_route, APIRoute):
            for method in sorted(set(ctx.methods or ()) - {"HEAD", "OPTIONS"}):
                out.append((method, ctx.path, ctx.original_route))
    return out


def _concrete(path: str) -> str:
    for key, value in PARAMS.items():
        path = path.replace(key, value)
    return path


def test_every_route_is_in_the_matrix(api: Api) -> None:
    found = {(m, p): route_permission(r) for m, p, r in _routes(api.app)}
    missing = set(found) - set(EXPECTED)
    assert not missing, f"routes without an authorization-matrix entry: {sorted(missing)}"
    assert not set(EXPECTED) - set(found), "matrix lists routes the app no longer has"
    assert found == EXPECTED


def test_authorization_matrix_every_role_every_endpoint(api: Api) -> None:
    failures = []
    for method, path, _ in _routes(api.app):
        permission = EXPECTED[(method, path)]
        url = _concrete(path)
        anonymous = api.client.request(method, url)
        if permission is None:
            if anonymous.status_code in (401, 403):
                failures.append(f"{method} {path}: public route refused anonymous")
            continue
        if anonymous.status_code != 401:
            failures.append(f"{method} {path}: no token gave {anonymous.status_code}, not 401")
        for role in ROLES:
            r = api.client.request(method, url, headers=api.headers(role))
            if r.status_code >= 500:
                failures.append(f"{method} {path} as {role}: {r.status_code}")
            elif role in ALLOWED[permission]:
                if r.status_code in (401, 403):
                    failures.append(f"{method} {path}: {role} refused ({r.status_code})")
            elif r.status_code != 403:
                failures.append(f"{method} {path}: {role} got {r.status_code}, expected 403")
            elif role not in r.json()["detail"]:
                failures.append(f"{method} {path}: 403 does not name the role")
    assert not failures, "\n".join(failures)


def test_only_token_hashes_are_stored(api: Api) -> None:
    with api.sessions() as session:
        rows = session.scalars(select(ApiToken)).all()
        stored = {r.token_hash for r in rows}
        for token in api.tokens.values():
            assert hash_token(token) in stored
            assert all(token not in (r.token_hash, r.prefix, r.name) for r in rows)
    listing = api.get("/api/v1/tokens").text
    assert all(t not in listing for t in api.tokens.values())
    assert "token_hash" not in listing


def test_created_token_works_and_revocation_is_immediate(api: Api) -> None:
    r = api.post("/api/v1/tokens", json={"name": "ci", "role": "viewer"})
    assert r.status_code == 201, r.text
    token, token_id = r.json()["token"], r.json()["id"]
    h = {"Authorization": f"Bearer {token}"}
    assert api.client.get("/api/v1/whoami", headers=h).json()["role"] == "viewer"
    dup = api.post("/api/v1/tokens", json={"name": "ci", "role": "admin"})
    assert dup.status_code == 409
    assert api.delete(f"/api/v1/tokens/{token_id}").status_code == 200
    assert api.client.get("/api/v1/whoami", headers=h).status_code == 401


def test_the_last_admin_token_cannot_be_revoked(api: Api) -> None:
    """Without an admin token the server refuses to start and nobody could make one."""
    admins = [t for t in api.get("/api/v1/tokens").json() if t["role"] == "admin"]
    assert len(admins) == 1 and admins[0]["revoked_at"] is None
    r = api.delete(f"/api/v1/tokens/{admins[0]['id']}")
    assert r.status_code == 409 and "last active admin token" in r.json()["detail"]
    assert api.get("/api/v1/whoami").status_code == 200  # still works
    second = api.post("/api/v1/tokens", json={"name": "second-admin", "role": "admin"}).json()
    assert api.delete(f"/api/v1/tokens/{admins[0]['id']}").status_code == 200
    headers = {"Authorization": f"Bearer {second['token']}"}
    assert api.client.delete(f"/api/v1/tokens/{second['id']}", headers=headers).status_code == 409


def test_bad_role_rejected_422(api: Api) -> None:
    r = api.post("/api/v1/tokens", json={"name": "x", "role": "root"})
    assert r.status_code == 422


def test_auth_failures_rate_limited_per_client(settings, engine) -> None:
    limited = settings.model_copy(update={"auth_failure_limit": 3})
    made = make_api(limited, engine)
    attacker = TestClient(made.app, client=("203.0.113.9", 4000))
    bystander = TestClient(made.app, client=("198.51.100.7", 4000))
    bad = {"Authorization": "Bearer eft_wrong"}
    codes = [attacker.get("/api/v1/whoami", headers=bad).status_code for _ in range(3)]
    assert codes == [401, 401, 401]
    r = attacker.get("/api/v1/whoami", headers=bad)
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) >= 1
    assert "too many failed" in r.json()["detail"]
    # Even a valid token is refused from that address (no oracle), but not elsewhere.
    assert attacker.get("/api/v1/whoami", headers=made.headers("viewer")).status_code == 429
    assert bystander.get("/api/v1/whoami", headers=made.headers("viewer")).status_code == 200


def test_rate_limit_window_expires(sessions) -> None:
    from datetime import datetime, timedelta, timezone

    from server.errors import AuthenticationError, RateLimitedError
    from server.services.tokens import authenticate

    t0 = datetime(2030, 1, 1, tzinfo=timezone.utc)
    for _ in range(2):
        with pytest.raises(AuthenticationError):
            authenticate(sessions, "eft_x", "10.9.9.9", limit=2, window=60, now=t0)
    with pytest.raises(RateLimitedError) as info:
        authenticate(sessions, "eft_x", "10.9.9.9", limit=2, window=60, now=t0)
    assert info.value.retry_after == 61
    with pytest.raises(AuthenticationError):
        authenticate(
            sessions, "eft_x", "10.9.9.9", limit=2, window=60, now=t0 + timedelta(seconds=61)
        )
