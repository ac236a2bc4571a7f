"""Build jobs: worker thread, lease expiry after a replica dies, real compression."""

from __future__ import annotations

import sys
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from sqlalchemy import update

from server.models import Job, Lease
from server.services import jobs
from tests.server.conftest import Api, make_api, npz, onnx_model, run_jobs, upload


def _job(api: Api, job_id: str) -> dict:
    return api.get(f"/api/v1/jobs/{job_id}", role="viewer").json()


def test_worker_thread_builds_queued_version(settings, engine) -> None:
    live = settings.model_copy(update={"worker_enabled": True, "worker_poll_seconds": 0.05})
    api = make_api(live, engine)
    with api.client:  # lifespan starts the worker
        job_id = upload(api, "m", onnx_model()).json()["job"]["id"]
        deadline = time.monotonic() + 30
        while _job(api, job_id)["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, _job(api, job_id)
            time.sleep(0.05)
        assert _job(api, job_id)["status"] == "succeeded"
        assert api.get("/api/v1/models/m/versions/1", role="viewer").json()["status"] == "published"


def test_job_of_dead_replica_is_requeued_after_lease(api: Api) -> None:
    job_id = upload(api, "m", onnx_model()).json()["job"]["id"]
    with api.sessions() as s:
        assert jobs.claim_next(s, api.settings, "dead-replica") == job_id
    # the replica died: no heartbeat, the lease runs out
    with api.sessions() as s:
        s.execute(
            update(Lease).values(expires_at=datetime.now(timezone.utc) - timedelta(seconds=1))
        )
        s.commit()
    assert run_jobs(api) == 1
    job = _job(api, job_id)
    assert job["status"] == "succeeded" and job["attempts"] == 2
    assert api.get("/api/v1/models/m/versions/1", role="viewer").json()["status"] == "published"


def test_running_job_with_live_lease_is_not_stolen(api: Api) -> None:
    job_id = upload(api, "m", onnx_model()).json()["job"]["id"]
    with api.sessions() as s:
        assert jobs.claim_next(s, api.settings, "busy-replica") == job_id
    assert run_jobs(api) == 0
    assert _job(api, job_id)["status"] == "running"


def test_job_fails_after_max_attempts_and_version_can_be_reuploaded(api: Api) -> None:
    job_id = upload(api, "m", onnx_model(), version=1).json()["job"]["id"]
    with api.sessions() as s:
        jobs.claim_next(s, api.settings, "r")
        s.execute(update(Job).values(attempts=api.settings.job_max_attempts))
        s.execute(
            update(Lease).values(expires_at=datetime.now(timezone.utc) - timedelta(seconds=1))
        )
        s.commit()
    run_jobs(api)
    job = _job(api, job_id)
    assert job["status"] == "failed" and "gave up after 3 attempts" in job["error"]
    v = api.get("/api/v1/models/m/versions/1", role="viewer").json()
    assert v["status"] == "failed" and v["error"] == job["error"]
    again = upload(api, "m", onnx_model(), version=1)
    assert again.status_code == 202, again.text
    run_jobs(api)
    assert api.get("/api/v1/models/m/versions/1", role="viewer").json()["status"] == "published"


def _data(rows: int, features: int = 4, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, features)).astype("float32")


def test_compression_job_real_pipeline(api: Api) -> None:
    files = {
        "calib": ("calib.npz", npz(x=_data(64)), "application/octet-stream"),
        "eval": ("eval.npz", npz(x=_data(64, seed=2)), "application/octet-stream"),
    }
    r = upload(
        api, "small", onnx_model(features=4, classes=3), compress=True, max_drop=0.5, files=files
    )
    assert r.status_code == 202, r.text
    run_jobs(api)
    job = _job(api, r.json()["job"]["id"])
    assert job["status"] == "succeeded", job
    v = api.get("/api/v1/models/small/versions/1", role="viewer").json()
    assert v["status"] == "published"
    assert v["report"]["format"] == "edgefleet.compression.report/1"
    assert v["lineage"]["compressed"] == "true"
    assert v["lineage"]["compression_report_sha256"]
    assert v["model_card"]["compression"]["metric_name"] == v["report"]["metric_name"]
    bundle = api.get("/api/v1/models/small/versions/1/bundle", role="viewer").content
    from edgefleet.trust import read_header

    manifest = read_header(bundle).manifest()
    assert manifest.health_check and manifest.drift_reference is not None


def test_compression_job_bad_data_fails_with_reason(api: Api) -> None:
    files = {
        "calib": ("calib.npz", npz(x=_data(16, features=7)), "application/octet-stream"),
        "eval": ("eval.npz", npz(x=_data(16, features=7)), "application/octet-stream"),
    }
    r = upload(api, "small", onnx_model(), compress=True, files=files)
    run_jobs(api)
    job = _job(api, r.json()["job"]["id"])
    assert job["status"] == "failed"
    assert job["error"].startswith("compression failed:")
    assert api.get("/api/v1/models/small/versions/1", role="viewer").json()["status"] == "failed"


def test_compression_unavailable_fails_job_clearly(api: Api, monkeypatch) -> None:
    # An install without the compression extra: importing the package fails.
    monkeypatch.setitem(sys.modules, "compression", None)
    files = {
        "calib": ("calib.npz", npz(x=_data(8)), "application/octet-stream"),
        "eval": ("eval.npz", npz(x=_data(8)), "application/octet-stream"),
    }
    r = upload(api, "m", onnx_model(), compress=True, files=files)
    run_jobs(api)
    job = _job(api, r.json()["job"]["id"])
    assert job["status"] == "failed"
    assert "compression is not available on this server" in job["error"]


@pytest.mark.parametrize("bad", [b"not a zip", b""])
def test_bad_npz_rejected(api: Api, bad: bytes) -> None:
    files = {
        "calib": ("calib.npz", bad, "application/octet-stream"),
        "eval": ("eval.npz", npz(x=_data(8)), "application/octet-stream"),
    }
    r = upload(api, "m", onnx_model(), compress=True, files=files)
    assert r.status_code == 422 and "CALIB" in r.json()["detail"]
