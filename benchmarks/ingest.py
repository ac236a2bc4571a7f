"""Telemetry ingest rate of the server against a bare MQTT subscriber, same run.

``python benchmarks/ingest.py [--json] [--messages N] [--devices N] [--no-postgres]``

One Mosquitto (its own, on a free port, generated config) carries one
message stream: ``--messages`` pre-generated telemetry records (realistic
ones: latency, outputs, 8 drift histograms) from ``--devices`` devices,
published at full speed with QoS 1 by a publisher process. The same stream
is replayed, in the same run and through the same broker, to:

* the baseline: a bare paho subscriber process that only counts messages;
* the server: ``edgefleet server mqtt`` (the real worker: strict parsing,
  device checks, batched insert-or-ignore, acknowledgement after commit) on
  SQLite, then on PostgreSQL.

By default the baseline is subscribed during each server pass, so both
consume the same stream at the same time (and compete for the same cores).
``--sequential`` measures the baseline alone first instead; on 2 cores that
baseline is about twice as fast (~15 000 msg/s here), so the ratio is lower.

``rate_*`` is messages / seconds from the publisher's first message until
the last one was counted (baseline) or committed (server: polled row count).
``lost`` is messages sent minus rows stored on SQLite (must be 0; ``lost_postgres``
likewise). Target: ``ratio_sqlite = rate_sqlite / rate_bare >= 0.7``.

The publisher and the broker share the machine's cores with the consumer being
measured; docs/server.md has the breakdown of the server's per-record cost.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_RATIO = 0.7
PG_ADMIN_URL = os.environ.get("EDGEFLEET_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")

# ----------------------------------------------------------------- children

COUNTER = r"""
import json, sys, time, threading
import paho.mqtt.client as mqtt
port, expected, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
state = {"n": 0, "first": None, "last": None, "ready": False}
done = threading.Event()
def on_message(c, u, m):
    if m.topic.endswith("/warmup/telemetry"):
        state["ready"] = True
        return
    now = time.time()
    if state["first"] is None:
        state["first"] = now
    state["n"] += 1
    state["last"] = now
    if state["n"] >= expected:
        done.set()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bare-counter", protocol=mqtt.MQTTv5)
c.on_message = on_message
c.on_connect = lambda c, u, f, rc, p: c.subscribe("edgefleet/v1/devices/+/telemetry", qos=1)
c.connect("127.0.0.1", port)
c.loop_start()
while not state["ready"]:
    time.sleep(0.01)
print(json.dumps({"ready": True}), flush=True)
done.wait(timeout)
c.disconnect(); c.loop_stop()
print(json.dumps({"count": state["n"], "first": state["first"], "last": state["last"]}), flush=True)
"""

PUBLISHER = r"""
import json, struct, sys, threading, time
import paho.mqtt.client as mqtt
port, path = int(sys.argv[1]), sys.argv[2]
msgs = []
with open(path, "rb") as fh:
    while True:
        head = fh.read(6)
        if not head:
            break
        tlen, plen = struct.unpack(">HI", head)
        msgs.append((fh.read(tlen).decode(), fh.read(plen)))
acked = [0]
done = threading.Event()
def on_publish(c, u, mid, rc, p):
    acked[0] += 1
    if rc.is_failure:
        print(json.dumps({"error": str(rc)}), file=sys.stderr)
    if acked[0] == len(msgs):
        done.set()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="publisher", protocol=mqtt.MQTTv5)
c.max_inflight_messages_set(100)
c.on_publish = on_publish
c.connect("127.0.0.1", port)
c.loop_start()
start = time.time()
for topic, payload in msgs:
    c.publish(topic, payload, qos=1)
done.wait(600)
end = time.time()
c.disconnect(); c.loop_stop()
print(json.dumps({"start": start, "end": end, "acked": acked[0]}), flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        f"log_dest file {workdir / 'mosquitto.log'}",
        # The server must never fall so far behind that the broker drops for it:
        # Mosquitto drops QoS 1 messages beyond max_queued_messages per client.
        "max_queued_messages 1000000",
        "persistence false",
    ]
    if os.geteuid() == 0:
        import getpass

        lines.append(f"user {getpass.getuser()}")
    conf.write_text("\n".join(lines) + "\n")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.02)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


