"""Benchmark ``edgefleet compress`` on the two examples against a plain baseline.

Flow: for each example (``examples/fraud``, ``examples/digits``) train it into a
temporary directory (seconds, seeded), run ``compression.compress`` exactly as
``edgefleet compress MODEL --calib --eval --out --prune 0.7 --quant auto
--max-drop 0.01`` would, then in the same process build the baseline:
``onnxruntime.quantization.quantize_dynamic`` with default settings on the same
fp32 ONNX export, scored with the same metric, zstd level and latency settings.

Prints per example: int8 size ratio, best on-wire ratio, metric drop and p50
latency for ours and the baseline, and checks the targets (int8 >= 3.9x,
wire >= 8x, drop <= 0.01, auto never worse than the baseline on both size and
metric at once). ``--json`` prints one JSON object keyed by example name.
Exit code 1 when a target is missed.

Run: ``python benchmarks/compression.py [--json]``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

# This file is named like the package it benchmarks: drop its own directory
# from the import path so ``import compression`` finds the package, not us.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from compression import CompressConfig, GlobalMagnitudePruning, Metric, compress  # noqa: E402
from compression.data import bind_inputs, check_against_specs, load_npz  # noqa: E402
from compression.evaluate import degradation, latency_p50_ms, run_model, score  # noqa: E402
from compression.modelio import (  # noqa: E402
    default_output_names,
    export_onnx,
    load_model,
    make_session,
    module_for_export,
    onnx_input_specs,
    save_onnx,
)
from compression.pipeline import wire_size  # noqa: E402
from compression.progress import ProgressReporter  # noqa: E402
from compression.quantize import quiet_quantizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PRUNE = 0.7
MAX_DROP = 0.01
TARGET_INT8_RATIO = 3.9
TARGET_WIRE_RATIO = 8.0


def _load_example(name: str) -> ModuleType:
    path = ROOT / "examples" / name / "train.py"
    spec = importlib.util.spec_from_file_location(f"edgefleet_example_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _baseline(
    model_path: Path, calib_path: Path, eval_path: Path, config: CompressConfig, workdir: Path
) -> dict[str, Any]:
    """Default ``quantize_dynamic`` on the same fp32 export, scored the same way."""
    from onnxruntime.quantization import quantize_dynamic

    loaded = load_model(model_path)
    calib = bind_inputs(load_npz(calib_path, "CALIB"), loaded.input_names, "CALIB")
    example = tuple(torch.from_numpy(calib[n][:2]) for n in loaded.input_names)
    module = module_for_export(loaded, example)
    fp32 = export_onnx(
        module,
        example,
        loaded.input_names,
        default_output_names(1),
        config.opset,
        ProgressReporter(False),
    )
    fp32_path, base_path = workdir / "fp32.onnx", workdir / "baseline.onnx"
    save_onnx(fp32, fp32_path)
    with quiet_quantizer():
        quantize_dynamic(str(fp32_path), str(base_path))

    eval_arrays = load_npz(eval_path, "EVAL")
    inputs = check_against_specs(
        bind_inputs(eval_arrays, loaded.input_names, "EVAL"), onnx_input_specs(fp32), "EVAL"
    )
    labels = eval_arrays["labels"].astype(np.int64)
    fp32_data, base_data = fp32_path.read_bytes(), base_path.read_bytes()
    fp32_session = make_session(fp32_data, config.latency.threads)
    base_session = make_session(base_data, config.latency.threads)
    ref = run_model(fp32_session, inputs, config.eval_batch_size)[0]
    out = run_model(base_session, inputs, config.eval_batch_size)[0]
    metric = Metric.ACCURACY
    fp32_value = score(metric, ref, ref, labels, config.binary_threshold)
    value = score(metric, out, ref, labels, config.binary_threshold)
    feed = {n: a[: config.latency.batch_size] for n, a in inputs.items()}
    return {
        "size_ratio": round(len(fp32_data) / len(base_data), 4),
        "wire_ratio": round(len(fp32_data) / wire_size(base_data, config.zstd_level), 4),
        "metric_drop": degradation(metric, fp32_value, value),
        "latency_p50_ms": latency_p50_ms(
            base_session, feed, config.latency.runs, config.latency.warmup
        ),
        "bytes": len(base_data),
        "wire_bytes": wire_size(base_data, config.zstd_level),
    }


def run_example(name: str, workdir: Path, show_progress: bool) -> dict[str, Any]:
    """Train one example, compress it, and measure the baseline."""
    example = _load_example(name)
    data_dir = workdir / name
    example.main(["--out", str(data_dir)]) if show_progress else _quiet_train(example, data_dir)
    config = CompressConfig(
        metric=Metric.ACCURACY,
        max_drop=MAX_DROP,
        prune=GlobalMagnitudePruning(PRUNE),
        show_progress=show_progress,
    )
    feature_names = list(getattr(example, "FEATURE_NAMES", ())) or None
    result = compress(
        data_dir / "model.pt2",
        data_dir / "calib.npz",
        data_dir / "eval.npz",
        data_dir / "out",
        config=config,
        feature_names=feature_names,
    )
    report = result.report
    baseline = _baseline(
        data_dir / "model.pt2", data_dir / "calib.npz", data_dir / "eval.npz", config, data_dir
    )
    loses_both = (
        report["wire_bytes"] > baseline["wire_bytes"]
        and report["metric_drop"] > baseline["metric_drop"]
    )
    return {
        "size_ratio": report["int8_size_ratio"],
        "wire_ratio": report["wire_ratio"],
        "metric_drop": report["metric_drop"],
        "latency_p50_ms": report["latency_p50_ms"],
        "latency_p50_ms_fp32": report["latency_p50_ms_fp32"],
        "chosen": report["config"]["name"],
        "chosen_size_ratio": report["size_ratio"],
        "metric_fp32": report["metric_fp32"],
        "baseline": baseline,
        "targets": {
            "int8_ratio_ge_3.9": report["int8_size_ratio"] >= TARGET_INT8_RATIO,
            "wire_ratio_ge_8": report["wire_ratio"] >= TARGET_WIRE_RATIO,
            "drop_le_1_point": report["metric_drop"] <= MAX_DROP + 1e-9,
            "auto_not_worse_than_baseline_on_both": not loses_both,
        },
    }


def _quiet_train(example: ModuleType, data_dir: Path) -> None:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        example.main(["--out", str(data_dir)])


def _print_human(results: dict[str, dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"edgefleet compress (prune {PRUNE}, auto, max-drop {MAX_DROP})")
    for column in ("example", "run", "int8 size x", "wire x", "drop", "p50 ms", "chosen"):
        table.add_column(column)
    for name, r in results.items():
        b = r["baseline"]
        table.add_row(
            name,
            "edgefleet",
            f"{r['size_ratio']:.2f}",
            f"{r['wire_ratio']:.2f}",
            f"{r['metric_drop']:.4f}",
            f"{r['latency_p50_ms']:.3f}",
            r["chosen"],
        )
        table.add_row(
            "",
            "quantize_dynamic",
            f"{b['size_ratio']:.2f}",
            f"{b['wire_ratio']:.2f}",
            f"{b['metric_drop']:.4f}",
            f"{b['latency_p50_ms']:.3f}",
            "default settings",
        )
    Console(width=140).print(table)
    for name, r in results.items():
        marks = ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in r["targets"].items())
        print(f"{name}: {marks}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="benchmark edgefleet compress on the examples")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        for name in ("fraud", "digits"):
            results[name] = run_example(name, Path(tmp), show_progress=not args.json)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print_human(results)
    ok = all(all(r["targets"].values()) for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
