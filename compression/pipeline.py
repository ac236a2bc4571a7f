"""The ``compress`` pipeline: load, export, prune, quantize, gate, write.

Flow:

1. Load MODEL (ONNX, ``.pt2``, TorchScript, or an ``nn.Module``/exported
   program from Python) and the CALIB/EVAL arrays; bind arrays to input names
   and fail fast on shape mismatches or missing labels, before any export.
2. Export the fp32 reference to ONNX (dynamic batch axis, chosen opset) and,
   when pruning is asked for, a pruned variant (torch models are pruned in
   torch, with the optional fine-tune callback; ONNX models on their weight
   initializers).
3. For every candidate (prune level x quantization config) quantize with
   onnxruntime, measure the file size, the zstd size, the metric on EVAL and
   the p50 latency. When every full static quantization of a variant fails
   the gate, retry it with the most sensitive nodes kept in float.
4. Choose with :func:`compression.gate.choose`; when nothing passes raise
   :class:`~compression.errors.GateError` carrying the table and write nothing.
5. Write ``DIR/model.onnx`` (one self-contained file, re-validated),
   ``DIR/health_check.json`` (golden EVAL rows and the final model's outputs),
   ``DIR/drift_reference.json`` (CALIB bins) and ``DIR/report.json``.

Invariants: candidate artifacts live in a temporary directory removed on exit;
DIR receives files only after a candidate passed, each written atomically,
``report.json`` last (its presence means the set is complete).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import zstandard
from rich.console import Console

from compression.config import (
    Candidate,
    CompressConfig,
    DynamicInt8,
    Metric,
    NoQuantization,
    PruneConfig,
    QuantMode,
    StaticInt8,
)
from compression.data import (
    InputSpec,
    batch_size_of,
    bind_inputs,
    check_against_specs,
    extract_labels,
    load_npz,
    take_rows,
)
from compression.errors import CompressionError, ConfigError, GateError
from compression.evaluate import degradation, latency_p50_ms, run_model, score
from compression.gate import CandidateResult, choose, config_json, passes
from compression.modelio import (
    LoadedModel,
    SourceKind,
    count_outputs,
    default_opset,
    default_output_names,
    export_onnx,
    from_exported_program,
    from_module,
    load_model,
    make_session,
    module_for_export,
    onnx_input_specs,
    onnx_output_names,
    prepare_onnx_input,
    save_onnx,
    validate_onnx,
    write_atomic,
)
from compression.profiles import (
    calibration_table,
    drift_reference,
    health_check,
    output_reference,
)
from compression.progress import ProgressReporter
from compression.prune import (
    FineTune,
    SparsityReport,
    onnx_weight_sparsity,
    prune_module,
    prune_onnx,
)
from compression.quantize import CalibrationData, quantize, rank_sensitivity

REPORT_FORMAT = "edgefleet.compression.report/1"
MODEL_FILE = "model.onnx"
REPORT_FILE = "report.json"
HEALTH_FILE = "health_check.json"
DRIFT_FILE = "drift_reference.json"
#: EVAL rows used to rank node sensitivity (a cheap proxy for the metric).
SENSITIVITY_ROWS = 256

ModelSource = str | os.PathLike[str] | torch.nn.Module | torch.export.ExportedProgram
DataSource = str | os.PathLike[str] | Mapping[str, np.ndarray]


@dataclass
class CompressionResult:
    """What ``compress`` produced.

    Attributes:
        out_dir: The output directory.
        model_path: ``DIR/model.onnx``.
        report_path: ``DIR/report.json``.
        health_check_path: ``DIR/health_check.json``.
        drift_reference_path: ``DIR/drift_reference.json``.
        report: The report as written.
        chosen: The chosen candidate.
        candidates: Every candidate tried, in order.
    """

    out_dir: Path
    model_path: Path
    report_path: Path
    health_check_path: Path
    drift_reference_path: Path
    report: dict[str, Any]
    chosen: CandidateResult
    candidates: list[CandidateResult] = field(default_factory=list)


@dataclass
class _Variant:
    """An fp32 model (reference or pruned) that quantization starts from."""

    key: str
    prune: PruneConfig | None
    path: Path
    sparsity: SparsityReport | None


@dataclass
class _Run:
    """Data shared by every candidate evaluation of one run."""

    config: CompressConfig
    metric: Metric
    eval_inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    reference: list[np.ndarray]
    metric_fp32: float
    calibration: CalibrationData
    workdir: Path
    reporter: ProgressReporter
    latency_feed: dict[str, np.ndarray]


def compress(
    model: ModelSource,
    calib: DataSource,
    eval_data: DataSource,
    out_dir: str | os.PathLike[str],
    *,
    config: CompressConfig | None = None,
    example_input: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    fine_tune: FineTune | None = None,
    feature_names: Sequence[str] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    console: Console | None = None,
) -> CompressionResult:
    """Compress a model and write the bundle inputs into ``out_dir``.

    Args:
        model: ONNX / ``.pt2`` / TorchScript path, an ``nn.Module`` or an
            exported program.
        calib: CALIB ``.npz`` path or arrays keyed by input name (or ``x``).
        eval_data: EVAL ``.npz`` path or arrays; may hold ``labels``.
        out_dir: Output directory (created if needed).
        config: Pipeline settings; default :class:`CompressConfig()`.
        example_input: Example tensor(s) for an ``nn.Module`` (default: the
            first CALIB rows). A batch of 1 is repeated to 2 rows so the
            batch axis exports as dynamic.
        fine_tune: Called on the pruned torch module with masks enforced.
        feature_names: Names of the 2-D input columns for the drift profile.
        input_names: ONNX input names for an ``nn.Module`` (default: the
            ``forward`` parameter names).
        output_names: ONNX output names for torch models (default ``output``).
        console: Where progress bars go (default: stderr).

    Returns:
        Paths, the report and every candidate's numbers.

    Raises:
        ModelLoadError: MODEL is missing or not a model (``NotAModelError``),
            or cannot be exported (``ExportError``, ``UnsupportedOperatorError``).
        DataError: CALIB/EVAL do not fit (``ShapeMismatchError``,
            ``MissingInputError``, ``MissingLabelsError``).
        ConfigError: ``fine_tune`` with an ONNX model, or bad ``feature_names``.
        GateError: No candidate met ``max_drop``; nothing was written.
    """
    config = config or CompressConfig()
    reporter = ProgressReporter(config.show_progress, console)
    loaded = _load(model, input_names)
    if fine_tune is not None and (loaded.kind is SourceKind.ONNX or config.prune is None):
        raise ConfigError("fine_tune needs a torch model and a prune config")

    calib_arrays = _arrays(calib, "CALIB")
    eval_arrays = _arrays(eval_data, "EVAL")
    calib_bound = bind_inputs(calib_arrays, loaded.input_names, "CALIB")
    eval_bound = bind_inputs(eval_arrays, loaded.input_names, "EVAL")
    if loaded.input_shapes:
        # Known before export (ONNX, .pt2): reject bad data before any work.
        early = [
            InputSpec(n, loaded.input_dtypes.get(n, "float32"), loaded.input_shapes[n])
            for n in loaded.input_names
        ]
        calib_bound = check_against_specs(calib_bound, early, "CALIB")
        eval_bound = check_against_specs(eval_bound, early, "EVAL")
    metric = config.metric or (Metric.ACCURACY if "labels" in eval_arrays else Metric.AGREEMENT)
    labels = extract_labels(eval_arrays, batch_size_of(eval_bound), metric.needs_labels)

    with tempfile.TemporaryDirectory(prefix="edgefleet-compress-") as tmp:
        workdir = Path(tmp)
        variants, opset = _build_variants(
            loaded, calib_bound, config, example_input, fine_tune, output_names, workdir, reporter
        )
        fp32 = variants[0]
        fp32_model = onnx.load_model(str(fp32.path))
        specs = onnx_input_specs(fp32_model)
        calib_inputs = check_against_specs(calib_bound, specs, "CALIB")
        eval_inputs = check_against_specs(eval_bound, specs, "EVAL")
        if feature_names is not None:
            _check_feature_names(calib_inputs, feature_names)

        fp32_bytes_data = fp32.path.read_bytes()
        fp32_session = make_session(fp32_bytes_data, config.latency.threads)
        with reporter.task("evaluate fp32", total=batch_size_of(eval_inputs)) as advance:
            reference = run_model(fp32_session, eval_inputs, config.eval_batch_size, advance)
        latency_feed = take_rows(eval_inputs, 0, config.latency.batch_size)
        run = _Run(
            config=config,
            metric=metric,
            eval_inputs=eval_inputs,
            labels=labels,
            reference=reference,
            metric_fp32=score(metric, reference[0], reference[0], labels, config.binary_threshold),
            calibration=CalibrationData(
                inputs=calib_inputs,
                batch_size=config.calibration_batch_size,
                max_rows=config.max_calibration_rows,
                cache_dir=workdir,
            ),
            workdir=workdir,
            reporter=reporter,
            latency_feed=latency_feed,
        )
        fp32_latency = latency_p50_ms(
            fp32_session, latency_feed, config.latency.runs, config.latency.warmup
        )

        results = _search(run, variants)
        chosen = choose(results, config.max_drop, config.tie_tolerance)
        fp32_bytes = len(fp32_bytes_data)
        if chosen is None:
            raise GateError([r.to_json(fp32_bytes) for r in results], config.max_drop)
        return _write_outputs(
            Path(out_dir),
            run,
            loaded,
            opset,
            chosen,
            results,
            variants,
            fp32_bytes_data,
            fp32_latency,
            calib_inputs,
            feature_names,
        )


def _load(model: ModelSource, input_names: Sequence[str] | None) -> LoadedModel:
    if isinstance(model, torch.export.ExportedProgram):
        return from_exported_program(model)
    if isinstance(model, torch.nn.Module):
        return from_module(model, input_names)
    return load_model(model)


def _arrays(source: DataSource, role: str) -> dict[str, np.ndarray]:
    if isinstance(source, Mapping):
        return {str(k): np.asarray(v) for k, v in source.items()}
    return load_npz(source, role)


def _check_feature_names(calib_inputs: Mapping[str, np.ndarray], names: Sequence[str]) -> None:
    columns = sum(
        int(np.prod(a.shape[1:], dtype=np.int64)) for a in calib_inputs.values() if a.ndim <= 2
    )
    if len(names) != columns:
        raise ConfigError(f"feature_names has {len(names)} names for {columns} feature column(s)")


def _torch_example(
    calib_bound: Mapping[str, np.ndarray],
    loaded: LoadedModel,
    example_input: torch.Tensor | tuple[torch.Tensor, ...] | None,
) -> tuple[torch.Tensor, ...]:
    if example_input is not None:
        tensors = (example_input,) if isinstance(example_input, torch.Tensor) else example_input
        return tuple(t if t.shape[0] >= 2 else torch.cat([t, t]) for t in tensors)
    rows = min(2, batch_size_of(calib_bound))
    out = []
    for name in loaded.input_names:
        array = calib_bound[name][:rows]
        if rows == 1:
            array = np.concatenate([array, array])
        dtype = loaded.input_dtypes.get(name)
        if dtype is not None:
            array = array.astype(dtype)
        elif array.dtype.kind == "f":
            array = array.astype(np.float32)  # torch modules are fp32 unless told otherwise
        out.append(torch.from_numpy(np.ascontiguousarray(array)))
    return tuple(out)


def _build_variants(
    loaded: LoadedModel,
    calib_bound: Mapping[str, np.ndarray],
    config: CompressConfig,
    example_input: torch.Tensor | tuple[torch.Tensor, ...] | None,
    fine_tune: FineTune | None,
    output_names: Sequence[str] | None,
    workdir: Path,
    reporter: ProgressReporter,
) -> tuple[list[_Variant], int]:
    """Export the fp32 reference (first) and each requested pruned variant."""
    prune_levels = []
    for candidate in config.candidates():
        if candidate.prune is not None and candidate.prune not in prune_levels:
            prune_levels.append(candidate.prune)
    variants: list[_Variant] = []
    if loaded.kind is SourceKind.ONNX:
        assert loaded.onnx_model is not None
        fp32 = prepare_onnx_input(loaded.onnx_model, config.opset)
        path = workdir / "fp32.onnx"
        save_onnx(fp32, path)
        variants.append(_Variant("fp32", None, path, None))
        # Reject models onnxruntime cannot run before pruning/quantizing them.
        make_session(path.read_bytes())
        for level in prune_levels:
            try:
                pruned, report = prune_onnx(fp32, level)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
            path = workdir / f"{level.label}.onnx"
            save_onnx(pruned, path)
            variants.append(_Variant(level.label, level, path, report))
        return variants, default_opset(fp32)

    example = _torch_example(calib_bound, loaded, example_input)
    module = module_for_export(loaded, example)
    names = list(output_names or default_output_names(count_outputs(module, example)))
    fp32_model = export_onnx(
        module, example, loaded.input_names, names, config.opset, reporter, "export fp32"
    )
    path = workdir / "fp32.onnx"
    save_onnx(fp32_model, path)
    variants.append(_Variant("fp32", None, path, None))
    for level in prune_levels:
        module = module_for_export(loaded, example)
        try:
            report = prune_module(module, level, example, fine_tune)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        pruned = export_onnx(
            module,
            example,
            loaded.input_names,
            names,
            config.opset,
            reporter,
            f"export {level.label}",
        )
        path = workdir / f"{level.label}.onnx"
        save_onnx(pruned, path)
        variants.append(_Variant(level.label, level, path, report))
    return variants, config.opset


def _search(run: _Run, variants: Sequence[_Variant]) -> list[CandidateResult]:
    by_prune = {v.prune: v for v in variants}
    results: list[CandidateResult] = []
    for candidate in run.config.candidates():
        results.append(_evaluate(run, by_prune[candidate.prune], candidate, len(results)))
    if run.config.quant in (QuantMode.AUTO, QuantMode.STATIC) and run.config.max_excluded_nodes:
        for variant in variants:
            static = [
                r
                for r in results
                if r.candidate.prune == variant.prune and isinstance(r.candidate.quant, StaticInt8)
            ]
            if not static or any(passes(r, run.config.max_drop) for r in static):
                continue
            unquantized = [
                r
                for r in results
                if r.candidate.prune == variant.prune
                and isinstance(r.candidate.quant, NoQuantization)
            ]
            if unquantized and not passes(unquantized[0], run.config.max_drop):
                continue  # pruning alone fails: keeping nodes in float cannot help
            results.extend(_exclusion_fallback(run, variant, static, len(results)))
    return results


def _exclusion_fallback(
    run: _Run, variant: _Variant, static: Sequence[CandidateResult], index: int
) -> list[CandidateResult]:
    """Keep the most sensitive nodes in float, one more at a time, until one passes."""
    measured = [r for r in static if r.error is None and r.drop is not None]
    if not measured:
        return []
    best = min(measured, key=lambda r: r.drop if r.drop is not None else float("inf"))
    assert isinstance(best.candidate.quant, StaticInt8)
    base = best.candidate.quant
    probe_rows = min(SENSITIVITY_ROWS, batch_size_of(run.eval_inputs))
    probe = take_rows(run.eval_inputs, 0, probe_rows)
    reference = [r[:probe_rows] for r in run.reference]
    try:
        ranking = rank_sensitivity(
            variant.path,
            base,
            run.calibration,
            probe,
            reference,
            run.workdir,
            run.reporter,
            variant.key,
        )
    except CompressionError:
        return []
    out: list[CandidateResult] = []
    limit = min(run.config.max_excluded_nodes, len(ranking) - 1)
    for k in range(1, limit + 1):
        excluded = tuple(name for name, _ in ranking[:k])
        quant = dataclasses.replace(base, exclude_nodes=excluded)
        result = _evaluate(run, variant, Candidate(quant=quant, prune=variant.prune), index + k - 1)
        out.append(result)
        if result.passed:
            break
    return out


def _evaluate(run: _Run, variant: _Variant, candidate: Candidate, index: int) -> CandidateResult:
    result = CandidateResult(candidate=candidate)
    safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", candidate.name)
    dst = run.workdir / f"candidate-{index:02d}-{safe}.onnx"
    try:
        quantize(variant.path, dst, candidate.quant, run.calibration, run.reporter, variant.key)
        data = dst.read_bytes()
        session = make_session(data, run.config.latency.threads)
        rows = batch_size_of(run.eval_inputs)
        with run.reporter.task(f"evaluate {candidate.name}", total=rows) as advance:
            outputs = run_model(session, run.eval_inputs, run.config.eval_batch_size, advance)
        value = score(
            run.metric, outputs[0], run.reference[0], run.labels, run.config.binary_threshold
        )
        result.bytes = len(data)
        result.wire_bytes = wire_size(data, run.config.zstd_level)
        result.metric = value
        result.drop = degradation(run.metric, run.metric_fp32, value)
        result.latency_p50_ms = latency_p50_ms(
            session, run.latency_feed, run.config.latency.runs, run.config.latency.warmup
        )
        result.weight_sparsity = round(onnx_weight_sparsity(onnx.load_model_from_string(data)), 6)
        result.path = dst
        result.passed = passes(result, run.config.max_drop)
    except CompressionError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def wire_size(data: bytes, level: int) -> int:
    """Size of ``data`` after zstd compression at ``level`` (what goes on the wire)."""
    return len(zstandard.ZstdCompressor(level=level).compress(data))


def is_int8(candidate: Candidate) -> bool:
    """Whether the candidate's weights are int8."""
    return isinstance(candidate.quant, StaticInt8 | DynamicInt8)


