"""``edgefleet agent run`` as a real process: JSON lines, local HTTP, telemetry, SIGTERM."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from agent.core import Agent
from agent.mqtt import MqttConnection, MqttOptions
from agent.options import AgentOptions
from edgefleet.build import BuildOptions, build_bundle
from edgefleet.keys import load_signing_key
from edgefleet.keystore import KeyStore
from edgefleet.topics import DeviceTopic
from edgefleet.wire import TelemetryRecord
from firmware_sim.models import linear_model as make_linear_model
from tests.mosquitto import Mosquitto, free_port, wait_until


def http(port: int, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def sideload(tmp_path: Path, state: Path) -> Path:
    keys = KeyStore(tmp_path / "keys")
    keys.init()
    bundle = tmp_path / "tiny-2.bundle"
    opts = BuildOptions(name="tiny", version=2, device_classes=("pi4",))
    build_bundle(make_linear_model(), opts, [load_signing_key(keys.dir / "release-1.key")], bundle)
    agent = Agent(state, AgentOptions(device_class="pi4"))
    try:
        agent.pin_trust_root(keys.trust_root_path.read_bytes())
        assert agent.install(bundle).ok
    finally:
        agent.close()
    return keys.trust_root_path


def test_agent_run_serves_http_streams_telemetry_and_stops_on_sigterm(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    sideload(tmp_path, state)
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        f"""
[device]
id = "pi-1"
class = "pi4"
state_dir = "{state}"

[broker]
host = "{mosquitto.host}"
port = {mosquitto.port}
backoff_initial_s = 0.05
backoff_max_s = 0.3

[telemetry]
window_s = 0.2

[http]
enabled = true
port = {port}
"""
    )
    records: list[TelemetryRecord] = []
    ingest = MqttConnection(
        MqttOptions(host=mosquitto.host, port=mosquitto.port, client_id="ingest"),
        on_message=lambda t, p, r: records.append(TelemetryRecord.from_bytes(p)),
    )
    ingest.subscribe(str(DeviceTopic.telemetry("pi-1")))
    ingest.start()
    assert ingest.wait_connected(5)

    proc = subprocess.Popen(
        [sys.executable, "-m", "edgefleet.cli", "agent", "run", "--config", str(config), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in proc.stdout or []:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        first = json.loads(lines.get(timeout=30))
        assert first["event"] == "started" and first["device_id"] == "pi-1"

        assert first["http"] == f"http://127.0.0.1:{port}"
        code, status = http(port, "/v1/status")
        assert code == 200 and status["serving"]["version"] == 2
        code, out = http(port, "/v1/predict", {"inputs": {"x": [[0.5] * 8, [-1.0] * 8]}})
        assert code == 200 and len(out["outputs"]["probs"]) == 2
        assert abs(sum(out["outputs"]["probs"][0]) - 1.0) < 1e-4
        code, _ = http(port, "/v1/feedback", {"prediction_id": out["prediction_id"], "label": 1})
        assert code == 200
        code, _ = http(port, "/v1/predict", {"inputs": {"x": [[1.0, 2.0]]}})
        assert code == 400

        assert wait_until(lambda: any(r.predictions == 1 for r in records), 10)
        record = next(r for r in records if r.predictions == 1)
        assert record.feedback[0].label == 1 and record.feedback[0].predicted is not None
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
    rest = []
    while not lines.empty():
        rest.append(lines.get())
    assert rc == 0, proc.stderr.read() if proc.stderr else ""
    final = json.loads(rest[-1])
    assert final["ok"] is True and final["status"]["device_id"] == "pi-1"
    ingest.stop()


def test_agent_run_refuses_a_bad_config(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text("[device]\nid = 'pi/1'\n")
    proc = subprocess.run(
        [sys.executable, "-m", "edgefleet.cli", "agent", "run", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["ok"] is False and out["error"] == "ConfigError"