def make_stream(path: Path, messages: int, devices: int) -> None:
    """Pre-generate the records (publisher reads them; generation is not timed)."""
    import random

    from edgefleet.topics import DeviceTopic
    from edgefleet.wire import (
        FeatureCounts,
        LatencySummary,
        ModelRef,
        OutputSummary,
        TelemetryRecord,
    )

    rng = random.Random(7)
    base = 1_780_315_200_000
    with open(path, "wb") as fh:
        for i in range(messages):
            device = f"bench-{i % devices:04d}"
            seq = base + i // devices
            counts = [tuple(rng.randrange(200) for _ in range(10)) for _ in range(8)]
            record = TelemetryRecord(
                device_id=device,
                seq=seq,
                window_start=1_780_315_200.0 + i,
                window_end=1_780_315_260.0 + i,
                model=ModelRef("fraud", 4),
                predictions=rng.randrange(2000),
                errors=rng.randrange(3),
                latency_ms=LatencySummary(1200, 1.8, 1.6, 3.1, 4.4, 9.7),
                outputs=(OutputSummary(0, 3600, 0.33, 0.41, 0.0, 1.0, (1100, 60, 40)),),
                features=tuple(FeatureCounts("x", f, f"f{f}", counts[f], 0) for f in range(8)),
            )
            topic = str(DeviceTopic.telemetry(device)).encode()
            payload = record.to_bytes()
            fh.write(struct.pack(">HI", len(topic), len(payload)) + topic + payload)


def row_count(url: str) -> int:
    from sqlalchemy import text

    from server.db import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM telemetry")).scalar_one())
    finally:
        engine.dispose()


