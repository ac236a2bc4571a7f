"""``edgefleet drift profile`` and ``edgefleet drift compute``: offline, from files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgefleet.cli import main


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict]:
    code = main(list(argv))
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1])


@pytest.fixture
def profiled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(5000, 4)).astype(np.float32))
    ref = tmp_path / "ref.json"
    code, out = run(capsys, "drift", "profile", "--data", str(tmp_path / "calib.npz"),
                    "--feature-names", "a,b,c,d", "--out", str(ref), "--json")  # fmt: skip
    assert code == 0 and out["features"] == 4 and out["bins"] == 10
    return ref


def test_profile_then_compute_flags_the_shifted_feature_only(
    tmp_path: Path, profiled: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = json.loads(profiled.read_text())
    assert [f["name"] for f in profile["features"]] == ["a", "b", "c", "d"]
    assert all(sum(f["counts"]) == f["n"] == 5000 for f in profile["features"])
    x = np.random.default_rng(1).normal(size=(2000, 4)).astype(np.float32)
    x[:, 2] += 1.0
    np.savez(tmp_path / "prod.npz", x=x)
    code, out = run(capsys, "drift", "compute", "--reference", str(profiled),
                    "--data", str(tmp_path / "prod.npz"), "--json")  # fmt: skip
    assert code == 0
    status = {f["name"]: f["status"] for f in out["features"]}
    assert status == {"a": "ok", "b": "ok", "c": "alarm", "d": "ok"}
    c = out["features"][2]
    assert c["n"] == 2000 and c["psi"] > 0.25 and c["chi2_p"] < 1e-6 and c["fdr_passed"] is True
    assert set(c) >= {"name", "index", "n", "psi", "js", "ks", "chi2_p", "status"}
    assert out["outputs"] is None and out["dataset_drift"] is True


def test_small_batches_are_insufficient(
    tmp_path: Path, profiled: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.savez(tmp_path / "few.npz", x=np.full((100, 4), 5.0, np.float32))
    code, out = run(capsys, "drift", "compute", "--reference", str(profiled),
                    "--data", str(tmp_path / "few.npz"), "--json")  # fmt: skip
    assert code == 0 and {f["status"] for f in out["features"]} == {"insufficient"}
    assert out["dataset_drift"] is False


def test_bad_input_is_a_clear_error(
    tmp_path: Path, profiled: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.savez(tmp_path / "narrow.npz", x=np.zeros((600, 2), np.float32))
    np.savez(tmp_path / "other.npz", y=np.zeros((600, 4), np.float32))
    (tmp_path / "notaprofile.json").write_text('{"bins": 10, "features": [{"name": 1}]}')
    cases = [
        (["--reference", str(profiled), "--data", str(tmp_path / "missing.npz")], "not found"),
        (["--reference", str(profiled), "--data", str(tmp_path / "narrow.npz")], "column 2"),
        (["--reference", str(profiled), "--data", str(tmp_path / "other.npz")], "input 'x'"),
        (
            [
                "--reference",
                str(tmp_path / "notaprofile.json"),
                "--data",
                str(tmp_path / "narrow.npz"),
            ],
            "needs exactly",
        ),
        (["--reference", str(tmp_path / "nope.json"), "--data", str(profiled)], "cannot read"),
    ]
    for argv, needle in cases:
        code, out = run(capsys, "drift", "compute", *argv, "--json")
        assert code == 1 and out["ok"] is False and needle in out["message"], out
    code, out = run(capsys, "drift", "compute", "--reference", str(profiled), "--data",
                    str(tmp_path / "other.npz"), "--input", "y", "--json")  # fmt: skip
    assert code == 0 and len(out["features"]) == 4
