"""``GET /api/v1/drift`` and ``server.services.drift``: stored histograms to verdicts."""

from __future__ import annotations

import io
import json
import time

import numpy as np

from edgefleet.wire import FeatureCounts, ModelRef, TelemetryRecord
from server.services import telemetry
from tests.server.conftest import Api, onnx_model, run_jobs, upload

FEATURES = 4


def publish_with_profile(
    api: Api,
    name: str = "fraud",
    *,
    outputs: bool = False,
    calibration: dict | None = None,
    value_output: dict | None = None,
) -> dict:
    from compression.profiles import drift_reference

    x = np.random.default_rng(0).normal(size=(5000, FEATURES)).astype(np.float32)
    profile = drift_reference({"x": x}, ["amount", "hour", "distance", "age"])
    if outputs:  # the predicted classes of the 3-class model on evaluation data
        profile["outputs"] = [
            {"index": 0, "name": "y", "kind": "classes", "counts": [2500, 1500, 1000], "n": 5000}
        ]
    if calibration is not None:
        profile["calibration"] = calibration
    if value_output is not None:
        profile["outputs"] = [value_output]
    files = {
        "drift_reference": (
            "drift_reference.json",
            io.BytesIO(json.dumps(profile).encode()),
            "application/json",
        )
    }
    r = upload(api, name, onnx_model(features=FEATURES), version=1, files=files)
    assert r.status_code == 202, r.text
    run_jobs(api)  # a live server's own worker may have taken the job first
    job_url = f"/api/v1/jobs/{r.json()['job']['id']}"
    deadline = time.monotonic() + 60
    while (job := api.get(job_url, role="viewer").json())["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["status"] == "succeeded", job
    return profile


def window(profile: dict, device: str, seq: int, rng, shift: dict[int, float], rows: int):
    x = rng.normal(size=(rows, FEATURES))
    for column, by in shift.items():
        x[:, column] += by
    feats = []
    for f in profile["features"]:
        idx = np.searchsorted(f["edges"], x[:, f["index"]], side="right")
        counts = tuple(np.bincount(idx, minlength=10).tolist())
        feats.append(FeatureCounts("x", f["index"], f["name"], counts))
    now = time.time()
    return TelemetryRecord(device, seq, now - 60 + seq, now + seq, ModelRef("fraud", 1),
                           predictions=rows, features=tuple(feats))  # fmt: skip


def with_output(base: TelemetryRecord, out) -> TelemetryRecord:
    """``base`` (a ``window``) with one output summary."""
    return TelemetryRecord(base.device_id, base.seq, base.window_start, base.window_end,
                           base.model, predictions=base.predictions, features=base.features,
                           outputs=(out,))  # fmt: skip


def ingest_and_report(api: Api, records: list[TelemetryRecord]) -> dict:
    with api.sessions() as s:
        telemetry.ingest_batch(s, records)
        s.commit()
    return api.get("/api/v1/drift", role="viewer", params={"model": "fraud"}).json()


def test_report_flags_the_shifted_feature_on_the_drifting_devices_only(api: Api) -> None:
    profile = publish_with_profile(api)
    rng = np.random.default_rng(1)
    records = []
    for device in ["pi-1", "pi-2", "pi-3", "pi-4", "pi-5", "pi-6"]:
        shift = {2: 1.0} if device in ("pi-5", "pi-6") else {}
        records += [window(profile, device, seq, rng, shift, 300) for seq in (1, 2)]
    with api.sessions() as s:
        telemetry.ingest_batch(s, records)
        s.commit()
    r = api.get("/api/v1/drift", role="viewer", params={"model": "fraud"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == 1 and body["records"] == 12 and body["scope"] == "fleet"
    for device, d in body["devices"].items():
        status = {f["name"]: f["status"] for f in d["features"]}
        if device in ("pi-5", "pi-6"):
            assert status == {"amount": "ok", "hour": "ok", "distance": "alarm", "age": "ok"}
            assert d["outliers"] == ["feature:distance"]
        else:
            assert set(status.values()) == {"ok"}, (device, status)
            assert d["outliers"] == []
    fleet = {f["name"]: f["status"] for f in body["features"]}
    assert fleet["distance"] in ("warn", "alarm") and fleet["amount"] == "ok"
    # one device: only its own windows
    one = api.get("/api/v1/drift", role="viewer", params={"model": "fraud", "device_id": "pi-1"})
    assert one.json()["scope"] == "device:pi-1" and list(one.json()["devices"]) == ["pi-1"]
    # too little data is insufficient, never an alarm
    few = api.get("/api/v1/drift", role="viewer", params={"model": "fraud", "min_n": 5000})
    assert few.json()["status"] == "insufficient"


def test_bad_requests_name_the_problem(api: Api) -> None:
    assert api.get("/api/v1/drift", role="viewer", params={"model": "none"}).status_code == 404
    upload(api, "bare", onnx_model(), version=1)
    run_jobs(api)
    r = api.get("/api/v1/drift", role="viewer", params={"model": "bare"})
    assert r.status_code == 422 and "no drift reference" in r.json()["detail"]
    r = api.get("/api/v1/drift", role="viewer",
                params={"model": "bare", "group": "g", "device_id": "d"})  # fmt: skip
    assert r.status_code == 422 and "not both" in r.json()["detail"]
    r = api.get(
        "/api/v1/drift", role="viewer", params={"model": "bare", "since": "2030-01-01T00:00:00"}
    )
    assert r.status_code == 422 and "timezone" in r.json()["detail"]
    assert api.client.get("/api/v1/drift", params={"model": "bare"}).status_code == 401


def test_output_drift_from_predicted_class_counts(api: Api) -> None:
    from edgefleet.wire import OutputSummary

    profile = publish_with_profile(api, outputs=True)
    rng = np.random.default_rng(4)
    records = []
    for i, device in enumerate(["pi-1", "pi-2", "pi-3", "pi-4"]):
        shares = [0.2, 0.2, 0.6] if device == "pi-4" else [0.5, 0.3, 0.2]
        classes = tuple(rng.multinomial(1000, shares).tolist())
        out = OutputSummary(0, 1000, 0.3, 0.1, 0.0, 1.0, classes)
        records.append(with_output(window(profile, device, 1 + i, rng, {}, 1000), out))
    body = ingest_and_report(api, records)
    statuses = {d: v["outputs"][0]["status"] for d, v in body["devices"].items()}
    assert statuses == {"pi-1": "ok", "pi-2": "ok", "pi-3": "ok", "pi-4": "alarm"}
    assert body["devices"]["pi-4"]["outputs"][0]["name"] == "y"
    assert "output:y" in body["devices"]["pi-4"]["outliers"]
    assert body["quality"]["labelled"] == 0 and body["quality"]["accuracy"] is None
    assert body["devices"]["pi-1"]["channels"] == []


def test_output_drift_of_an_output_profiled_by_value(api: Api) -> None:
    from compression.profiles import output_reference
    from edgefleet.wire import OutputSummary

    rng = np.random.default_rng(8)
    (ref,) = output_reference([("score", rng.normal(size=(5000, 1)).astype(np.float32))])
    profile = publish_with_profile(api, value_output=ref)
    records = []
    for i, device in enumerate(["pi-1", "pi-2", "pi-3"]):
        score = rng.normal(0.8 if device == "pi-3" else 0.0, 1.0, size=1000)
        counts = np.bincount(np.searchsorted(ref["edges"], score, side="right"), minlength=10)
        out = OutputSummary(0, 1000, 0.0, 1.0, -3.0, 3.0, None, None, tuple(counts.tolist()))
        records.append(with_output(window(profile, device, 1 + i, rng, {}, 1000), out))
    body = ingest_and_report(api, records)
    statuses = {d: v["outputs"][0]["status"] for d, v in body["devices"].items()}
    assert statuses == {"pi-1": "ok", "pi-2": "ok", "pi-3": "alarm"}
    assert body["devices"]["pi-3"]["outputs"][0]["name"] == "score"


def test_accuracy_from_feedback_labels(api: Api) -> None:
    from edgefleet.wire import Feedback

    profile = publish_with_profile(api)
    rng = np.random.default_rng(5)
    records = []
    for i, (device, right) in enumerate([("pi-1", 90), ("pi-2", 60)]):
        base = window(profile, device, 1, rng, {}, 100)
        labels = tuple(Feedback(k, 1, 1 if k < right else 0) for k in range(100))
        records.append(
            TelemetryRecord(device, 1 + i, base.window_start, base.window_end, base.model,
                            predictions=100, features=base.features, feedback=labels)
        )  # fmt: skip
    with api.sessions() as s:
        telemetry.ingest_batch(s, records)
        s.commit()
    body = api.get("/api/v1/drift", role="viewer", params={"model": "fraud"}).json()
    assert body["devices"]["pi-1"]["quality"]["accuracy"] == 0.9
    assert body["devices"]["pi-2"]["quality"]["correct"] == 60
    q = body["quality"]
    assert (q["labelled"], q["correct"], q["accuracy"]) == (200, 150, 0.75)
    assert q["wilson_low"] < 0.75 < q["wilson_high"]


def test_feedback_audit_route(api: Api) -> None:
    from edgefleet.wire import Feedback, OutputSummary

    profile = publish_with_profile(api)
    rng = np.random.default_rng(6)
    base = window(profile, "pi-1", 1, rng, {}, 100)
    out = OutputSummary(0, 100, 0.3, 0.1, 0.0, 1.0, (80, 15, 5))
    labels = (
        Feedback(1, 2, 2, exploration=True, predicted_at=100.0, labelled_at=160.0),
        Feedback(2, 0, 2, exploration=False, predicted_at=100.0, labelled_at=3700.0),
        Feedback(3, "text", 1),
    )
    record = TelemetryRecord("pi-1", 1, base.window_start, base.window_end, base.model,
                             predictions=100, features=base.features, outputs=(out,),
                             feedback=labels)  # fmt: skip
    with api.sessions() as s:
        telemetry.ingest_batch(s, [record])
        s.commit()
    body = api.get("/api/v1/drift/feedback", role="viewer", params={"model": "fraud"}).json()
    assert body["predictions"] == 100 and body["labels"] == 2 and body["unscored_labels"] == 1
    by = {c["class"]: c for c in body["classes"]}
    assert by[2]["labels"] == 2 and by[2]["coverage"] == 0.4 and by[2]["accuracy"] == 0.5
    assert body["label_delay"] == {"labels_with_times": 2, "labels_without_times": 1,
                                   "p50_s": 60.0, "p90_s": 3600.0, "max_s": 3600.0}  # fmt: skip
    holdout = body["exploration_holdout"]
    assert holdout["exploration"]["labelled"] == 1 and holdout["exploration"]["accuracy"] == 1.0
    assert holdout["model_selected"]["accuracy"] == 0.0 and holdout["accuracy_gap"] == -1.0
    assert holdout["unflagged_labels"] == 1
    assert body["samples"] == {"rows": 0, "rows_without_probability": 0,
                               "effective_sample_size": None}  # fmt: skip
