"""``edgefleet compress`` through compression.cli: output, exit codes, one-line errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pytest

from compression import cli


def _run(argv, capsys):
    code = cli.main(["compress", *argv, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_add_parser_registers_compress_with_run():
    parser = argparse.ArgumentParser(prog="edgefleet")
    sub = parser.add_subparsers(dest="command")
    cli.add_parser(sub)
    args = parser.parse_args(
        ["compress", "m.onnx", "--calib", "c.npz", "--eval", "e.npz", "--out", "d", "--json"]
    )
    assert args.func is cli.run
    assert args.quant == "auto" and args.max_drop == 0.01 and args.json


def test_importing_cli_does_not_import_torch_or_onnx():
    code = (
        "import sys, compression.cli; "
        "bad = [m for m in ('torch', 'onnx', 'onnxruntime', 'numpy') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_json_success(tmp_path, mlp_pt2, mlp_npz, capsys):
    calib, evald = mlp_npz
    out_dir = tmp_path / "out"
    code, out, _ = _run(
        [
            str(mlp_pt2),
            "--calib",
            str(calib),
            "--eval",
            str(evald),
            "--out",
            str(out_dir),
            "--quant",
            "dynamic",
            "--max-drop",
            "0.05",
            "--json",
        ],
        capsys,
    )
    assert code == 0
    report = json.loads(out)
    assert report["ok"] is True and report["config"]["name"] == "dynamic"
    assert report["wire_bytes"] < report["bytes"] < report["fp32_bytes"]
    assert (out_dir / "model.onnx").is_file() and (out_dir / "health_check.json").is_file()


def test_human_output_prints_table_and_summary(tmp_path, mlp_onnx, mlp_npz, capsys):
    calib, evald = mlp_npz
    code, out, _ = _run(
        [
            str(mlp_onnx),
            "--calib",
            str(calib),
            "--eval",
            str(evald),
            "--out",
            str(tmp_path),
            "--quant",
            "static",
            "--calibration",
            "minmax",
            "--prune",
            "0.3",
            "--max-drop",
            "0.05",
        ],
        capsys,
    )
    assert code == 0
    assert "prune0.3+static-minmax" in out and "chosen" in out
    assert "wrote" in out and "report.json" in out


def test_cli_shape_mismatch_exits_2_with_one_line(tmp_path, mlp_pt2, capsys):
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.zeros((10, 15), dtype=np.float32))
    code, _out, err = _run(
        [str(mlp_pt2), "--calib", str(calib), "--eval", str(calib), "--out", str(tmp_path / "o")],
        capsys,
    )
    assert code == cli.EXIT_INPUT
    line = _error_line(err)
    assert line.startswith("edgefleet compress: error: ShapeMismatchError:")
    assert "(10, 15)" in line
    assert not (tmp_path / "o").exists()


def test_cli_accuracy_without_labels_exits_2(tmp_path, mlp_pt2, mlp_npz, capsys):
    calib, _ = mlp_npz
    code, _, err = _run(
        [
            str(mlp_pt2),
            "--calib",
            str(calib),
            "--eval",
            str(calib),
            "--out",
            str(tmp_path),
            "--metric",
            "accuracy",
        ],
        capsys,
    )
    assert code == cli.EXIT_INPUT
    assert "MissingLabelsError" in _error_line(err)


def test_cli_file_that_is_not_a_model_exits_2(tmp_path, mlp_npz, capsys):
    calib, evald = mlp_npz
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"\x00\x01not really a model" * 10)
    code, _, err = _run(
        [str(fake), "--calib", str(calib), "--eval", str(evald), "--out", str(tmp_path / "o")],
        capsys,
    )
    assert code == cli.EXIT_INPUT
    assert "NotAModelError" in _error_line(err)


def test_cli_missing_calib_file_exits_2(tmp_path, mlp_pt2, capsys):
    code, _, err = _run(
        [str(mlp_pt2), "--calib", str(tmp_path / "nope.npz"), "--eval", "x", "--out", "o"],
        capsys,
    )
    assert code == cli.EXIT_INPUT
    assert "DataError" in _error_line(err)


def test_cli_bad_opset_is_a_one_line_config_error(tmp_path, mlp_pt2, mlp_npz, capsys):
    calib, evald = mlp_npz
    code, _, err = _run(
        [
            str(mlp_pt2),
            "--calib",
            str(calib),
            "--eval",
            str(evald),
            "--out",
            str(tmp_path),
            "--opset",
            "9",
        ],
        capsys,
    )
    assert code == cli.EXIT_INPUT
    assert "ConfigError" in _error_line(err)


def test_cli_nothing_passes_exits_3_and_prints_table(tmp_path, mlp_pt2, mlp_npz, capsys):
    calib, evald = mlp_npz
    out_dir = tmp_path / "out"
    code, out, err = _run(
        [
            str(mlp_pt2),
            "--calib",
            str(calib),
            "--eval",
            str(evald),
            "--out",
            str(out_dir),
            "--metric",
            "mse",
            "--max-drop",
            "0",
            "--quant",
            "dynamic",
        ],
        capsys,
    )
    assert code == cli.EXIT_GATE
    assert "dynamic" in out and "over max-drop" in out
    assert "GateError" in _error_line(err)
    assert not out_dir.exists()


def test_cli_nothing_passes_json_lists_candidates(tmp_path, mlp_pt2, mlp_npz, capsys):
    calib, evald = mlp_npz
    code, out, _ = _run(
        [
            str(mlp_pt2),
            "--calib",
            str(calib),
            "--eval",
            str(evald),
            "--out",
            str(tmp_path / "o"),
            "--metric",
            "mse",
            "--max-drop",
            "0",
            "--quant",
            "fp16",
            "--json",
        ],
        capsys,
    )
    assert code == cli.EXIT_GATE
    payload = json.loads(out)
    assert payload["ok"] is False and [c["name"] for c in payload["candidates"]] == ["fp16"]


def test_cli_rejects_prune_amount_outside_unit_interval(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["compress", "m", "--calib", "c", "--eval", "e", "--out", "o", "--prune", "1.5"])
    assert info.value.code == 2
    assert "must be in (0, 1)" in capsys.readouterr().err


def test_module_entry_point_runs(tmp_path, mlp_pt2, mlp_npz):
    calib, evald = mlp_npz
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "compression.cli",
            "compress",
            str(mlp_pt2),
            "--calib",
            str(calib),
            "--eval",
            str(evald),
            "--out",
            str(tmp_path),
            "--quant",
            "fp16",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["config"]["name"] == "fp16"
