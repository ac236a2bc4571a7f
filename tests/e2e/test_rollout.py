"""Rollouts on five real agents over a real Mosquitto, decided by the controller from evidence.

1. A version that passes its golden health check but is worse in the field
   (the fraud model with its two classes swapped: the health check's
   expected outputs are its own, its labelled accuracy is ~5% on the same
   inputs) is aborted in the first wave by the metric gate; its one canary
   goes to version 1's payload re-released as version 3, above the
   candidate, so its rollback floor is never lowered; the four other devices
   never get a desired state naming it and never run it.
2. A good version then goes through every wave to every device, the server
   SIGKILLed and restarted in its second wave.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from compression.profiles import decode_array, encode_array
from firmware_sim.fleet import Fleet, wait_for
from tests.e2e.test_drift_loop import Traffic, fraud_example

DEVICES = ("pi-1", "pi-2", "pi-3", "pi-4", "pi-5")


def swapped_classes(compressed: Path, out: Path) -> Path:
    """The model with its class-score outputs reversed, and golden outputs of its own."""
    shutil.copytree(compressed, out)
    model = onnx.load(str(out / "model.onnx"))
    graph = model.graph
    for output in graph.output:
        dims = output.type.tensor_type.shape.dim
        if len(dims) < 2 or dims[-1].dim_value != 2:
            continue
        raw = f"{output.name}__raw"
        for node in graph.node:
            node.output[:] = [raw if o == output.name else o for o in node.output]
        names = [f"{output.name}__{k}" for k in ("starts", "ends", "axes", "steps")]
        for name, value in zip(names, (-1, -(2**62), -1, -1), strict=True):
            graph.initializer.append(helper.make_tensor(name, onnx.TensorProto.INT64, [1], [value]))
        graph.node.append(helper.make_node("Slice", [raw, *names], [output.name]))
    onnx.checker.check_model(model)
    onnx.save(model, str(out / "model.onnx"))
    spec = json.loads((out / "health_check.json").read_text())
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {name: decode_array(a) for name, a in spec["inputs"].items()}
    names = [o.name for o in session.get_outputs()]
    spec["expected_outputs"] = {
        n: encode_array(v) for n, v in zip(names, session.run(names, feed), strict=True)
    }
    (out / "health_check.json").write_text(json.dumps(spec))
    return out


def floor(fleet: Fleet, device: str) -> int:
    state = json.loads((fleet.agents[device].state_dir / "state.json").read_text())
    return int(state["rollback_floor"].get("fraud", 0))


def test_a_worse_model_is_aborted_and_reverted_then_a_good_one_goes_everywhere(
    tmp_path: Path,
) -> None:
    compressed = fraud_example(tmp_path / "fraud")
    bad = swapped_classes(compressed, tmp_path / "bad")
    data = np.load(tmp_path / "fraud/model/eval.npz")
    x, labels = data["x"].astype(np.float32), data["labels"]
    fleet = Fleet(tmp_path / "fleet", server_env={"EDGEFLEET_ROLLOUT_INTERVAL_SECONDS": "0.5"},
                  telemetry_window_s=0.5)  # fmt: skip
    gates = {"min_devices": 1, "min_labels": 40}
    with fleet:
        fleet.start_all(DEVICES)
        fleet.publish_model(compressed / "model.onnx", "fraud", 1)
        fleet.assign("fraud", 1)
        agents = fleet.agents.values()
        wait_for("every agent on version 1", lambda: all("committed" in a.kinds() for a in agents),
                 90)  # fmt: skip
        fleet.publish_model(bad / "model.onnx", "fraud", 2)
        fleet.publish_model(compressed / "model.onnx", "fraud", 3)  # version 1 re-released
        fleet.publish_model(compressed / "model.onnx", "fraud", 4)  # the good candidate
        with Traffic(fleet, x, labels, 0, devices=DEVICES):
            ro = fleet.api("POST", "/rollouts", json={
                "model": "fraud", "version": 2, "group": "demo", "waves": [20, 100],
                "soak_s": 2, "device_timeout_s": 60, "decision_deadline_s": 60,
                "revert_to": 3, "gates": gates})  # fmt: skip
            assert ro["spec"]["previous"] == 1
            done = wait_for(
                "the bad rollout to be reverted",
                lambda: (
                    (r := fleet.api("GET", f"/rollouts/{ro['id']}"))["status"]
                    in ("reverted", "completed", "needs-attention", "paused")
                    and r
                ),
                120,
            )
            assert done["status"] == "reverted", done
            aborts = [e["detail"] for e in done["events"]
                      if e["detail"].get("decision") == "abort"]  # fmt: skip
            assert aborts and "accuracy" in aborts[0]["reason"], done["events"]
            assert done["wave"] == 0
            (canary,) = [d for d, s in done["devices"].items() if s["status"] == "reverted"]
            others = [d for d in DEVICES if d != canary]
            assert all(done["devices"][d]["status"] == "pending" for d in others)
            assert floor(fleet, canary) == 3  # committed 2, then 3: never lowered
            for d in others:  # never told of version 2, never ran it
                assert floor(fleet, d) == 1
                assert not [t for t in fleet.telemetry(d) if t["model_version"] == 2]

            ro2 = fleet.api("POST", "/rollouts", json={
                "model": "fraud", "version": 4, "group": "demo", "waves": [20, 60, 100],
                "soak_s": 2, "device_timeout_s": 60, "decision_deadline_s": 60,
                "gates": gates})  # fmt: skip
            # SIGKILL the server mid-rollout: the controller resumes from the stored state
            path = f"/rollouts/{ro2['id']}"
            wait_for("the good rollout in its second wave",
                     lambda: fleet.api("GET", path)["wave"] >= 1, 120)  # fmt: skip
            fleet.kill_server()
            fleet.start_server()
            good = wait_for(
                "the good rollout to finish",
                lambda: (
                    (r := fleet.api("GET", f"/rollouts/{ro2['id']}"))["status"]
                    in ("reverted", "completed", "needs-attention", "paused", "aborting")
                    and r
                ),
                180,
            )
            assert good["status"] == "completed", good
            assert good["device_counts"] == {"succeeded": 5}
            decisions = [e["detail"].get("decision") for e in good["events"]
                         if e["kind"] == "decision"]  # fmt: skip
            assert decisions == ["advance", "advance", "complete"], good["events"]
        assert all(floor(fleet, d) == 4 for d in DEVICES)
