"""Registry: upload -> job -> signed bundle; immutability; offline signing; bad input."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from edgefleet.keys import load_signing_key
from edgefleet.manifest import DeviceFacts
from edgefleet.trust import TrustRoot, read_header, verify_bundle
from server.settings import Settings
from tests.server.conftest import (
    Api,
    Keys,
    make_api,
    make_settings,
    model_metadata,
    onnx_model,
    run_jobs,
    upload,
)


def _verify(api: Api, name: str, version: int, trust_root: Path) -> bytes:
    r = api.get(f"/api/v1/models/{name}/versions/{version}/bundle", role="viewer")
    assert r.status_code == 200, r.text
    root = TrustRoot.from_bytes(trust_root.read_bytes())
    verified = verify_bundle(
        r.content,
        trust_root=root,
        device=DeviceFacts(),
        installed={},
        now=datetime.now(timezone.utc),
    )
    assert verified.manifest.name == name and verified.manifest.version == version
    return r.content


def test_onnx_upload_online_signing_publishes_verifiable_bundle(api: Api, keys: Keys) -> None:
    r = upload(api, "resnet-tiny", onnx_model(), version=1, device_classes="cam,gw")
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["version"]["status"] == "queued" and body["job"]["status"] == "queued"
    assert run_jobs(api) == 1
    job = api.get(f"/api/v1/jobs/{body['job']['id']}", role="viewer").json()
    assert job["status"] == "succeeded" and job["progress"] == 1.0
    v = api.get("/api/v1/models/resnet-tiny/versions/1", role="viewer").json()
    assert v["status"] == "published"
    assert v["bundle"]["id"] == "resnet-tiny-1"
    assert v["lineage"]["source_sha256"] == hashlib.sha256(onnx_model()).hexdigest()
    assert v["lineage"]["compressed"] == "false"
    assert v["model_card"]["name"] == "resnet-tiny"
    assert v["report"] is None
    data = _verify(api, "resnet-tiny", 1, keys.trust_root)
    assert hashlib.sha256(data).hexdigest() == v["bundle"]["sha256"]
    assert len(data) == v["bundle"]["size"]
    header = read_header(data)
    assert header.manifest().targets.device_classes == ("cam", "gw")
    models = api.get("/api/v1/models", role="viewer").json()["models"]
    assert models == [{**models[0], "name": "resnet-tiny", "versions": 1, "latest_published": 1}]


def test_version_auto_increments(api: Api) -> None:
    assert upload(api, "m", onnx_model()).json()["version"]["version"] == 1
    assert upload(api, "m", onnx_model(1)).json()["version"]["version"] == 2
    run_jobs(api)
    v2 = api.get("/api/v1/models/m/versions/2", role="viewer").json()
    assert v2["lineage"]["previous_version"] == "1"


def test_republish_same_version_conflict_409(api: Api) -> None:
    assert upload(api, "m", onnx_model(), version=3).status_code == 202
    run_jobs(api)
    before = api.get("/api/v1/models/m/versions/3", role="viewer").json()
    again = upload(api, "m", onnx_model(seed=5), version=3)
    assert again.status_code == 409
    assert "immutable" in again.json()["detail"]
    assert api.post("/api/v1/models/m/versions/3/publish", role="publisher").status_code == 409
    after = api.get("/api/v1/models/m/versions/3", role="viewer").json()
    assert after == before


def test_conflict_while_queued_409(api: Api) -> None:
    assert upload(api, "m", onnx_model(), version=1).status_code == 202
    assert upload(api, "m", onnx_model(), version=1).status_code == 409


@pytest.mark.parametrize(
    ("filename", "model", "form", "needle"),
    [
        ("model.onnx", b"not an onnx model at all", {}, "not an ONNX model"),
        ("model.bin", b"x" * 10, {}, "*.onnx"),
        ("model.pt2", b"PK\x03\x04rest", {}, ".pt2 model must go through compression"),
        ("model.onnx", None, {"compress": True}, "needs both CALIB"),
        ("model.onnx", None, {"device_classes": "bad/class"}, "invalid name"),
        ("model.onnx", None, {"model_card": "[1, 2]"}, "JSON object"),
        ("model.onnx", None, {"model_card": "{nope"}, "not JSON"),
        ("model.onnx", None, {"model_card": "[" * 60000}, "not JSON"),  # was a 500
        ("model.onnx", None, {"model_card": '{"x": "\\ud800"}'}, "not plain JSON"),  # was a 500
        # 300 levels: json.loads copes, the response serializer did not (a 500 after commit)
        ("model.onnx", None, {"model_card": '{"a":' + "[" * 300 + "]" * 300 + "}"}, "deeper"),
        ("model.onnx", b"", {}, "empty"),
        ("model.onnx", None, {"description": "a\x00b"}, "NUL"),
    ],
)
def test_bad_upload_rejected_with_reason(
    api: Api, filename: str, model: bytes | None, form: dict, needle: str
) -> None:
    assert upload(api, "good", onnx_model(), version=1).status_code == 202
    run_jobs(api)
    before = api.get("/api/v1/models/good/versions/1", role="viewer").json()
    r = upload(
        api, "good", onnx_model() if model is None else model, filename=filename, version=2, **form
    )
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"]
    assert api.get("/api/v1/models/good/versions/2", role="viewer").status_code == 404
    assert api.get("/api/v1/models/good/versions/1", role="viewer").json() == before
    assert not list((api.settings.uploads_dir / "good").glob("*/source.bin"))


def _json_file(name: str, value: object) -> tuple[str, bytes, str]:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return (name, raw, "application/json")


def test_uploaded_health_check_and_drift_reference_go_into_the_bundle(api: Api, keys: Keys) -> None:
    """A model compressed locally keeps its health check and drift profile on publish."""
    hc, drift = model_metadata(onnx_model())
    files = {
        "health_check": _json_file("health_check.json", hc),
        "drift_reference": _json_file("drift_reference.json", drift),
    }
    r = upload(api, "local", onnx_model(), version=1, files=files)
    assert r.status_code == 202, r.text
    assert run_jobs(api) == 1
    manifest = read_header(_verify(api, "local", 1, keys.trust_root)).manifest()
    assert manifest.health_check == hc and manifest.drift_reference == drift
    # Without them the bundle has neither (as before).
    assert upload(api, "local", onnx_model(), version=2).status_code == 202
    run_jobs(api)
    bare = read_header(_verify(api, "local", 2, keys.trust_root)).manifest()
    assert bare.health_check == {} and bare.drift_reference is None


def _bad_metadata() -> list[tuple[str, object, str]]:
    hc, drift = model_metadata(onnx_model())
    other_input = {**hc, "inputs": {"z": hc["inputs"]["x"]}}
    other_output = {**hc, "expected_outputs": {"logits": hc["expected_outputs"]["y"]}}
    renamed = {**drift, "features": [{**drift["features"][0], "input": "z"}]}
    short = {**drift, "features": [{**drift["features"][0], "edges": [0.0]}]}
    return [
        ("health_check", b"{nope", "health_check: "),
        ("health_check", b"[" * 100_000, "health_check: "),  # too deep: RecursionError
        ("health_check", {"inputs": {}}, "health_check needs exactly"),
        ("health_check", other_input, "not the model's inputs"),
        ("health_check", other_output, "not outputs of the model"),
        ("drift_reference", b"null", "must be a JSON object"),
        ("drift_reference", renamed, "entry for input 'z'"),
        ("drift_reference", short, "ascending numbers"),
    ]


@pytest.mark.parametrize(("key", "value", "needle"), _bad_metadata())
def test_bad_health_check_or_drift_reference_rejected_with_reason(
    api: Api, key: str, value: object, needle: str
) -> None:
    r = upload(api, "meta", onnx_model(), version=1, files={key: _json_file(f"{key}.json", value)})
    assert r.status_code == 422, r.text
    assert needle in r.json()["detail"], r.json()["detail"]
    assert api.get("/api/v1/models/meta/versions/1", role="viewer").status_code == 404
    assert not [p for p in (api.settings.uploads_dir / "meta").glob("*") if p.is_dir()]


def test_a_health_check_devices_would_fail_fails_the_build_before_signing(api: Api) -> None:
    """Same names and shapes, another model's outputs: caught on the server, not the fleet."""
    stale, _ = model_metadata(onnx_model(seed=1))
    files = {"health_check": _json_file("health_check.json", stale)}
    r = upload(api, "stale", onnx_model(seed=0), version=1, files=files)
    assert r.status_code == 202, r.text
    run_jobs(api)
    job = api.get(f"/api/v1/jobs/{r.json()['job']['id']}", role="viewer").json()
    assert job["status"] == "failed"
    assert "GoldenMismatchError" in job["error"] and "every device" in job["error"]
    v = api.get("/api/v1/models/stale/versions/1", role="viewer").json()
    assert v["status"] == "failed" and v["bundle"] is None


