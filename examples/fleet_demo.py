"""A whole fleet on one machine: broker, server, three agents, an OTA update, telemetry.

``python examples/fleet_demo.py --workdir .demo/fleet [--bundle-model DIR]``

Flow (every part a real process, all stopped at the end, also on failure):

1. the server (``edgefleet server run``, demo mode, SQLite) writes the broker's
   password and ACL files from its database;
2. its own Mosquitto starts on a free port with a generated config that uses
   those files (``allow_anonymous false``); the server reloads it by SIGHUP;
3. three devices are enrolled through the REST API (broker credentials come
   back once) and run as ``edgefleet agent run`` processes with generated
   ``agent.toml`` files, pinned to the server's trust root;
4. the model (``DIR/model.onnx`` from ``edgefleet compress``, or the tiny
   model of ``examples/tiny_model.py``) is uploaded, built and signed into a
   bundle, and assigned to the devices' group: a director-signed desired
   state goes out retained; the agents download it in chunks, verify,
   install, health-check and commit;
5. predictions run through each agent's local HTTP endpoint, and the
   telemetry they produce lands in the server's database;
6. a summary is printed and everything shuts down.

The harness is ``firmware_sim.fleet.Fleet`` (also used by ``tests/e2e``).
``--json`` prints the summary as one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from firmware_sim.fleet import GROUP, Fleet, wait_for  # noqa: E402 (after the path setup)

# ---------------------------------------------------------------------- demo


def example_inputs(model: Path, rows: int, seed: int) -> dict[str, Any]:
    """Random inputs matching the model's first input (float32, batch ``rows``)."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    shape = [rows if not isinstance(d, int) or d <= 0 else d for d in spec.shape]
    shape[0] = rows
    data = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    return {spec.name: data.tolist()}


def tiny_model(path: Path) -> Path:
    """A tiny classifier, with the health check and drift reference compress would write."""
    import numpy as np
    import onnxruntime as ort

    from compression.config import HealthCheckConfig
    from compression.profiles import drift_reference, health_check
    from firmware_sim.models import linear_model

    path.write_bytes(linear_model(features=8, classes=3))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    calib = np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32)
    golden = {name: calib[:4]}
    outputs = dict(
        zip((o.name for o in session.get_outputs()), session.run(None, golden), strict=True)
    )
    spec = health_check(golden, outputs, 1.0, False, HealthCheckConfig())
    (path.parent / "health_check.json").write_text(json.dumps(spec))
    (path.parent / "drift_reference.json").write_text(json.dumps(drift_reference({name: calib})))
    return path


