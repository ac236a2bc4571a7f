"""End to end, every part a real process: Mosquitto on the server's files, the server,
three ``edgefleet agent run`` agents. The server is killed with SIGKILL while the
chunks are flowing; after a restart every agent completes the update and every
telemetry record each agent produced is in the database exactly once (or still in
its spool: never lost).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from sqlalchemy import create_engine, text

from firmware_sim.fleet import Fleet, wait_for
from firmware_sim.models import linear_model as make_linear_model

DEVICES = ("pi-1", "pi-2", "pi-3")
RATE = 8192  # chunk bytes per second per device: a ~50 KiB bundle takes ~6 s


def _stored_seqs(fleet: Fleet, device: str) -> list[int]:
    engine = create_engine(f"sqlite:///{fleet.data_dir / 'edgefleet.db'}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT seq FROM telemetry WHERE device_id = :d ORDER BY seq"), {"d": device}
            ).all()
    finally:
        engine.dispose()
    return [r[0] for r in rows]


def _spooled_seqs(fleet: Fleet, device: str) -> set[int]:
    spool = fleet.agents[device].state_dir / "daemon" / "telemetry"
    return {int(p.stem) for p in spool.glob("*.rec")}


def _next_seq(fleet: Fleet, device: str) -> int:
    meta = fleet.agents[device].state_dir / "daemon" / "telemetry" / "meta.json"
    return int(json.loads(meta.read_text())["next_seq"])


def test_update_and_telemetry_survive_a_server_sigkill_mid_download(tmp_path: Path) -> None:
    model = tmp_path / "wide.onnx"
    model.write_bytes(make_linear_model(features=192, classes=64, seed=3))
    fleet = Fleet(
        tmp_path / "fleet",
        server_env={"EDGEFLEET_CHUNK_RATE_BYTES_PER_SECOND": str(RATE)},
        agent_download={"chunk_size": 1024, "chunk_timeout_s": 1.0, "window_blocks": 16},
        telemetry_window_s=0.5,
    )
    with fleet:
        fleet.start_all(DEVICES)
        version = fleet.publish_model(model, "wide", 1)
        size = version["bundle"]["size"]
        assert size > 5 * RATE, size  # long enough for the kill to land mid-download
        fleet.assign("wide", 1)
        wait_for(
            "every agent downloading",
            lambda: all("download-started" in a.kinds() for a in fleet.agents.values()),
            60,
            0.05,
        )
        time.sleep(1.5)
        fleet.kill_server()
        at_kill = {d: a.kinds() for d, a in fleet.agents.items()}
        assert all("download-complete" not in k for k in at_kill.values()), at_kill
        time.sleep(1.0)  # telemetry keeps being PUBACKed by the broker meanwhile
        fleet.start_server()
        wait_for(
            "every agent to commit",
            lambda: all("committed" in a.kinds() for a in fleet.agents.values()),
            90,
        )
        for agent in fleet.agents.values():
            assert agent.kinds().count("download-started") >= 1
            assert "download-failed" not in agent.kinds(), agent.kinds()
            code, out = agent.http("/v1/predict", {"inputs": {"x": [[0.1] * 192]}})
            assert code == 200, out

        # the server applies the agents' status messages as they arrive: wait for its view
        def server_view() -> dict:
            return {d["id"]: d for d in fleet.api("GET", "/devices")["devices"]}

        def on_v1() -> bool:
            view = server_view()
            return all(view[d]["model_version"] == 1 for d in DEVICES)

        wait_for("the server to see every device on wide v1", on_v1, 30)
        devices = server_view()
        assert all(devices[d]["model"] == "wide" and devices[d]["model_version"] == 1
                   for d in DEVICES), devices  # fmt: skip
        time.sleep(1.0)  # a window with the predictions closes and is sent
        fleet.stop_agents()
        for device in DEVICES:
            final = fleet.agents[device].final
            assert final is not None and final["ok"], final
            assert final["status"]["telemetry"]["lost"] == 0
            written = final["status"]["telemetry"]["written"]
            first = _next_seq(fleet, device) - written
            produced = set(range(first, first + written))
            spooled = _spooled_seqs(fleet, device)
            # whatever the broker acknowledged reaches the database (the server is up)
            want = produced - spooled

            def arrived(d: str = device, w: set[int] = want) -> list[int] | None:
                seqs = _stored_seqs(fleet, d)
                return seqs if w <= set(seqs) else None

            stored = wait_for(f"{device}'s telemetry in the database", arrived, 30)
            assert len(stored) == len(set(stored)), "duplicates stored"
            assert set(stored) <= produced, "records nobody produced"
            assert produced == set(stored) | spooled, "a record was lost"
            assert len(stored) >= 6  # ~0.5 s windows across the kill
        records = fleet.telemetry("pi-1")
        assert any(r["predictions"] for r in records)
        assert any(e["kind"] == "committed" for r in records for e in r["record"]["events"])