def test_health_check_with_compression_is_refused(api: Api) -> None:
    hc, _ = model_metadata(onnx_model())
    files = {
        "calib": ("calib.npz", b"PK\x03\x04", "application/octet-stream"),
        "eval": ("eval.npz", b"PK\x03\x04", "application/octet-stream"),
        "health_check": _json_file("health_check.json", hc),
    }
    r = upload(api, "meta", onnx_model(), compress=True, files=files)
    assert r.status_code == 422 and "come from the compression job" in r.json()["detail"]


def test_a_model_the_manifest_cannot_describe_is_refused_at_upload(api: Api) -> None:
    """An input name over 256 characters used to pass upload and fail the build job."""
    from onnx import TensorProto, helper

    name = "x" * 300
    graph = helper.make_graph(
        [helper.make_node("Identity", [name], ["y"])],
        "long",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    r = upload(api, "long", model.SerializeToString(), version=1)
    assert r.status_code == 422 and "at most 256 characters" in r.json()["detail"], r.text
    assert api.get("/api/v1/models/long/versions/1", role="viewer").status_code == 404


def test_bad_model_name_rejected(api: Api) -> None:
    r = upload(api, "Bad_Name", onnx_model())
    assert r.status_code == 422


def test_upload_too_large_413(settings: Settings, engine, tmp_path: Path) -> None:
    small = settings.model_copy(update={"max_upload_bytes": 1024})
    made = make_api(small, engine)
    with made.client:
        r = upload(made, "big", onnx_model(features=64, classes=64))
        assert r.status_code == 413
        assert "larger than the limit" in r.json()["detail"]


def test_offline_signing_threshold_two(
    tmp_path: Path, db_url: str, keys_2of2: Keys, engine
) -> None:
    settings = make_settings(tmp_path, db_url, keys_2of2, release_key=None)
    api = make_api(settings, engine)
    with api.client:
        r = upload(api, "m", onnx_model(), signing="offline")
        assert r.status_code == 202, r.text
        run_jobs(api)
        v = api.get("/api/v1/models/m/versions/1", role="viewer").json()
        assert v["status"] == "awaiting_signatures"
        assert v["signatures"] == {"keyids": [], "threshold": 2}
        assert api.get("/api/v1/models/m/versions/1/bundle", role="viewer").status_code == 404
        manifest = api.get("/api/v1/models/m/versions/1/manifest", role="viewer").content
        assert hashlib.sha256(manifest).hexdigest() == v["manifest_sha256"]
        k1, k2 = (load_signing_key(p) for p in keys_2of2.release)

        def sign(key, message=manifest):
            return {"keyid": key.keyid, "sig": base64.b64encode(key.sign(message)).decode()}

        # A signature over other bytes, and one by a root key, are refused.
        bad = api.post(
            "/api/v1/models/m/versions/1/signatures",
            role="publisher",
            json=sign(k1, b"other bytes"),
        )
        assert bad.status_code == 422 and "does not verify" in bad.json()["detail"]
        root_key = load_signing_key(keys_2of2.root[0])
        bad = api.post(
            "/api/v1/models/m/versions/1/signatures", role="publisher", json=sign(root_key)
        )
        assert bad.status_code == 422 and "not a release key" in bad.json()["detail"]
        ok = api.post("/api/v1/models/m/versions/1/signatures", role="publisher", json=sign(k1))
        assert ok.status_code == 200, ok.text
        early = api.post("/api/v1/models/m/versions/1/publish", role="publisher")
        assert early.status_code == 409 and "needs 2" in early.json()["detail"]
        ok = api.post("/api/v1/models/m/versions/1/signatures", role="publisher", json=sign(k2))
        assert ok.json()["signatures"]["keyids"] == sorted([k1.keyid, k2.keyid])
        done = api.post("/api/v1/models/m/versions/1/publish", role="publisher")
        assert done.status_code == 200, done.text
        assert done.json()["status"] == "published"
        _verify(api, "m", 1, keys_2of2.trust_root)
        again = api.post("/api/v1/models/m/versions/1/publish", role="publisher")
        assert again.status_code == 409
        late = api.post("/api/v1/models/m/versions/1/signatures", role="publisher", json=sign(k1))
        assert late.status_code == 409


def test_online_key_counts_toward_threshold(
    tmp_path: Path, db_url: str, keys_2of2: Keys, engine
) -> None:
    settings = make_settings(tmp_path, db_url, keys_2of2)
    api = make_api(settings, engine)
    with api.client:
        upload(api, "m", onnx_model())
        run_jobs(api)
        v = api.get("/api/v1/models/m/versions/1", role="viewer").json()
        assert v["status"] == "awaiting_signatures"
        k2 = load_signing_key(keys_2of2.release[1])
        manifest = api.get("/api/v1/models/m/versions/1/manifest", role="viewer").content
        sig = {"keyid": k2.keyid, "sig": base64.b64encode(k2.sign(manifest)).decode()}
        assert (
            api.post(
                "/api/v1/models/m/versions/1/signatures", role="publisher", json=sig
            ).status_code
            == 200
        )
        assert api.post("/api/v1/models/m/versions/1/publish", role="publisher").status_code == 200
        _verify(api, "m", 1, keys_2of2.trust_root)


def test_online_signing_without_key_is_refused(
    tmp_path: Path, db_url: str, keys: Keys, engine
) -> None:
    api = make_api(make_settings(tmp_path, db_url, keys, release_key=None), engine)
    with api.client:
        r = upload(api, "m", onnx_model())
        assert r.status_code == 503
        assert "signing=offline" in r.json()["detail"]