def run_demo(workdir: Path, bundle_model: Path | None, *, devices: int = 3) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    say = console.print
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    model = bundle_model / "model.onnx" if bundle_model else tiny_model(workdir / "tiny.onnx")
    name = "fraud" if bundle_model else "tiny"
    started = time.monotonic()
    with Fleet(workdir, log=say, telemetry_window_s=2.0) as fleet:
        say(
            "[bold cyan]== 1. server (demo mode, SQLite) writes the broker's password and ACL files"
        )
        fleet.start_server()
        say(f"   {fleet.url}  admin token in {fleet.data_dir / 'admin-token'}")
        say("[bold cyan]== 2. Mosquitto on those files (no anonymous access)")
        fleet.start_broker()
        say(f"   mqtt://127.0.0.1:{fleet.broker_port}")
        say(f"[bold cyan]== 3. enroll {devices} devices and start their agents")
        ids = [f"pi-{i + 1}" for i in range(devices)]
        for device in ids:
            enrolled = fleet.enroll(device)
            fleet.start_agent(device, enrolled["mqtt_password"])
            say(f"   {device}: broker user {enrolled['mqtt_username']}, group {GROUP}")
        wait_for(
            "every device online",
            lambda: fleet.api("GET", "/devices", params={"online": "true"})["total"] == devices,
            60,
        )
        say("[bold cyan]== 4. publish the model (upload -> signed bundle) and assign it")
        version = fleet.publish_model(model, name, 1)
        say(f"   {name} v1: bundle {version['bundle']['id']}, {version['bundle']['size']} bytes")
        deployment = fleet.assign(name, 1)
        say(
            f"   desired state v{deployment['version']} for group {GROUP}, signed by the "
            f"director key, retained on {deployment['topic']}"
        )
        wait_for(
            "every agent to commit the update",
            lambda: all("committed" in a.kinds() for a in fleet.agents.values()),
            90,
        )
        say("[bold cyan]== 5. predictions through each agent's local HTTP endpoint")
        predictions = 0
        for i, agent in enumerate(fleet.agents.values()):
            for round_ in range(5):
                code, out = agent.http(
                    "/v1/predict", {"inputs": example_inputs(model, 4, i * 10 + round_)}
                )
                if code != 200:
                    raise RuntimeError(f"{agent.device_id} predict: {code} {out}")
                predictions += 4
        say(f"   {predictions} rows predicted on {len(fleet.agents)} devices")
        wait_for(
            "telemetry with the predictions in the server's database",
            lambda: all(sum(r["predictions"] for r in fleet.telemetry(d)) >= 5 for d in ids),
            30,
        )
        devices_now = fleet.api("GET", "/devices")["devices"]
        audit = fleet.api("GET", "/audit/verify")
        table = Table(title="fleet", title_justify="left")
        # records: telemetry windows stored; histograms: drift histograms per record.
        for col in ("device", "online", "model", "last update", "records",
                    "predictions", "p50 ms", "histograms"):  # fmt: skip
            table.add_column(col)
        summary: dict[str, Any] = {"devices": {}}
        for d in devices_now:
            records = fleet.telemetry(d["id"])
            served = [r for r in records if r["record"]["latency_ms"]]
            p50 = served[0]["record"]["latency_ms"]["p50"] if served else None
            npred = sum(r["predictions"] for r in records)
            # One histogram per input feature over the drift reference's bins.
            histograms = max((len(r["record"]["features"]) for r in records), default=0)
            table.add_row(
                d["id"],
                "yes" if d["online"] else "no",
                f"{d['model']} v{d['model_version']}" if d["model"] else "-",
                (d["last_update"] or {}).get("kind", "-"),
                str(len(records)),
                str(npred),
                "-" if p50 is None else f"{p50:.2f}",
                str(histograms),
            )
            summary["devices"][d["id"]] = {
                "model": d["model"],
                "model_version": d["model_version"],
                "telemetry_records": len(records),
                "predictions": npred,
                "feature_histograms": histograms,
            }
        console.print(table)
        say(
            f"audit log: {audit['entries']} entries, "
            + ("[green]intact[/]" if audit["ok"] else "[red]TAMPERED[/]")
        )
        with urllib.request.urlopen(fleet.url + "/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        wanted = ("edgefleet_telemetry_records_total", "edgefleet_devices_online",
                  "edgefleet_update_events_total{outcome=\"committed\"}",
                  "edgefleet_chunk_bytes_total")  # fmt: skip
        for line in metrics.splitlines():
            if line.startswith(wanted):
                say(f"   {line}")
        say("[bold cyan]== 6. shut everything down")
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["audit_ok"] = audit["ok"]
    say(f"done in {summary['seconds']} s; files in {workdir}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(".demo/fleet"))
    parser.add_argument(
        "--bundle-model",
        type=Path,
        default=None,
        help="a directory with model.onnx (from 'edgefleet compress'); default: the tiny model",
    )
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON at the end")
    args = parser.parse_args(argv)
    if args.bundle_model is not None and not (args.bundle_model / "model.onnx").is_file():
        print(f"{args.bundle_model}/model.onnx does not exist", file=sys.stderr)
        return 1
    try:
        summary = run_demo(args.workdir, args.bundle_model, devices=args.devices)
    except (RuntimeError, TimeoutError) as exc:
        print(f"fleet demo failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
