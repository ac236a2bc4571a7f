"""The retraining loop: a policy fires on a fleet alarm, the dataset is exported, the hook runs."""

from __future__ import annotations

import hashlib
import json
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from sqlalchemy import select

from edgefleet.wire import ArraySample, Feedback, Sample, TelemetryRecord
from server.analysis.verdict import Thresholds
from server.models import AuditEntry, RetrainRequest
from server.services import alerts, retrain, telemetry
from tests.server.conftest import Api
from tests.server.test_drift_report import publish_with_profile, window

T0 = datetime.now(timezone.utc) - timedelta(hours=1)


def drifting_windows(api: Api, profile: dict, rng, step: int) -> None:
    records = []
    for i in range(4):
        device = f"pi-{i}"
        base = window(profile, device, step, rng, {0: 1.5} if i < 3 else {}, 600)
        x = rng.normal(size=(1, 4)).astype(np.float32)
        chances = (0.5, 0.05, None)  # an explored sample, a sampled one, one from an old agent
        samples = tuple(
            Sample(step * 100 + k, {"x": ArraySample("float32", (1, 4), x.tobytes())}, (),
                   inclusion_probability=chances[k], exploration=k == 0)
            for k in range(3)
        )  # fmt: skip
        feedback = (Feedback(step * 100, 1, 1), Feedback(step * 100 + 1, 0, 1))
        records.append(TelemetryRecord(device, step, base.window_start, base.window_end,
                                       base.model, predictions=600, features=base.features,
                                       samples=samples, feedback=feedback))  # fmt: skip
    with api.sessions() as s:
        telemetry.ingest_batch(s, records, now=T0 + timedelta(minutes=step))
        s.commit()
    with api.sessions() as s, s.begin():
        alerts.evaluate(s, Thresholds(), T0 + timedelta(minutes=step, seconds=30))


def test_a_key_feature_alarm_fires_one_request_with_an_export_and_a_hook(
    api: Api, tmp_path: Path
) -> None:
    profile = publish_with_profile(api)
    r = api.put("/api/v1/models/fraud/retrain-policy", role="operator",
                json={"key_features": ["amount"], "cooldown_s": 3600})  # fmt: skip
    assert r.status_code == 200, r.text
    assert api.get("/api/v1/models/fraud/retrain-policy", role="viewer").json()["key_features"] == [
        "amount"
    ]
    rng = np.random.default_rng(0)
    for step in (1, 2):
        drifting_windows(api, profile, rng, step)
    marker = tmp_path / "hook-ran.json"
    hook = tmp_path / "hook.py"
    hook.write_text(
        "import json, os, sys\n"
        f"open({str(marker)!r}, 'w').write(json.dumps({{'argv': sys.argv[1:], "
        "'request': os.environ['EDGEFLEET_RETRAIN_REQUEST']}))\n"
        "print('trained')\n"
    )
    settings = api.settings.model_copy(update={"retrain_hook": [sys.executable, str(hook)]})
    now = T0 + timedelta(minutes=3)
    with api.sessions() as s, s.begin():
        fired = retrain.evaluate_policies(s, settings, now)
    assert len(fired) == 1
    with api.sessions() as s, s.begin():  # within the cooldown: nothing new
        assert retrain.evaluate_policies(s, settings, now + timedelta(minutes=5)) == []
    (request_id,) = fired
    assert retrain.run_hook(api.sessions, settings, request_id) == "hooked"
    ran = json.loads(marker.read_text())
    assert ran["request"] == request_id and ran["argv"][0].endswith("manifest.json")
    body = api.get(f"/api/v1/retrain-requests/{request_id}", role="viewer").json()
    assert body["status"] == "hooked" and "key feature amount" in body["reason"]
    assert body["evidence"]["trigger"]["subject"] == "feature:amount"
    assert body["hook"]["attempts"][0]["exit"] == 0
    assert "trained" in body["hook"]["attempts"][0]["output_tail"]
    dataset = Path(body["dataset"]["path"])
    assert hashlib.sha256(dataset.read_bytes()).hexdigest() == body["dataset"]["sha256"]
    assert dataset.name.startswith(f"dataset-{body['dataset']['sha256'][:16]}")
    with np.load(dataset) as z:
        assert z["input__x"].shape == (24, 4)  # 2 windows x 4 devices x 3 samples
        assert int(z["labelled"].sum()) == 16 == body["dataset"]["labelled_rows"]
        p = z["inclusion_probability"]
        assert p[0::3].tolist() == [0.5] * 8 and p[1::3].tolist() == [0.05] * 8
        assert np.isnan(p[2::3]).all()
        assert z["exploration"].tolist() == [True, False, False] * 8
    stats = body["evidence"]["manifest"]
    manifest = json.loads((dataset.parent / "manifest.json").read_text())
    # Kish: 8 rows of weight 2 and 8 of weight 20 -> (16 + 160)^2 / (32 + 3200)
    assert manifest["dataset"]["effective_sample_size"] == round(176**2 / 3232, 3)
    assert manifest["dataset"]["samples_without_probability"] == 8
    assert manifest["dataset"]["exploration_rows"] == 8 and stats
    assert manifest["dataset"]["sha256"] == body["dataset"]["sha256"]
    assert manifest["manifest_sha256"] == body["manifest_sha256"] and manifest["profile_sha256"]
    listing = api.get("/api/v1/retrain-requests", role="viewer", params={"model": "fraud"})
    assert [x["id"] for x in listing.json()["requests"]] == [request_id]
    with api.sessions() as s:
        actions = [e.action for e in s.scalars(select(AuditEntry))]
    assert {"retrain.policy", "retrain.request", "retrain.hook"} <= set(actions)


