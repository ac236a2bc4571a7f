"""CLI verbs against a live server (uvicorn on a free port), --json and tables."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import update

from edgefleet.cli import main
from edgefleet.wire import ModelRef, TelemetryRecord
from server.models import AuditEntry
from server.services import telemetry
from tests.mosquitto import free_port
from tests.server.conftest import Api, Keys, make_api, make_settings, model_metadata, onnx_model


class LiveServer:
    def __init__(self, api: Api) -> None:
        import uvicorn

        self.api = api
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(api.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _live(tmp_path: Path, db_url: str, keys: Keys, engine, **overrides) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path, db_url, keys, worker_enabled=True, worker_poll_seconds=0.05, **overrides
    )
    api = make_api(settings, engine)
    with LiveServer(api) as live:
        yield live


@pytest.fixture
def live(tmp_path: Path, db_url: str, keys: Keys, engine) -> Iterator[LiveServer]:
    yield from _live(tmp_path, db_url, keys, engine)


def run(capsys, live: LiveServer, *argv: str, role: str = "admin", as_json: bool = True):
    args = [*argv, "--server", live.url, "--token", live.api.tokens[role]]
    if as_json:
        args.append("--json")
    code = main(args)
    out = capsys.readouterr().out
    return code, (json.loads(out) if as_json else out)


def test_publish_wait_and_models_ls(live: LiveServer, tmp_path: Path, capsys) -> None:
    model = tmp_path / "tiny.onnx"
    model.write_bytes(onnx_model())
    code, out = run(
        capsys,
        live,
        "publish",
        str(model),
        "--name",
        "tiny",
        "--version",
        "2",
        "--device-class",
        "cam",
        "--wait",
        role="publisher",
    )
    assert code == 0, out
    assert out["version"]["status"] == "published" and out["job"]["status"] == "succeeded"
    code, out = run(capsys, live, "models", "ls", role="viewer")
    assert code == 0 and out["models"][0]["latest_published"] == 2
    code, text = run(capsys, live, "models", "ls", role="viewer", as_json=False)
    assert code == 0 and "tiny" in text and "latest published" in text
    code, text = run(capsys, live, "models", "show", "tiny", "2", role="viewer", as_json=False)
    assert code == 0 and "published" in text and "lineage" in text
    code, out = run(
        capsys, live, "publish", str(model), "--name", "tiny", "--version", "2", role="publisher"
    )
    assert code == 1 and out["status"] == 409 and "immutable" in out["message"]


def test_publish_carries_compress_outputs_beside_the_model(
    live: LiveServer, tmp_path: Path, capsys
) -> None:
    """`edgefleet compress` leaves health_check.json and drift_reference.json beside the model."""
    from edgefleet.trust import read_header

    out_dir = tmp_path / "compressed"
    out_dir.mkdir()
    model = out_dir / "model.onnx"
    model.write_bytes(onnx_model())
    hc, drift = model_metadata(onnx_model())
    (out_dir / "health_check.json").write_text(json.dumps(hc))
    (out_dir / "drift_reference.json").write_text(json.dumps(drift))
    code, out = run(
        capsys, live, "publish", str(model), "--name", "local", "--wait", role="publisher"
    )
    assert code == 0, out
    assert sorted(out["attached"]) == ["drift_reference", "health_check"]  # said, not silent
    r = live.api.get("/api/v1/models/local/versions/1/bundle", role="viewer")
    manifest = read_header(r.content).manifest()
    assert manifest.health_check == hc and manifest.drift_reference == drift
    code, out = run(
        capsys, live, "publish", str(model), "--name", "local", "--no-metadata", "--wait",
        role="publisher",
    )  # fmt: skip
    assert code == 0 and out["attached"] == {}
    r = live.api.get("/api/v1/models/local/versions/2/bundle", role="viewer")
    assert read_header(r.content).manifest().health_check == {}

    # An explicit file wins over the one beside the model; it must fit the model.
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**hc, "inputs": {"z": hc["inputs"]["x"]}}))
    code, out = run(
        capsys, live, "publish", str(model), "--name", "local", "--health-check", str(other),
        role="publisher",
    )  # fmt: skip
    assert code == 1 and out["status"] == 422 and "not the model's inputs" in out["message"]
    code, out = run(
        capsys, live, "publish", str(model), "--name", "local", "--calib", str(other),
        "--eval", str(other), "--health-check", str(other), role="publisher",
    )  # fmt: skip
    assert code == 2 and "apply without compression" in out["message"]


def test_offline_signing_cli(tmp_path: Path, db_url: str, keys: Keys, engine, capsys) -> None:
    for live in _live(tmp_path, db_url, keys, engine, release_key=None):
        model = tmp_path / "m.onnx"
        model.write_bytes(onnx_model())
        code, out = run(
            capsys,
            live,
            "publish",
            str(model),
            "--name",
            "m",
            "--signing",
            "offline",
            "--wait",
            role="publisher",
        )
        assert code == 0 and out["version"]["status"] == "awaiting_signatures"
        code, out = run(capsys, live, "models", "release", "m", "1", role="publisher")
        assert code == 1 and out["status"] == 409
        code, out = run(
            capsys,
            live,
            "models",
            "sign",
            "m",
            "1",
            "--key",
            str(keys.release[0]),
            role="publisher",
        )
        assert code == 0 and out["signatures"]["keyids"]
        code, out = run(capsys, live, "models", "release", "m", "1", role="publisher")
        assert code == 0 and out["status"] == "published"


def test_devices_enroll_ls_and_telemetry(live: LiveServer, tmp_path: Path, capsys) -> None:
    out_file = tmp_path / "enroll.json"
    code, out = run(
        capsys,
        live,
        "devices",
        "enroll",
        "--id",
        "cam-7",
        "--class",
        "cam",
        "--group",
        "lobby",
        "--out",
        str(out_file),
        role="operator",
    )
    assert code == 0 and out["mqtt_username"] == "cam-7" and out["mqtt_password"]
    assert json.loads(out_file.read_text())["mqtt_password"] == out["mqtt_password"]
    assert out_file.stat().st_mode & 0o777 == 0o600
    code, text = run(capsys, live, "devices", "ls", role="viewer", as_json=False)
    assert code == 0 and "cam-7" in text and "lobby" in text
    with live.api.sessions() as s:
        telemetry.ingest_batch(
            s, [TelemetryRecord("cam-7", 1, 1e9, 1e9 + 60, ModelRef("m", 1), predictions=42)]
        )
        s.commit()
    code, out = run(capsys, live, "telemetry", "show", "--device", "cam-7", role="viewer")
    assert code == 0 and out["records"][0]["predictions"] == 42
    code, text = run(capsys, live, "telemetry", "show", role="viewer", as_json=False)
    assert "cam-7" in text and "42" in text
    code, out = run(
        capsys, live, "devices", "enroll", "--id", "bad/id", "--class", "cam", role="operator"
    )
    assert code == 1 and out["status"] == 422
    code, out = run(capsys, live, "devices", "enroll", "--class", "cam", role="viewer")
    assert code == 1 and out["status"] == 403


def test_audit_verify_cli_detects_tampering(live: LiveServer, capsys) -> None:
    code, out = run(capsys, live, "audit", "verify")
    assert code == 0 and out["ok"] is True
    code, text = run(capsys, live, "audit", "verify", as_json=False)
    assert "intact" in text
    with live.api.sessions() as s:
        s.execute(update(AuditEntry).where(AuditEntry.seq == 2).values(action="token.forged"))
        s.commit()
    code, out = run(capsys, live, "audit", "verify")
    assert code == 10 and out["problems"][0]["seq"] == 2
    code, text = run(capsys, live, "audit", "verify", as_json=False)
    assert code == 10 and "TAMPERED" in text and "entry 2" in text


def test_tokens_cli_and_errors(live: LiveServer, capsys) -> None:
    code, out = run(capsys, live, "tokens", "create", "--name", "ci", "--role", "viewer")
    assert code == 0 and out["token"].startswith("eft_")
    code = main(["models", "ls", "--server", live.url, "--token", out["token"], "--json"])
    assert code == 0
    capsys.readouterr()
    code = main(["models", "ls", "--server", live.url, "--token", "eft_nope", "--json"])
    assert code == 1 and json.loads(capsys.readouterr().out)["status"] == 401
    code = main(["models", "ls", "--server", f"http://127.0.0.1:{free_port()}", "--json"])
    assert code == 30 and json.loads(capsys.readouterr().out)["error"] == "TransportError"


def test_server_init_creates_admin_token(tmp_path: Path, keys: Keys, capsys) -> None:
    config = tmp_path / "server.toml"
    config.write_text(
        f'database_url = "sqlite:///{tmp_path / "s.db"}"\n'
        f'trust_root = "{keys.trust_root}"\n'
        f'data_dir = "{tmp_path / "data"}"\n'
    )
    assert main(["server", "init", "--config", str(config), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token"].startswith("eft_") and out["schema_revision"] == "0006"
    from server.api.app import create_app
    from server.settings import load_settings

    app = create_app(load_settings(config))  # production start now succeeds
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        me = client.get("/api/v1/whoami", headers={"Authorization": f"Bearer {out['token']}"})
        assert me.json()["role"] == "admin"
    app.state.engine.dispose()


def test_drift_report_through_the_api(live: LiveServer, capsys) -> None:
    import numpy as np

    from tests.server.test_drift_report import publish_with_profile, window

    profile = publish_with_profile(live.api)
    rng = np.random.default_rng(3)
    records = [window(profile, f"d{i}", 1, rng, {0: 1.5} if i == 0 else {}, 600) for i in range(4)]
    with live.api.sessions() as s:
        telemetry.ingest_batch(s, records)
        s.commit()
    code, out = run(capsys, live, "drift", "report", "--model", "fraud", role="viewer")
    assert code == 0 and out["version"] == 1 and out["records"] == 4
    assert out["devices"]["d0"]["features"][0]["status"] == "alarm"
    assert out["devices"]["d0"]["outliers"] == ["feature:amount"]
    code, text = run(capsys, live, "drift", "report", "--model", "fraud", "--device", "d1",
                     role="viewer", as_json=False)  # fmt: skip
    assert code == 0 and "device:d1" in text and "amount" in text
    code, out = run(capsys, live, "drift", "report", "--model", "nope", role="viewer")
    assert code == 1 and out["status"] == 404


def test_retrain_policy_and_requests_through_the_api(live: LiveServer, capsys) -> None:
    from tests.server.test_drift_report import publish_with_profile

    publish_with_profile(live.api)
    policy = ["retrain", "policy", "--model", "fraud"]
    code, out = run(
        capsys, live, *policy, "--key-features", "amount,hour", "--cooldown", "600", role="operator"
    )
    assert code == 0 and out["key_features"] == ["amount", "hour"] and out["cooldown_s"] == 600
    code, out = run(capsys, live, "retrain", "policy", "--model", "fraud", "--min-accuracy",
                    "0.8", role="operator")  # fmt: skip
    assert code == 0 and out["min_accuracy"] == 0.8 and out["key_features"] == ["amount", "hour"]
    code, out = run(capsys, live, "retrain", "policy", "--model", "fraud", role="viewer")
    assert code == 0 and out["min_accuracy"] == 0.8
    code, out = run(capsys, live, "retrain", "ls", role="viewer")
    assert code == 0 and out == {"requests": []}
    code, out = run(capsys, live, "retrain", "show", "0" * 32, role="viewer")
    assert code == 1 and out["status"] == 404
    code, out = run(capsys, live, "retrain", "policy", "--model", "fraud", "--min-accuracy",
                    "3", role="operator")  # fmt: skip
    assert code == 1 and out["status"] == 422


def test_feedback_audit_through_the_api(live: LiveServer, capsys) -> None:
    import numpy as np

    from edgefleet.wire import Feedback, OutputSummary, TelemetryRecord
    from tests.server.test_drift_report import publish_with_profile, window

    profile = publish_with_profile(live.api)
    base = window(profile, "d1", 1, np.random.default_rng(0), {}, 100)
    labels = (
        Feedback(1, 1, 1, exploration=True, predicted_at=10.0, labelled_at=70.0),
        Feedback(2, 0, 1, exploration=False, predicted_at=10.0, labelled_at=30.0),
    )
    record = TelemetryRecord("d1", 1, base.window_start, base.window_end, base.model,
                             predictions=100, features=base.features,
                             outputs=(OutputSummary(0, 100, 0.5, 0.1, 0.0, 1.0, (60, 40)),),
                             feedback=labels)  # fmt: skip
    with live.api.sessions() as s:
        telemetry.ingest_batch(s, [record])
        s.commit()
    code, out = run(capsys, live, "audit", "feedback", "--model", "fraud", role="viewer")
    assert code == 0 and out["label_delay"]["p90_s"] == 60.0
    assert out["exploration_holdout"]["accuracy_gap"] == -1.0
    code, text = run(capsys, live, "audit", "feedback", "--model", "fraud", role="viewer",
                     as_json=False)  # fmt: skip
    assert code == 0 and "label delay: p50 20.0 s, p90 60.0 s" in text
    assert "exploration holdout 1.0 (1 labels)" in text and "gap -1.0" in text


def test_rollout_verbs_through_the_api(live: LiveServer, tmp_path: Path, capsys) -> None:
    import time

    from tests.server.conftest import run_jobs, upload
    from tests.server.test_desired import _enroll

    api = live.api
    for v in (1, 2):
        assert upload(api, "m", onnx_model(seed=v), version=v).status_code == 202
    run_jobs(api)  # the live server's worker may take them first: wait for both
    deadline = time.monotonic() + 60
    while any(api.get(f"/api/v1/models/m/versions/{v}", role="viewer").json().get("status")
              != "published" for v in (1, 2)):  # fmt: skip
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for d in ("cam-1", "cam-2"):
        _enroll(api, d, ["g"])
    gates = tmp_path / "gates.json"
    gates.write_text('{"min_devices": 1, "metric": false}')
    code, out = run(capsys, live, "rollout", "start", "m", "2", "--group", "g", "--waves",
                    "50,100", "--soak", "1m", "--gates", str(gates), role="operator")  # fmt: skip
    assert code == 0, out
    assert out["status"] == "running" and out["spec"]["soak_s"] == 60.0
    assert out["spec"]["gates"]["metric"] is False and out["spec"]["waves"] == [50.0, 100.0]
    code, shown = run(capsys, live, "rollout", "status", out["id"], role="viewer")
    assert code == 0 and shown["id"] == out["id"]
    code, listed = run(capsys, live, "rollout", "ls", role="viewer")
    assert code == 0 and [r["id"] for r in listed["rollouts"]] == [out["id"]]
    code, paused = run(capsys, live, "rollout", "pause", out["id"], role="operator")
    assert code == 0 and paused["pending_command"]["command"] == "pause"
    code, text = run(capsys, live, "rollout", "status", out["id"], role="viewer", as_json=False)
    assert code == 0 and f"rollout {out['id']}" in text
    code, err = run(capsys, live, "rollout", "start", "m", "2", "--group", "g", "--waves",
                    "50,20", role="operator")  # fmt: skip
    assert code == 1 and err["status"] == 422
