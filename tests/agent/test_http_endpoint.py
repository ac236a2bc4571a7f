"""The local HTTP endpoint: predict, feedback, status, errors; loopback only."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest

from agent.core import Agent
from agent.http_endpoint import HttpEndpoint
from firmware_sim.models import GOLDEN_X, BundleSet


def call(endpoint: HttpEndpoint, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(endpoint.url + path, data=data, method="POST" if data else "GET")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def endpoint(agent: Agent):
    with HttpEndpoint(agent, port=0) as ep:
        yield ep


def test_http_predict_matches_agent(agent: Agent, bundles: BundleSet, endpoint):
    agent.install(bundles.v1)
    status, body = call(endpoint, "/v1/predict", {"input": GOLDEN_X.tolist()})
    assert status == 200
    assert body["model"] == "tiny" and body["version"] == 1 and body["prediction_id"] >= 1
    np.testing.assert_allclose(body["outputs"]["probs"], agent.predict(GOLDEN_X)[0], rtol=1e-6)
    status, named = call(endpoint, "/v1/predict", {"inputs": {"x": GOLDEN_X.tolist()}})
    assert status == 200 and named["prediction_id"] == body["prediction_id"] + 1


def test_http_feedback_reaches_the_sink(agent: Agent, bundles: BundleSet, endpoint):
    agent.install(bundles.v1)
    got = []
    agent.set_feedback_sink(lambda pid, label: got.append((pid, label)))
    _, body = call(endpoint, "/v1/predict", {"input": GOLDEN_X.tolist()})
    status, ok = call(
        endpoint, "/v1/feedback", {"prediction_id": body["prediction_id"], "label": 2}
    )
    assert (status, ok) == (200, {"ok": True}) and got == [(body["prediction_id"], 2)]


def test_http_status_shadow_health(agent: Agent, bundles: BundleSet, endpoint):
    assert call(endpoint, "/healthz") == (200, {"ok": True, "serving": None})
    agent.install(bundles.v1)
    status, body = call(endpoint, "/v1/status")
    assert status == 200 and body["active"]["version"] == 1
    assert call(endpoint, "/v1/shadow") == (200, None)


@pytest.mark.parametrize(
    ("path", "body", "code", "error"),
    [
        ("/v1/predict", {"input": [[1, 2]]}, 400, "InvalidInputError"),
        ("/v1/predict", {"inputs": {"nope": [1]}}, 400, "InvalidInputError"),
        ("/v1/predict", {"input": "text"}, 400, "InvalidInputError"),
        ("/v1/predict", {"foo": 1}, 400, "BadRequest"),
        ("/v1/feedback", {"prediction_id": "x", "label": 1}, 400, "BadRequest"),
        ("/v2/nothing", {"a": 1}, 404, "NotFound"),
    ],
)
def test_http_errors_are_json(agent, bundles, endpoint, path, body, code, error):
    agent.install(bundles.v1)
    status, out = call(endpoint, path, body)
    assert status == code and out["error"] == error and out["message"]


def test_http_no_model_is_503(endpoint):
    status, out = call(endpoint, "/v1/predict", {"input": GOLDEN_X.tolist()})
    assert status == 503 and out["error"] == "NoActiveModelError"


def test_http_body_too_large(agent: Agent, bundles: BundleSet):
    agent.install(bundles.v1)
    with HttpEndpoint(agent, port=0, max_body_bytes=1024) as ep:
        status, out = call(ep, "/v1/predict", {"input": np.zeros((100, 8)).tolist()})
    assert status == 413 and out["error"] == "TooLarge"


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.com"])
def test_http_refuses_non_loopback(agent: Agent, host: str):
    with pytest.raises(ValueError, match="loopback"):
        HttpEndpoint(agent, host=host, port=0)