def test_a_failing_hook_is_retried_and_recorded(api: Api, tmp_path: Path) -> None:
    profile = publish_with_profile(api)
    api.put("/api/v1/models/fraud/retrain-policy", role="operator",
            json={"key_features": ["amount"]})  # fmt: skip
    rng = np.random.default_rng(1)
    for step in (1, 2):
        drifting_windows(api, profile, rng, step)
    settings = api.settings.model_copy(update={
        "retrain_hook": [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
        "retrain_hook_attempts": 2,
    })  # fmt: skip
    with api.sessions() as s, s.begin():
        (request_id,) = retrain.evaluate_policies(s, settings, T0 + timedelta(minutes=3))
    assert retrain.run_hook(api.sessions, settings, request_id) == "hook_failed"
    with api.sessions() as s:
        row = s.get(RetrainRequest, request_id)
        assert row is not None and row.status == "hook_failed"
        assert [a["exit"] for a in row.hook["attempts"]] == [3, 3]
        assert "boom" in row.hook["attempts"][0]["output_tail"]


def test_policy_input_is_checked(api: Api) -> None:
    assert api.put("/api/v1/models/none/retrain-policy", role="operator",
                   json={}).status_code == 404  # fmt: skip
    publish_with_profile(api)
    r = api.put("/api/v1/models/fraud/retrain-policy", role="operator",
                json={"min_accuracy": 2})  # fmt: skip
    assert r.status_code == 422
    r = api.put("/api/v1/models/fraud/retrain-policy", role="operator", json={"bogus": 1})
    assert r.status_code == 422
    assert api.put("/api/v1/models/fraud/retrain-policy", role="viewer", json={}).status_code == 403
    assert api.get("/api/v1/models/fraud/retrain-policy", role="viewer").status_code == 404
    assert api.get("/api/v1/retrain-requests/" + "0" * 32, role="viewer").status_code == 404


def test_an_estimated_accuracy_drop_fires_a_policy_from_the_server_config(api: Api) -> None:
    """Label-free: confidences against the calibration table, policy from the server config."""
    from edgefleet.wire import OutputSummary

    # On the evaluation data: confident rows were right, unsure ones half the time.
    bins = [{"lo": b / 10, "hi": (b + 1) / 10, "n": 0, "confidence": None, "accuracy": None}
            for b in range(10)]  # fmt: skip
    bins[9].update(n=900, confidence=0.95, accuracy=0.97)
    bins[5].update(n=100, confidence=0.55, accuracy=0.5)
    profile = publish_with_profile(api, outputs=True, calibration={"output": 0, "bins": bins})
    settings = api.settings.model_copy(
        update={"retrain_policies": {"fraud": {"max_estimated_drop": 0.1, "min_estimate_n": 500}}}
    )
    rng = np.random.default_rng(2)

    def ingest(step: int, confidence: tuple[int, ...]) -> None:
        base = window(profile, "pi-1", step, rng, {}, 600)
        out = OutputSummary(0, 1800, 0.33, 0.3, 0.0, 1.0, (200, 200, 200), confidence)
        record = TelemetryRecord(
            "pi-1", step, base.window_start, base.window_end, base.model,
            predictions=600, features=base.features, outputs=(out,),
        )  # fmt: skip
        with api.sessions() as s:
            telemetry.ingest_batch(s, [record], now=T0 + timedelta(minutes=step))
            s.commit()

    ingest(1, (0,) * 9 + (600,))  # as confident as on the evaluation data: no drop
    with api.sessions() as s, s.begin():
        assert retrain.evaluate_policies(s, settings, T0 + timedelta(minutes=2)) == []
    ingest(2, (0,) * 5 + (1200,) + (0,) * 4)  # now mostly unsure
    with api.sessions() as s, s.begin():
        (request_id,) = retrain.evaluate_policies(s, settings, T0 + timedelta(minutes=3))
    body = api.get(f"/api/v1/retrain-requests/{request_id}", role="viewer").json()
    trigger = body["evidence"]["trigger"]
    assert trigger["kind"] == "estimated" and "estimated accuracy" in body["reason"]
    # 600 rows at 0.97 and 1,200 at 0.5 against a reference of 0.923
    assert trigger["estimated_accuracy"] == round((600 * 0.97 + 1200 * 0.5) / 1800, 6)
    assert trigger["reference_accuracy"] == round((900 * 0.97 + 100 * 0.5) / 1000, 6)
    with api.sessions() as s:
        from server.services.retrain import get_policy

        policy = get_policy(s, "fraud", settings.retrain_policies)
        assert policy is not None and policy.max_estimated_drop == 0.1


def test_configured_policies_are_checked() -> None:
    import pytest

    from server.settings import Settings

    with pytest.raises(ValueError, match=r"retrain_policies\.fraud: unknown fields"):
        Settings(retrain_policies={"fraud": {"max_drop": 0.1}})
    with pytest.raises(ValueError, match="max_estimated_drop"):
        Settings(retrain_policies={"fraud": {"max_estimated_drop": 3}})
    with pytest.raises(ValueError, match="key_features must be a list"):
        Settings(retrain_policies={"fraud": {"key_features": "amount"}})
