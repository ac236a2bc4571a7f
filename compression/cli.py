"""The ``edgefleet compress`` sub-command.

Flow: the main CLI calls :func:`add_parser` to register ``compress`` and later
calls ``args.func(args)``, i.e. :func:`run`, which builds a typed
:class:`~compression.config.CompressConfig` from the arguments, calls
:func:`compression.compress` and prints either a rich table (people) or one
JSON object (``--json``, machines) on stdout. Progress bars go to stderr.

Exit codes: 0 a candidate passed and DIR was written; 2 bad input (model,
data, arguments: one line ``edgefleet compress: error: <Error>: <message>`` on
stderr); 3 no candidate met ``--max-drop`` (the candidate table is printed,
nothing is written).

Invariant: importing this module loads neither torch nor onnx (they are
imported inside :func:`run`), so ``edgefleet --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from compression.config import CalibrationMethod, Metric, QuantMode

EXIT_OK = 0
EXIT_INPUT = 2
EXIT_GATE = 3


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1): {text}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``compress`` sub-command.

    Args:
        subparsers: The main parser's ``add_subparsers()`` result.
    """
    parser = subparsers.add_parser(
        "compress",
        help="prune + quantize a model into one self-contained ONNX file",
        description=(
            "Export MODEL (ONNX, torch.export .pt2 or TorchScript) to ONNX, try "
            "pruning/quantization candidates, and keep the smallest on-wire one whose "
            "metric drop on EVAL is within --max-drop. Writes DIR/model.onnx, "
            "report.json, health_check.json and drift_reference.json."
        ),
    )
    parser.add_argument("model", help="ONNX file, torch.export .pt2, or TorchScript file")
    parser.add_argument("--calib", required=True, help="CALIB.npz keyed by input name (or x)")
    parser.add_argument("--eval", required=True, dest="eval_path", help="EVAL.npz (+ labels)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--metric",
        choices=[m.value for m in Metric],
        default=None,
        help="gate metric (default: accuracy if EVAL has labels, else agreement)",
    )
    parser.add_argument(
        "--max-drop",
        type=float,
        default=0.01,
        help="largest allowed metric drop, in the metric's units (default 0.01)",
    )
    parser.add_argument(
        "--prune", type=_fraction, default=None, help="fraction of weights to prune"
    )
    parser.add_argument(
        "--prune-method",
        choices=["global", "channel"],
        default="global",
        help="global unstructured magnitude (default) or structured channel pruning",
    )
    parser.add_argument(
        "--quant",
        choices=[q.value for q in QuantMode],
        default=QuantMode.AUTO.value,
        help="quantization to apply (default auto: try all, keep the best)",
    )
    parser.add_argument(
        "--calibration",
        choices=[c.value for c in CalibrationMethod],
        action="append",
        default=None,
        help="static calibration method(s) to try (repeatable; default all)",
    )
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (17-21, default 18)")
    parser.add_argument(
        "--feature-names",
        default=None,
        help="comma-separated names of the input columns for the drift profile",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``edgefleet compress``.

    Args:
        args: Parsed arguments from the parser built by :func:`add_parser`.

    Returns:
        The process exit code (see the module docstring).
    """
    from compression.errors import GateError
    from edgefleet.errors import EdgefleetError

    try:
        config = _config(args)
        from compression.pipeline import compress

        result = compress(
            args.model,
            args.calib,
            args.eval_path,
            args.out,
            config=config,
            feature_names=args.feature_names.split(",") if args.feature_names else None,
        )
    except GateError as exc:
        if args.json:
            _print_json(
                {
                    "ok": False,
                    "error": str(exc),
                    "max_drop": exc.max_drop,
                    "candidates": exc.candidates,
                }
            )
        else:
            _print_table(exc.candidates, chosen=None)
            print(f"edgefleet compress: error: GateError: {exc}", file=sys.stderr)
        return EXIT_GATE
    except EdgefleetError as exc:  # CompressionError, ConfigError, ModelLoadError
        print(f"edgefleet compress: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INPUT
    if args.json:
        _print_json({"ok": True, "out": str(result.out_dir), **result.report})
    else:
        _print_table(result.report["candidates"], chosen=result.chosen.name)
        _print_summary(result.report, str(result.model_path))
    return EXIT_OK


def _config(args: argparse.Namespace) -> Any:
    from compression.config import (
        CompressConfig,
        GlobalMagnitudePruning,
        PruneConfig,
        StructuredChannelPruning,
    )

    prune: PruneConfig | None = None
    if args.prune is not None:
        prune = (
            GlobalMagnitudePruning(args.prune)
            if args.prune_method == "global"
            else StructuredChannelPruning(args.prune)
        )
    methods = args.calibration or [c.value for c in CalibrationMethod]
    return CompressConfig(
        metric=Metric(args.metric) if args.metric else None,
        max_drop=args.max_drop,
        quant=QuantMode(args.quant),
        prune=prune,
        calibration_methods=tuple(dict.fromkeys(CalibrationMethod(m) for m in methods)),
        opset=args.opset,
        show_progress=not args.no_progress and not args.json,
    )


def _print_json(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _print_table(rows: Sequence[dict[str, Any]], chosen: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="compression candidates")
    for column in ("candidate", "bytes", "wire", "size x", "wire x", "metric", "drop", "p50 ms"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    table.add_column("result")
    for row in rows:
        if row.get("error"):
            verdict = f"[red]error: {row['error'][:60]}"
        elif row["name"] == chosen:
            verdict = "[bold green]chosen"
        else:
            verdict = "pass" if row["passed"] else "[yellow]over max-drop"
        table.add_row(
            row["name"],
            _fmt(row["bytes"]),
            _fmt(row["wire_bytes"]),
            _fmt(row["size_ratio"], 2),
            _fmt(row["wire_ratio"], 2),
            _fmt(row["metric"]),
            _fmt(row["metric_drop"]),
            _fmt(row["latency_p50_ms"], 3),
            verdict,
        )
    console = Console()
    if not console.is_terminal:
        # Piped output: rich would squeeze the table to 80 columns.
        console = Console(width=160)
    console.print(table)


def _print_summary(report: dict[str, Any], model_path: str) -> None:
    print(
        f"chose {report['config']['name']}: {report['bytes']} bytes "
        f"({report['size_ratio']:.2f}x), {report['wire_bytes']} on wire "
        f"({report['wire_ratio']:.2f}x); {report['metric_name']} "
        f"{report['metric_fp32']:.4f} -> {report['metric']:.4f} "
        f"(drop {report['metric_drop']:.4f}); p50 {report['latency_p50_ms_fp32']:.3f} -> "
        f"{report['latency_p50_ms']:.3f} ms"
    )
    print(f"wrote {model_path} and report.json, health_check.json, drift_reference.json")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``compress`` as a stand-alone program (``python -m compression.cli``).

    Args:
        argv: Arguments after the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(prog="edgefleet")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_parser(subparsers)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
