"""``edgefleet agent ...``: JSON output, readable output, exit codes, trust-root pinning."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from edgefleet.cli import main
from edgefleet.keystore import KeyStore
from edgefleet.timeutil import utcnow
from firmware_sim.models import GOLDEN_X, BundleSet


def run_json(capsys, *argv: str) -> tuple[int, dict]:
    code = main(["agent", *argv, "--json"])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return code, json.loads(lines[0])


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def install(capsys, state: Path, bundle: Path, *extra: str) -> tuple[int, dict]:
    return run_json(capsys, "install", str(bundle), "--state-dir", str(state), *extra)


def test_cli_install_status_predict_rollback(capsys, state, bundles: BundleSet, tmp_path):
    root = str(bundles.release.trust_root_path)
    code, out = install(capsys, state, bundles.v1, "--trust-root", root)
    assert code == 0 and out["ok"] and out["outcome"] == "committed" and out["version"] == 1
    code, out = install(capsys, state, bundles.v2)  # the pinned root is kept
    assert code == 0 and out["active"]["slot"] == "b"

    code, status = run_json(capsys, "status", "--state-dir", str(state))
    assert code == 0 and status["state"] == "idle"
    assert {"state", "active", "rollback_floor", "last_error"} <= set(status)
    assert set(status["active"]) == {"slot", "model", "version", "manifest_sha256"}
    assert status["rollback_floor"] == {"tiny": 2} and status["last_error"] is None

    npy = tmp_path / "x.npy"
    np.save(npy, GOLDEN_X)
    code, pred = run_json(capsys, "predict", "--state-dir", str(state), "--input", str(npy))
    assert code == 0 and pred["version"] == 2
    assert np.asarray(pred["outputs"]["probs"]["data"]).shape == (2, 3)

    code, out = run_json(capsys, "rollback", "--state-dir", str(state))
    assert code == 0 and out["outcome"] == "rolled-back" and out["active"]["version"] == 1


def test_cli_status_before_first_install(capsys, state):
    code, status = run_json(capsys, "status", "--state-dir", str(state))
    assert code == 0 and status["active"] is None and status["state"] == "idle"


@pytest.mark.parametrize(
    ("kind", "error", "code"),
    [("nan", "NonFiniteOutputError", 44), ("unknown_op", "ModelLoadError", 41)],
)
def test_cli_install_bad_model_exit_code(capsys, state, bundles: BundleSet, kind, error, code):
    root = str(bundles.release.trust_root_path)
    install(capsys, state, bundles.v1, "--trust-root", root)
    rc, out = install(capsys, state, bundles.bad[kind])
    assert rc == code and out["outcome"] == "rolled-back" and out["error"]["error"] == error
    _, status = run_json(capsys, "status", "--state-dir", str(state))
    assert status["last_error"]["error"] == error and status["active"]["version"] == 1


def test_cli_install_wrong_device_class(capsys, state, bundles: BundleSet):
    root = str(bundles.release.trust_root_path)
    rc, out = install(capsys, state, bundles.wrong_target, "--trust-root", root)
    assert rc == 18 and out["error"]["error"] == "WrongTargetError"
    rc, out = install(capsys, state, bundles.wrong_target, "--device-class", "other")
    assert rc == 0 and out["outcome"] == "committed"


def test_cli_install_without_trust_root(capsys, state, bundles: BundleSet):
    rc, out = install(capsys, state, bundles.v1)
    assert rc == 53 and out["error"] == "NoTrustRootError" and "--trust-root" in out["message"]


def test_cli_foreign_trust_root_refused(capsys, state, bundles: BundleSet, tmp_path):
    install(capsys, state, bundles.v1, "--trust-root", str(bundles.release.trust_root_path))
    other = KeyStore(tmp_path / "other")
    other.init(now=utcnow() - timedelta(days=1))
    rc, out = install(capsys, state, bundles.v2, "--trust-root", str(other.trust_root_path))
    assert rc == 16 and "not the pinned trust root v1" in out["message"]


def test_cli_missing_bundle_file(capsys, state, bundles: BundleSet, tmp_path):
    root = str(bundles.release.trust_root_path)
    rc, out = install(capsys, state, tmp_path / "nope.bundle", "--trust-root", root)
    assert rc == 1 and out["error"] == "FileError" and "nope.bundle" in out["message"]


def test_cli_rollback_nothing(capsys, state, bundles: BundleSet):
    install(capsys, state, bundles.v1, "--trust-root", str(bundles.release.trust_root_path))
    rc, out = run_json(capsys, "rollback", "--state-dir", str(state))
    assert rc == 55 and out["error"] == "NothingToRollBackError"


def test_cli_predict_without_model(capsys, state, tmp_path):
    npy = tmp_path / "x.npy"
    np.save(npy, GOLDEN_X)
    rc, out = run_json(capsys, "predict", "--state-dir", str(state), "--input", str(npy))
    assert rc == 54 and out["error"] == "NoActiveModelError"


def test_cli_readable_output(capsys, state, bundles: BundleSet):
    root = str(bundles.release.trust_root_path)
    assert main(["agent", "install", str(bundles.v1), "--state-dir", str(state),
                 "--trust-root", root]) == 0  # fmt: skip
    assert "committed tiny v1" in capsys.readouterr().out
    assert main(["agent", "install", str(bundles.nan), "--state-dir", str(state)]) == 44
    out = capsys.readouterr().out
    assert "rolled-back" in out and "NonFiniteOutputError" in out
    assert main(["agent", "status", "--state-dir", str(state)]) == 0
    out = capsys.readouterr().out
    assert "tiny v1" in out and "NonFiniteOutputError" in out