def run_bare(port: int, stream: Path, messages: int) -> dict[str, Any]:
    """The baseline alone: the bare counter receives the whole stream."""
    import paho.mqtt.client as mqtt

    from edgefleet.wire import TelemetryRecord

    counter = subprocess.Popen(
        [sys.executable, "-c", COUNTER, str(port), str(messages), "600"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        warm = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        warm.connect("127.0.0.1", port)
        warm.loop_start()
        assert counter.stdout is not None
        seq = 1
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(counter.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rec = TelemetryRecord("warmup", seq, 1.0, 2.0)
            warm.publish("edgefleet/v1/devices/warmup/telemetry", rec.to_bytes(), qos=1)
            seq += 1
            if sel.select(timeout=0.2):
                break
        else:
            raise RuntimeError("the bare counter never received the warm-up record")
        counter.stdout.readline()  # {"ready": true}
        warm.disconnect()
        warm.loop_stop()
        publisher = subprocess.run(
            [sys.executable, "-c", PUBLISHER, str(port), str(stream)],
            capture_output=True,
            text=True,
            timeout=900,
            check=True,
        )
        pub = json.loads(publisher.stdout.strip().splitlines()[-1])
        bare = (
            json.loads(counter.communicate(timeout=600)[0].strip().splitlines()[-1])
            if counter is not None
            else None
        )
    finally:
        if counter.poll() is None:
            counter.kill()
    return {
        "rate_bare": bare["count"] / (bare["last"] - pub["start"]) if bare["last"] else 0.0,
        "bare_count": bare["count"],
        "publish_rate": messages / (pub["end"] - pub["start"]),
    }


def run_pass(
    workdir: Path,
    port: int,
    stream: Path,
    messages: int,
    db_url: str,
    label: str,
    *,
    concurrent_bare: bool,
) -> dict[str, Any]:
    """One server measurement; with ``concurrent_bare`` the counter runs beside it."""
    from sqlalchemy import text

    from server.db import make_engine, upgrade_schema

    engine = make_engine(db_url)
    upgrade_schema(engine)
    env = dict(os.environ)
    env.update(
        {
            "EDGEFLEET_ENV": "demo",
            "EDGEFLEET_DATA_DIR": str(workdir / f"data-{label}"),
            "EDGEFLEET_DATABASE_URL": db_url,
            "EDGEFLEET_MQTT_URL": f"mqtt://127.0.0.1:{port}",
            "EDGEFLEET_MQTT_CLIENT_ID": f"edgefleet-server-bench-{label}-{uuid.uuid4().hex[:6]}",
        }
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "edgefleet.cli", "server", "mqtt"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / f"server-{label}.log", "wb"),  # noqa: SIM115
    )
    counter = (
        subprocess.Popen(
            [sys.executable, "-c", COUNTER, str(port), str(messages), "600"],
            stdout=subprocess.PIPE,
            text=True,
        )
        if concurrent_bare
        else None
    )
    try:
        # Warm up until both subscribers receive: one record on a separate device.
        import paho.mqtt.client as mqtt

        from edgefleet.wire import TelemetryRecord

        warm = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        warm.connect("127.0.0.1", port)
        warm.loop_start()
        deadline = time.monotonic() + 60
        seq = 1
        while time.monotonic() < deadline:
            rec = TelemetryRecord("warmup", seq, 1.0, 2.0)
            warm.publish("edgefleet/v1/devices/warmup/telemetry", rec.to_bytes(), qos=1)
            seq += 1
            time.sleep(0.2)
            if row_count(db_url) >= 1:
                break
        else:
            raise RuntimeError(f"the server worker did not store anything ({label})")
        if counter is not None:
            assert counter.stdout is not None
            counter.stdout.readline()  # {"ready": true}: the bare counter is subscribed
        warm.disconnect()
        warm.loop_stop()
        with engine.begin() as conn:
            base_id = int(
                conn.execute(text("SELECT coalesce(max(id), 0) FROM telemetry")).scalar_one()
            )
        publisher = subprocess.run(
            [sys.executable, "-c", PUBLISHER, str(port), str(stream)],
            capture_output=True,
            text=True,
            timeout=900,
            check=True,
        )
        pub = json.loads(publisher.stdout.strip().splitlines()[-1])
        # Count new rows incrementally by primary key (cheap), so polling does not
        # steal the CPU the server needs.
        stored_at = None
        deadline = time.time() + 300
        stored, last_id = 0, base_id
        while time.time() < deadline:
            with engine.connect() as conn:
                n, top = conn.execute(
                    text(
                        "SELECT count(*), max(id) FROM telemetry "
                        "WHERE id > :last AND device_id != 'warmup'"
                    ),
                    {"last": last_id},
                ).one()
            stored += int(n)
            last_id = int(top) if top is not None else last_id
            if stored >= messages:
                stored_at = time.time()
                break
            time.sleep(0.05)
        bare = (
            json.loads(counter.communicate(timeout=600)[0].strip().splitlines()[-1])
            if counter is not None
            else None
        )
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        if counter is not None and counter.poll() is None:
            counter.kill()
        engine.dispose()
    end = stored_at or time.time()
    return {
        "sent": pub["acked"],
        "stored": stored,
        "lost": messages - stored,
        "rate_server": messages / (end - pub["start"])
        if stored_at
        else stored / (end - pub["start"]),
        "rate_bare": (bare["count"] / (bare["last"] - pub["start"]) if bare["last"] else 0.0)
        if bare is not None
        else None,
        "publish_rate": messages / (pub["end"] - pub["start"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--messages", type=int, default=20_000, help="records in the stream")
    parser.add_argument("--devices", type=int, default=50, help="distinct devices")
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL pass")
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="measure the bare counter alone before the server passes, instead of "
        "subscribed at the same time as the server",
    )
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="ef-ingest-"))
    broker, port = start_broker(work)
    pg_name = None
    try:
        stream = work / "stream.bin"
        make_stream(stream, args.messages, args.devices)
        concurrent = not args.sequential
        bare = None if concurrent else run_bare(port, stream, args.messages)
        sqlite = run_pass(
            work,
            port,
            stream,
            args.messages,
            f"sqlite:///{work / 'bench.db'}",
            "sqlite",
            concurrent_bare=concurrent,
        )
        rate_bare = sqlite["rate_bare"] if bare is None else bare["rate_bare"]
        result: dict[str, Any] = {
            "mode": "concurrent" if concurrent else "sequential",
            "messages": args.messages,
            "devices": args.devices,
            "payload_bytes": (stream.stat().st_size // args.messages),
            "rate_bare": round(rate_bare, 1),
            "rate_sqlite": round(sqlite["rate_server"], 1),
            "ratio_sqlite": round(sqlite["rate_server"] / rate_bare, 3),
            "lost": sqlite["lost"],
            "publish_rate": round(sqlite["publish_rate"], 1),
            "target_ratio": TARGET_RATIO,
            "cpus": os.cpu_count(),
        }
        if not args.no_postgres:
            import psycopg

            pg_name = f"ef_bench_{uuid.uuid4().hex[:10]}"
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{pg_name}"')
            pg_url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{pg_name}"
            pg = run_pass(
                work, port, stream, args.messages, pg_url, "postgres", concurrent_bare=concurrent
            )
            pg_bare = pg["rate_bare"] if concurrent else rate_bare
            result.update(
                {
                    "rate_postgres": round(pg["rate_server"], 1),
                    "ratio_postgres": round(pg["rate_server"] / pg_bare, 3),
                    "lost_postgres": pg["lost"],
                }
            )
        else:
            result["rate_postgres"] = None
        result["ok"] = result["ratio_sqlite"] >= TARGET_RATIO and result["lost"] == 0
    finally:
        broker.terminate()
        broker.wait(10)
        if pg_name is not None:
            import psycopg

            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)')
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(f"telemetry ingest, {result['messages']} records from {result['devices']} devices")
        print(f"  bare subscriber  {result['rate_bare']:>10.1f} msg/s")
        print(
            f"  server, SQLite   {result['rate_sqlite']:>10.1f} msg/s  "
            f"ratio {result['ratio_sqlite']:.3f} (target >= {TARGET_RATIO}), "
            f"lost {result['lost']}"
        )
        if result.get("rate_postgres") is not None:
            print(
                f"  server, Postgres {result['rate_postgres']:>10.1f} msg/s  "
                f"ratio {result['ratio_postgres']:.3f}, lost {result['lost_postgres']}"
            )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
