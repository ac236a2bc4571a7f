"""The keys/bundle CLI as documented: the issue's literal forms, --json, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgefleet.cli import main
from edgefleet.errors import (
    HashMismatchError,
    RollbackError,
    ThresholdNotMetError,
    UnknownKeyError,
    WrongTargetError,
)
from firmware_sim.models import linear_model as make_linear_model
from tests.edgefleet.bundlekit import members


def run(capsys, *argv: str) -> tuple[int, dict]:
    code = main(list(argv))
    out = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(out[-1]) if out else {}


@pytest.fixture
def setup(tmp_path, capsys):
    keys = tmp_path / "KEYS"
    code, result = run(capsys, "keys", "init", "--dir", str(keys), "--json")
    assert code == 0 and result["version"] == 1
    model = tmp_path / "model.onnx"
    model.write_bytes(make_linear_model())
    return keys, model


def test_cli_literal_forms(setup, tmp_path, capsys):
    keys, model = setup
    assert (keys / "trust-root.json").exists() and (keys / "release-1.key").exists()
    out = tmp_path / "m.bundle"
    assert (
        main(
            [
                "bundle",
                "build",
                str(model),
                "--name",
                "fraud",
                "--version",
                "3",
                "--key",
                str(keys / "release-1.key"),
                "--device-class",
                "pi4",
                "--expires-in",
                "30",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    code, result = run(
        capsys,
        "bundle",
        "verify",
        str(out),
        "--trust-root",
        str(keys / "trust-root.json"),
        "--device-class",
        "pi4",
        "--installed-version",
        "2",
        "--json",
    )
    assert code == 0 and result["verified"] is True and result["version"] == 3
    code, result = run(
        capsys,
        "bundle",
        "verify",
        str(out),
        "--trust-root",
        str(keys / "trust-root.json"),
        "--installed-version",
        "3",
        "--json",
    )
    assert code == RollbackError.code and result["error"] == "RollbackError"
    code, result = run(
        capsys,
        "bundle",
        "verify",
        str(out),
        "--trust-root",
        str(keys / "trust-root.json"),
        "--device-class",
        "jetson",
        "--json",
    )
    assert code == WrongTargetError.code


def test_cli_tampered_copy_rejected(setup, tmp_path, capsys):
    keys, model = setup
    out = tmp_path / "m.bundle"
    main(
        [
            "bundle",
            "build",
            str(model),
            "--name",
            "m",
            "--version",
            "1",
            "--compression",
            "none",
            "--key",
            str(keys / "release-1.key"),
            "--out",
            str(out),
        ]
    )
    data = bytearray(out.read_bytes())
    _name, off, size = members(bytes(data))[2]
    data[off + 512 + size // 2] ^= 1  # inside the payload
    bad = tmp_path / "bad.bundle"
    bad.write_bytes(bytes(data))
    capsys.readouterr()
    code, result = run(
        capsys,
        "bundle",
        "verify",
        str(bad),
        "--trust-root",
        str(keys / "trust-root.json"),
        "--json",
    )
    assert code == HashMismatchError.code, result
    assert result["ok"] is False and "sha256" in result["message"]


def test_cli_offline_m_of_n_signing(tmp_path, capsys):
    keys = tmp_path / "K"
    assert (
        main(
            ["keys", "init", "--dir", str(keys), "--release-keys", "3", "--release-threshold", "2"]
        )
        == 0
    )
    model = tmp_path / "model.onnx"
    model.write_bytes(make_linear_model())
    out = tmp_path / "b.bundle"
    assert (
        main(
            [
                "bundle",
                "build",
                str(model),
                "--name",
                "m",
                "--version",
                "1",
                "--unsigned",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    trust = str(keys / "trust-root.json")
    code, result = run(capsys, "bundle", "verify", str(out), "--trust-root", trust, "--json")
    assert code == ThresholdNotMetError.code
    # Two signers on "separate machines": each adds one signature to the file.
    assert main(["bundle", "sign", str(out), "--key", str(keys / "release-1.key")]) == 0
    capsys.readouterr()
    code, _ = run(capsys, "bundle", "verify", str(out), "--trust-root", trust, "--json")
    assert code == ThresholdNotMetError.code
    code, result = run(
        capsys, "bundle", "sign", str(out), "--key", str(keys / "release-3.key"), "--json"
    )
    assert code == 0 and len(result["signatures"]) == 2
    code, result = run(capsys, "bundle", "verify", str(out), "--trust-root", trust, "--json")
    assert code == 0 and len(result["signed_by"]) == 2


def test_cli_rotate_and_revoke(setup, tmp_path, capsys):
    keys, model = setup
    old = tmp_path / "old.bundle"
    main(
        [
            "bundle",
            "build",
            str(model),
            "--name",
            "m",
            "--version",
            "1",
            "--key",
            str(keys / "release-1.key"),
            "--out",
            str(old),
        ]
    )
    capsys.readouterr()
    code, result = run(capsys, "keys", "rotate", "--dir", str(keys), "--add-release", "1", "--json")
    assert code == 0 and result["version"] == 2
    release1 = result["roles"]["release"]["keys"][0]["keyid"]
    code, result = run(capsys, "keys", "revoke", release1[:12], "--dir", str(keys), "--json")
    assert code == 0 and result["version"] == 3
    assert all(k["keyid"] != release1 for k in result["roles"]["release"]["keys"])
    code, result = run(
        capsys,
        "bundle",
        "verify",
        str(old),
        "--trust-root",
        str(keys / "trust-root.json"),
        "--json",
    )
    assert code == UnknownKeyError.code
    assert (keys / "trust-root.2.json").exists() and (keys / "trust-root.3.json").exists()


def test_cli_errors_name_the_problem(tmp_path, capsys):
    code, result = run(
        capsys,
        "bundle",
        "verify",
        str(tmp_path / "nope.bundle"),
        "--trust-root",
        str(tmp_path / "nope.json"),
        "--json",
    )
    assert code == 1 and "nope.json" in result["message"]
    not_onnx = tmp_path / "x.onnx"
    not_onnx.write_bytes(b"hello")
    keys = tmp_path / "K"
    main(["keys", "init", "--dir", str(keys), "--json"])
    capsys.readouterr()
    code, result = run(
        capsys,
        "bundle",
        "build",
        str(not_onnx),
        "--name",
        "m",
        "--version",
        "1",
        "--key",
        str(keys / "release-1.key"),
        "--out",
        str(tmp_path / "o.bundle"),
        "--json",
    )
    assert code == 1 and result["error"] == "ModelFileError"
    assert not (tmp_path / "o.bundle").exists()
    code, result = run(
        capsys,
        "bundle",
        "build",
        str(not_onnx),
        "--name",
        "Bad Name",
        "--version",
        "1",
        "--unsigned",
        "--out",
        str(tmp_path / "o.bundle"),
        "--json",
    )
    assert code != 0


def test_cli_external_data_model_refused(tmp_path, capsys):
    import onnx

    model = onnx.load_model_from_string(make_linear_model(features=64, classes=64))
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    keys = tmp_path / "K"
    main(["keys", "init", "--dir", str(keys)])
    capsys.readouterr()
    code, result = run(
        capsys,
        "bundle",
        "build",
        str(path),
        "--name",
        "m",
        "--version",
        "1",
        "--key",
        str(keys / "release-1.key"),
        "--out",
        str(tmp_path / "o"),
        "--json",
    )
    assert code == 1 and "external" in result["message"]


def test_console_script_help_is_fast_and_complete():
    out = subprocess.run(
        [sys.executable, "-m", "edgefleet.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for verb in ("keys", "bundle"):
        assert verb in out
    out = subprocess.run(
        [sys.executable, "-m", "edgefleet.cli", "bundle", "verify", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--trust-root" in out and "--installed-version" in out
