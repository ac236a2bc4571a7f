"""End to end, every part a real process: the fraud example on four real agents over a real
Mosquitto; one feature of two devices' inputs shifts -> device alarms on that feature only;
a third device drifts -> a fleet alarm -> a retraining request with its dataset export and a
hook run; the control device never alarms.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from firmware_sim.fleet import Fleet, wait_for

ROOT = Path(__file__).resolve().parents[2]
DEVICES = ("pi-1", "pi-2", "pi-3", "pi-4")
ROWS = 40  # rows per prediction request


def fraud_example(work: Path) -> Path:
    """Train and compress examples/fraud as the demo does; the compressed directory."""
    train = subprocess.run(
        [sys.executable, str(ROOT / "examples/fraud/train.py"), "--out", str(work / "model")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    names = json.loads(train.stdout.strip().splitlines()[-1])["feature_names"]
    subprocess.run(
        [sys.executable, "-m", "edgefleet.cli", "compress", str(work / "model/model.pt2"),
         "--calib", str(work / "model/calib.npz"), "--eval", str(work / "model/eval.npz"),
         "--out", str(work / "compressed"), "--metric", "accuracy", "--max-drop", "0.01",
         "--prune", "0.7", "--quant", "auto", "--feature-names", ",".join(names), "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return work / "compressed"


class Traffic:
    """Predictions (and a label for some) on every device until stopped; shifts on demand."""

    def __init__(
        self, fleet: Fleet, x: np.ndarray, labels: np.ndarray, column: int,
        devices: tuple[str, ...] = DEVICES,
    ) -> None:  # fmt: skip
        self.fleet, self.x, self.labels, self.column = fleet, x, labels, column
        self.shifted: set[str] = set()
        self.shift = 3.0 * float(np.std(x[:, column]))
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(d, i), daemon=True)
                         for i, d in enumerate(devices)]  # fmt: skip

    def _run(self, device: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        agent = self.fleet.agents[device]
        while not self._stop.is_set():
            idx = rng.integers(0, len(self.x), size=ROWS)
            rows = self.x[idx].copy()
            if device in self.shifted:
                rows[:, self.column] += self.shift
            code, out = agent.http("/v1/predict", {"input": rows.tolist()})
            if code != 200:
                self.errors.append(f"{device}: {code} {out}")
                time.sleep(0.2)
                continue
            if rng.random() < 0.5:
                agent.http("/v1/feedback", {"prediction_id": out["prediction_id"],
                                            "label": int(self.labels[idx[0]])})  # fmt: skip

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)


def alerts(fleet: Fleet) -> list[dict[str, Any]]:
    return list(fleet.api("GET", "/drift/alerts", params={"limit": 1000})["alerts"])


def alarmed(fleet: Fleet, scope: str) -> set[str]:
    return {a["subject"] for a in alerts(fleet) if a["scope"] == scope and a["level"] == "alarm"}


def test_drift_on_real_agents_alarms_devices_then_the_fleet_and_fires_retraining(
    tmp_path: Path,
) -> None:
    compressed = fraud_example(tmp_path / "fraud")
    profile = json.loads((compressed / "drift_reference.json").read_text())
    feature = profile["features"][0]
    data = np.load(tmp_path / "fraud/model/eval.npz")
    x, labels = data["x"].astype(np.float32), data["labels"]
    marker = tmp_path / "hook-ran.json"
    hook = tmp_path / "hook.py"
    hook.write_text(
        "import json, os, sys\n"
        f"open({str(marker)!r}, 'w').write(json.dumps({{'manifest': sys.argv[-1], "
        "'request': os.environ['EDGEFLEET_RETRAIN_REQUEST']}))\n"
    )
    fleet = Fleet(
        tmp_path / "fleet",
        server_env={
            "EDGEFLEET_DRIFT_INTERVAL_SECONDS": "1",
            "EDGEFLEET_DRIFT_MIN_N": "300",
            "EDGEFLEET_RETRAIN_HOOK": json.dumps([sys.executable, str(hook)]),
            "EDGEFLEET_RETRAIN_HOOK_TIMEOUT_SECONDS": "30",
        },
        telemetry_window_s=0.5,
        agent_telemetry={"sample_rate": 0.2, "samples_per_window": 8},
    )
    with fleet:
        fleet.start_all(DEVICES)
        fleet.publish_model(compressed / "model.onnx", "fraud", 1)
        fleet.api("PUT", "/models/fraud/retrain-policy",
                  json={"key_features": [feature["name"]], "on_outputs": False})  # fmt: skip
        fleet.assign("fraud", 1)

        def committed() -> bool:
            return all("committed" in a.kinds() for a in fleet.agents.values())

        wait_for("every agent to commit the update", committed, 90)
        subject = f"feature:{feature['name']}"
        with Traffic(fleet, x, labels, feature["index"]) as traffic:
            wait_for("judged windows on every device",
                     lambda: {a["scope"] for a in alerts(fleet) if a["level"] == "ok"}
                     >= {f"device:{d}" for d in DEVICES}, 60)  # fmt: skip
            traffic.shifted |= {"pi-3", "pi-4"}
            drifting = ("pi-3", "pi-4")

            def devices_alarm() -> bool:
                return all(subject in alarmed(fleet, f"device:{d}") for d in drifting)

            wait_for("device alarms on the shifted feature", devices_alarm, 60)
            for d in ("pi-3", "pi-4"):
                features = {s for s in alarmed(fleet, f"device:{d}") if s.startswith("feature:")}
                assert features == {subject}, (d, features)
            traffic.shifted |= {"pi-2"}
            wait_for("a fleet alarm", lambda: subject in alarmed(fleet, "fleet"), 60)
            request = wait_for(
                "a retraining request whose hook ran",
                lambda: next((r for r in fleet.api("GET", "/retrain-requests")["requests"]
                              if r["status"] == "hooked"), None),
                60,
            )  # fmt: skip
            assert not traffic.errors, traffic.errors[:3]
            assert not alarmed(fleet, "device:pi-1"), alarmed(fleet, "device:pi-1")
            audit = fleet.api("GET", "/drift/feedback?model=fraud")
    assert feature["name"] in request["reason"]
    assert request["dataset"]["rows"] > 0 and request["dataset"]["labelled_rows"] > 0
    dataset = Path(request["dataset"]["path"])
    with np.load(dataset) as z:
        assert z["input__" + profile["features"][0]["input"]].shape[1] == x.shape[1]
        # the real agents state each sample's inclusion probability (sampling at 0.2,
        # the 2% exploration share always, a reservoir of 8 per window)
        p = z["inclusion_probability"]
        assert np.isfinite(p).all() and ((p > 0) & (p <= 1)).all(), p[:10]
        assert z["exploration"].dtype == bool
    manifest = json.loads((dataset.parent / "manifest.json").read_text())
    assert 0 < manifest["dataset"]["effective_sample_size"] <= manifest["dataset"]["rows"]
    assert manifest["dataset"]["samples_without_probability"] == 0
    # labels through the agents carry their times and exploration flags
    assert audit["label_delay"]["labels_with_times"] > 0
    assert audit["exploration_holdout"]["unflagged_labels"] == 0
    ran = json.loads(marker.read_text())
    assert ran["request"] == request["id"] and ran["manifest"].endswith("manifest.json")