def _write_outputs(
    out_dir: Path,
    run: _Run,
    loaded: LoadedModel,
    opset: int,
    chosen: CandidateResult,
    results: Sequence[CandidateResult],
    variants: Sequence[_Variant],
    fp32_data: bytes,
    fp32_latency: float,
    calib_inputs: Mapping[str, np.ndarray],
    feature_names: Sequence[str] | None,
) -> CompressionResult:
    assert chosen.path is not None
    config = run.config
    data = chosen.path.read_bytes()
    final = onnx.load_model_from_string(data)
    validate_onnx(final)  # checker + strict shape inference on the exact bytes shipped
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / MODEL_FILE
    write_atomic(model_path, data)

    session = make_session(data, config.latency.threads)
    row_bytes = sum(a[:1].nbytes for a in run.eval_inputs.values())
    golden_rows = max(
        1,
        min(
            config.health.golden_rows,
            batch_size_of(run.eval_inputs),
            config.health.golden_max_bytes // max(row_bytes, 1),
        ),
    )
    golden = take_rows(run.eval_inputs, 0, golden_rows)
    golden_out = [np.asarray(o) for o in session.run(None, golden)]
    golden_latency = latency_p50_ms(session, golden, config.latency.runs, config.latency.warmup)
    spec = health_check(
        golden,
        dict(zip(onnx_output_names(final), golden_out, strict=True)),
        golden_latency,
        is_int8(chosen.candidate),
        config.health,
    )
    health_path = out_dir / HEALTH_FILE
    write_atomic(health_path, _json_bytes(spec))

    # The outputs' reference distribution (and, with labels, the calibration
    # table) come from the shipped model on the evaluation data.
    profile = drift_reference(calib_inputs, feature_names)
    shipped = run_model(session, run.eval_inputs, config.eval_batch_size)
    named = list(zip(onnx_output_names(final), shipped, strict=True))
    outputs = output_reference(named)
    if outputs:
        profile["outputs"] = outputs
        if run.labels is not None:
            table = calibration_table(
                named[outputs[0]["index"]][1], run.labels, outputs[0]["index"]
            )
            if table is not None:
                profile["calibration"] = table
    drift_path = out_dir / DRIFT_FILE
    write_atomic(drift_path, _json_bytes(profile))

    fp32_bytes = len(fp32_data)
    fp32_wire = wire_size(fp32_data, config.zstd_level)
    int8_ratios = [
        fp32_bytes / r.bytes
        for r in results
        if is_int8(r.candidate) and r.error is None and r.bytes
    ]
    sparsity = next((v.sparsity for v in variants if v.prune == chosen.candidate.prune), None)
    assert chosen.metric is not None and chosen.drop is not None
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "source": {
            "kind": loaded.kind.value,
            "inputs": [
                {"name": s.name, "dtype": s.dtype, "shape": list(s.shape)}
                for s in onnx_input_specs(final)
            ],
            "outputs": onnx_output_names(final),
        },
        "opset": opset,
        "metric_name": run.metric.value,
        "metric_higher_is_better": run.metric.higher_is_better,
        "max_drop": config.max_drop,
        "fp32_bytes": fp32_bytes,
        "fp32_wire_bytes": fp32_wire,
        "bytes": len(data),
        "wire_bytes": chosen.wire_bytes,
        "size_ratio": round(fp32_bytes / len(data), 4),
        "wire_ratio": round(fp32_bytes / chosen.wire_bytes, 4),
        "int8_size_ratio": round(max(int8_ratios), 4) if int8_ratios else None,
        "metric_fp32": run.metric_fp32,
        "metric": chosen.metric,
        "metric_drop": chosen.drop,
        "latency_p50_ms_fp32": fp32_latency,
        "latency_p50_ms": chosen.latency_p50_ms,
        "latency": config_json(config.latency),
        "zstd_level": config.zstd_level,
        "weight_sparsity": chosen.weight_sparsity,
        "pruning": sparsity.to_json() if sparsity is not None else None,
        "config": {
            "name": chosen.name,
            "prune": config_json(chosen.candidate.prune),
            "quant": config_json(chosen.candidate.quant),
        },
        "candidates": [r.to_json(fp32_bytes) for r in results],
        "calib_rows": batch_size_of(calib_inputs),
        "eval_rows": batch_size_of(run.eval_inputs),
        "sha256": hashlib.sha256(data).hexdigest(),
        "files": {"model": MODEL_FILE, "health_check": HEALTH_FILE, "drift_reference": DRIFT_FILE},
    }
    report_path = out_dir / REPORT_FILE
    write_atomic(report_path, _json_bytes(report))
    return CompressionResult(
        out_dir=out_dir,
        model_path=model_path,
        report_path=report_path,
        health_check_path=health_path,
        drift_reference_path=drift_path,
        report=report,
        chosen=chosen,
        candidates=list(results),
    )


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8")
