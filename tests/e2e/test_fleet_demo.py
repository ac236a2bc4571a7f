"""``examples/fleet_demo.py`` (called by ``make demo``) runs to the end and cleans up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _our_processes(workdir: Path) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if str(workdir) in line]


def test_fleet_demo_installs_reports_and_leaves_nothing_running(tmp_path: Path) -> None:
    workdir = tmp_path / "fleet"
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples/fleet_demo.py"), "--workdir", str(workdir), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["audit_ok"] is True
    assert set(summary["devices"]) == {"pi-1", "pi-2", "pi-3"}
    for device in summary["devices"].values():
        assert (device["model"], device["model_version"]) == ("tiny", 1)
        assert device["telemetry_records"] >= 1 and device["predictions"] >= 5
        # The drift reference published with the model reached the devices.
        assert device["feature_histograms"] == 8
    assert summary["seconds"] < 90
    assert _our_processes(workdir) == []
