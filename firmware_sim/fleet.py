"""A fleet of real processes on one machine: a server, its Mosquitto, agents; nothing simulated.

``Fleet`` starts ``edgefleet server run`` (demo mode, SQLite), a Mosquitto on
the server's generated password and ACL files, and ``edgefleet agent run``
processes with generated ``agent.toml`` files, all on free ports under one
work directory, and stops every one of them on exit (also on failure). It
drives them only through their command lines, REST API and HTTP endpoints,
so this module imports neither the server nor compression (the layering
contract): it is the harness of ``examples/fleet_demo.py`` and ``tests/e2e``
(which kill the server with SIGKILL in the middle of the downloads).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DEVICE_CLASS", "GROUP", "AgentProc", "Fleet", "free_port", "wait_for"]

GROUP = "demo"
DEVICE_CLASS = "pi4"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, predicate: Callable[[], Any], timeout_s: float, step_s: float = 0.2) -> Any:
    """Poll until ``predicate()`` is truthy; raise ``TimeoutError`` naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(step_s)


@dataclass
class AgentProc:
    """One ``edgefleet agent run`` process and what we know about it."""

    device_id: str
    state_dir: Path
    http_port: int
    proc: subprocess.Popen[str]
    events: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] | None = None
    lines: queue.Queue[str] = field(default_factory=queue.Queue)

    def http(self, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def kinds(self) -> list[str]:
        return [str(e.get("update", {}).get("kind")) for e in self.events]


class Fleet:
    """Mosquitto + server + agents under one work directory; ``close`` stops everything."""

    def __init__(
        self,
        workdir: Path,
        *,
        server_env: dict[str, str] | None = None,
        agent_download: dict[str, Any] | None = None,
        telemetry_window_s: float = 1.0,
        agent_telemetry: dict[str, Any] | None = None,
        log: Callable[[str], None] = lambda line: None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.workdir / "server-data"
        self.broker_port = free_port()  # the devices' listener
        self.server_broker_port = free_port()  # the replicas' own listener
        while self.server_broker_port == self.broker_port:
            self.server_broker_port = free_port()
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.extra_env = dict(server_env or {})
        self.agent_download = agent_download or {"chunk_size": 4096, "chunk_timeout_s": 1.0}
        self.telemetry_window_s = telemetry_window_s
        self.agent_telemetry = agent_telemetry or {}  # more [telemetry] keys of agent.toml
        self.log = log
        self.server: subprocess.Popen[bytes] | None = None
        self.broker: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, AgentProc] = {}
        self.token: str | None = None
        self.server_starts = 0

    # ------------------------------------------------------------------ server

    def server_environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
        env.update(
            {
                "EDGEFLEET_ENV": "demo",
                "EDGEFLEET_DATA_DIR": str(self.data_dir),
                "EDGEFLEET_PORT": str(self.http_port),
                "EDGEFLEET_MQTT_URL": f"mqtt://127.0.0.1:{self.server_broker_port}",
                "EDGEFLEET_DEVICE_MQTT_URL": f"mqtt://127.0.0.1:{self.broker_port}",
                "EDGEFLEET_MQTT_CLIENT_ID": "edgefleet-server-fleet-demo",
                "EDGEFLEET_MOSQUITTO_PID_FILE": str(self.workdir / "mosquitto" / "mosquitto.pid"),
                "EDGEFLEET_WORKER_POLL_SECONDS": "0.2",
                "EDGEFLEET_DESIRED_POLL_SECONDS": "0.2",
                "EDGEFLEET_INGEST_BATCH_SECONDS": "0.05",
                "EDGEFLEET_METRICS_PUBLIC": "true",
            }
        )
        env.update(self.extra_env)
        return env

    def start_server(self, timeout_s: float = 60.0) -> None:
        """Start ``edgefleet server run`` and wait for ``/healthz``."""
        self.server_starts += 1
        log = open(self.workdir / f"server-{self.server_starts}.log", "wb")  # noqa: SIM115
        self.server = subprocess.Popen(
            [sys.executable, "-m", "edgefleet.cli", "server", "run"],
            env=self.server_environment(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        log.close()

        def healthy() -> bool:
            if self.server is not None and self.server.poll() is not None:
                raise RuntimeError(f"the server exited: {self.server_log()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        wait_for("the server's /healthz", healthy, timeout_s)
        self.token = (self.data_dir / "admin-token").read_text().strip()

    def server_log(self) -> str:
        logs = sorted(self.workdir.glob("server-*.log"))
        return "".join(p.read_text(errors="replace") for p in logs)

    def kill_server(self) -> None:
        """SIGKILL: the server dies mid-whatever, without flushing or disconnecting."""
        if self.server is not None and self.server.poll() is None:
            self.server.kill()
            self.server.wait(10)
        self.server = None

    def stop_server(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(20)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(10)
        self.server = None

    # ------------------------------------------------------------------ broker

    def start_broker(self, timeout_s: float = 10.0) -> None:
        """Start Mosquitto on the configuration the server generates for its own files.

        ``edgefleet server broker-config`` (the production configuration: a
        device listener where the session is named after the login, and the
        replicas' own listener) is run with the server's environment.
        """
        mdir = self.workdir / "mosquitto"
        mdir.mkdir(exist_ok=True)
        passwd = self.data_dir / "mosquitto" / "passwd"
        acl = self.data_dir / "mosquitto" / "acl"
        wait_for("the server's broker files", lambda: passwd.exists() and acl.exists(), 10)
        conf = mdir / "mosquitto.conf"
        argv = [
            sys.executable, "-m", "edgefleet.cli", "server", "broker-config",
            "--device-listener", f"127.0.0.1:{self.broker_port}",
            "--server-listener", f"127.0.0.1:{self.server_broker_port}",
            "--persistence-dir", str(mdir),
            "--log-file", str(mdir / "mosquitto.log"),
            "--out", str(conf),
        ]  # fmt: skip
        if os.geteuid() == 0:
            import getpass

            argv += ["--user", getpass.getuser()]
        done = subprocess.run(
            argv, env=self.server_environment(), capture_output=True, cwd=self.workdir, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"server broker-config failed: {done.stderr.decode()[-2000:]}")
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.broker = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

        def listening() -> bool:
            if self.broker is not None and self.broker.poll() is not None:
                raise RuntimeError("mosquitto exited at start; see " + str(mdir / "mosquitto.log"))
            try:
                socket.create_connection(("127.0.0.1", self.broker_port), timeout=0.2).close()
                return True
            except OSError:
                return False

        wait_for("mosquitto", listening, timeout_s, 0.05)
        if self.server is not None and self.server.poll() is None:
            # Devices connect next: the replica's subscriptions must be in place first
            # (the broker drops messages that have no subscriber yet).
            wait_for("the server's broker session", self._server_connected, 30, 0.05)

    def _server_connected(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/metrics", timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return False
        return "\nedgefleet_mqtt_connected 1.0" in text

    # --------------------------------------------------------------------- API

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """One REST call with the admin token; raises ``RuntimeError`` on an error status."""
        import httpx

        r = httpx.request(
            method,
            f"{self.url}/api/v1{path}",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=60,
            **kwargs,
        )
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {r.status_code}: {r.text[:500]}")
        return r.json()

    def publish_model(self, model: Path, name: str, version: int) -> dict[str, Any]:
        """Upload an ONNX model, wait for its signed bundle, return the version.

        The ``health_check.json`` and ``drift_reference.json`` that ``edgefleet
        compress`` wrote beside the model go with it (golden-output checks on
        install, drift histograms in telemetry).
        """
        files: dict[str, Any] = {"model": ("model.onnx", model.read_bytes())}
        for key in ("health_check", "drift_reference"):
            beside = model.parent / f"{key}.json"
            if beside.is_file():
                files[key] = (beside.name, beside.read_bytes(), "application/json")
        submitted = self.api(
            "POST",
            f"/models/{name}/versions",
            files=files,
            data={"version": str(version), "device_classes": DEVICE_CLASS},
        )
        job_id = submitted["job"]["id"]
        job = wait_for(
            f"build job {job_id}",
            lambda: (
                (j := self.api("GET", f"/jobs/{job_id}"))["status"] in ("succeeded", "failed") and j
            ),
            120,
        )
        if job["status"] != "succeeded":
            raise RuntimeError(f"build failed: {job['error']}")
        return dict(self.api("GET", f"/models/{name}/versions/{version}"))

    def enroll(self, device_id: str) -> dict[str, Any]:
        return dict(
            self.api(
                "POST",
                "/devices",
                json={"device_id": device_id, "device_class": DEVICE_CLASS, "groups": [GROUP]},
            )
        )

    def assign(self, name: str, version: int) -> dict[str, Any]:
        return dict(
            self.api("PUT", f"/groups/{GROUP}/desired", json={"model": name, "version": version})
        )

    def telemetry(self, device_id: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            page = self.api(
                "GET", "/telemetry", params={"device_id": device_id, "limit": 1000,
                                            "offset": len(out)}
            )  # fmt: skip
            out += page["records"]
            if len(out) >= page["total"] or not page["records"]:
                return out

    # ------------------------------------------------------------------ agents

    def start_agent(self, device_id: str, password: str) -> AgentProc:
        """Write ``agent.toml`` (+ password file) and start ``edgefleet agent run``."""
        home = self.workdir / "devices" / device_id
        home.mkdir(parents=True, exist_ok=True)
        pw = home / "mqtt-password"
        pw.write_text(password)
        pw.chmod(0o600)
        port = free_port()
        download = "\n".join(f"{k} = {json.dumps(v)}" for k, v in self.agent_download.items())
        telemetry = "\n".join(f"{k} = {json.dumps(v)}" for k, v in self.agent_telemetry.items())
        (home / "agent.toml").write_text(
            f"""[device]
id = "{device_id}"
class = "{DEVICE_CLASS}"
state_dir = "{home / "state"}"
groups = ["{GROUP}"]
trust_root = "{self.data_dir / "keys" / "trust-root.json"}"

[broker]
url = "mqtt://127.0.0.1:{self.broker_port}"
password_file = "{pw}"
backoff_initial_s = 0.1
backoff_max_s = 1.0

[download]
{download}

[telemetry]
window_s = {self.telemetry_window_s}
{telemetry}

[http]
enabled = true
port = {port}
"""
        )
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgefleet.cli",
                "agent",
                "run",
                "--config",
                str(home / "agent.toml"),
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=open(home / "agent.log", "wb"),  # noqa: SIM115
            text=True,
            cwd=home,
        )
        agent = AgentProc(device_id, home / "state", port, proc)

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if doc.get("event") == "update":
                    agent.events.append(doc)
                    self.log(f"  {device_id}: {doc['update'].get('kind')}")
                elif "ok" in doc:
                    agent.final = doc
                agent.lines.put(line)

        threading.Thread(target=read, name=f"read-{device_id}", daemon=True).start()
        self.agents[device_id] = agent
        return agent

    def stop_agents(self) -> None:
        for agent in self.agents.values():
            if agent.proc.poll() is None:
                agent.proc.send_signal(signal.SIGTERM)
        for agent in self.agents.values():
            try:
                agent.proc.wait(30)
            except subprocess.TimeoutExpired:
                agent.proc.kill()
                agent.proc.wait(10)
            if agent.final is None:  # the reader may still be on the last line
                deadline = time.monotonic() + 2
                while agent.final is None and time.monotonic() < deadline:
                    time.sleep(0.05)

    # ------------------------------------------------------------------- close

    def close(self) -> None:
        """Stop agents, server and broker (in that order); kill what does not stop."""
        try:
            self.stop_agents()
        finally:
            try:
                self.stop_server()
            finally:
                if self.broker is not None and self.broker.poll() is None:
                    self.broker.send_signal(signal.SIGTERM)
                    try:
                        self.broker.wait(10)
                    except subprocess.TimeoutExpired:
                        self.broker.kill()
                        self.broker.wait(10)
                self.broker = None

    def start_all(self, devices: Iterable[str]) -> None:
        """Start the server and the broker, then enroll and start an agent per device."""
        self.start_server()
        self.start_broker()
        for device in devices:
            self.start_agent(device, self.enroll(device)["mqtt_password"])

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
