"""Model loading, ONNX export and ONNX hygiene.

Flow: :func:`load_model` sniffs a file (ONNX protobuf, ``torch.export`` ``.pt2``
archive, or TorchScript archive) and returns a :class:`LoadedModel`;
:func:`module_for_export` turns the torch kinds into one ``nn.Module`` (the
unlifted ``GraphModule`` of an exported program); :func:`export_onnx` exports it
with the dynamo exporter, a dynamic batch axis and the chosen opset; and
:func:`finalize_onnx` strips exporter debug metadata and validates the result
with ``onnx.checker`` and strict shape inference.

Invariants: every ``ModelProto`` leaving this module is self-contained (weights
inline, never a side ``.data`` file), passes ``onnx.checker.check_model`` with
``full_check`` and has a symbolic batch axis on every input. Exporter failures
are converted to :class:`~compression.errors.UnsupportedOperatorError` (naming
the operators) or :class:`~compression.errors.ExportError`.
"""

from __future__ import annotations

import copy
import enum
import inspect
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort
import torch
from google.protobuf.message import DecodeError
from onnx import helper

from compression.data import Dim, InputSpec
from compression.errors import (
    ExportError,
    ModelNotFoundError,
    NotAModelError,
    ShapeMismatchError,
    UnsupportedOperatorError,
)
from compression.progress import ProgressReporter

#: Symbolic name given to the batch axis of every input and output.
BATCH_AXIS = "batch"
#: Lowest default-domain opset accepted for ONNX input (per-channel QDQ needs 13).
MIN_ONNX_INPUT_OPSET = 13


class SourceKind(str, enum.Enum):
    """What the MODEL argument was."""

    ONNX = "onnx"
    TORCH_EXPORT = "torch.export"
    TORCHSCRIPT = "torchscript"
    MODULE = "nn.Module"


@dataclass
class LoadedModel:
    """A model as read from disk (or handed over by a Python caller).

    Attributes:
        kind: Source format.
        input_names: Names of the model inputs, in call order.
        onnx_model: The ONNX graph (``kind == ONNX`` only).
        module: An ``nn.Module`` (``MODULE``) or a TorchScript module.
        exported: The ``torch.export`` program (``TORCH_EXPORT`` only).
        input_shapes: Shapes known before export (from a ``.pt2``), used to
            reject mismatched data with a clear error before tracing.
    """

    kind: SourceKind
    input_names: list[str]
    onnx_model: onnx.ModelProto | None = None
    module: Any = None
    exported: torch.export.ExportedProgram | None = None
    input_shapes: dict[str, tuple[Dim, ...]] = field(default_factory=dict)
    input_dtypes: dict[str, str] = field(default_factory=dict)


@contextmanager
def quiet_exporters() -> Iterator[None]:
    """Silence torch/onnx exporter warnings and log chatter for one block."""
    names = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "torch._dynamo")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# --- loading -------------------------------------------------------------------


def load_model(path: str | os.PathLike[str]) -> LoadedModel:
    """Read MODEL from disk, detecting its format from the content.

    Args:
        path: An ONNX file, a ``torch.export`` ``.pt2`` archive or a TorchScript file.

    Returns:
        The loaded model.

    Raises:
        ModelLoadError: The file does not exist.
        NotAModelError: The file is none of the supported formats, or is corrupt.
    """
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"model file not found: {p}")
    if not p.is_file():
        raise NotAModelError(f"{p} is not a file")
    if zipfile.is_zipfile(p):
        try:
            with zipfile.ZipFile(p) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile as exc:
            raise NotAModelError(f"{p} is a corrupt archive: {exc}") from exc
        if any(n.endswith(("models/model.json", "archive_format")) for n in names):
            return _load_exported_program(p)
        if any(n.endswith("data.pkl") for n in names) and any("/code/" in n for n in names):
            return _load_torchscript(p)
        raise NotAModelError(
            f"{p} is a zip archive but neither a torch.export program nor TorchScript"
        )
    return _load_onnx(p)


def _load_onnx(p: Path) -> LoadedModel:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            proto = onnx.load_model(os.fspath(p), load_external_data=True)
    except (DecodeError, RuntimeError, ValueError, OSError, TypeError) as exc:
        raise NotAModelError(f"{p} is not a model (ONNX, .pt2 or TorchScript): {exc}") from exc
    if not proto.graph.node or not proto.opset_import or proto.ir_version <= 0:
        raise NotAModelError(f"{p} is not a model (ONNX, .pt2 or TorchScript): empty graph")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise NotAModelError(f"{p} is not a valid ONNX model: {_first_line(str(exc))}") from exc
    specs = onnx_input_specs(proto)
    return LoadedModel(
        kind=SourceKind.ONNX,
        input_names=[s.name for s in specs],
        onnx_model=proto,
        input_shapes={s.name: s.shape for s in specs},
        input_dtypes={s.name: s.dtype for s in specs},
    )


def _load_exported_program(p: Path) -> LoadedModel:
    try:
        with quiet_exporters():
            program = torch.export.load(os.fspath(p))
    except Exception as exc:  # torch raises many unrelated types for a bad archive
        raise NotAModelError(f"{p} is not a loadable torch.export program: {exc}") from exc
    return from_exported_program(program)


def from_exported_program(program: torch.export.ExportedProgram) -> LoadedModel:
    """Wrap a ``torch.export`` program (loaded from ``.pt2`` or handed over).

    Args:
        program: The exported program.

    Returns:
        The wrapped model with input names, shapes and dtypes from its signature.

    Raises:
        ExportError: An input is not a tensor.
    """
    user_inputs = [str(n) for n in program.graph_signature.user_inputs]
    shapes: dict[str, tuple[Dim, ...]] = {}
    dtypes: dict[str, str] = {}
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise ExportError(
                    f"input {node.name!r} is not a tensor; only tensor inputs are supported"
                )
            # Symbolic sizes (the batch axis) become their symbol's name.
            shapes[node.name] = tuple(d if isinstance(d, int) else str(d) for d in val.shape)
            dtypes[node.name] = str(val.dtype).removeprefix("torch.")
    return LoadedModel(
        kind=SourceKind.TORCH_EXPORT,
        input_names=user_inputs,
        exported=program,
        input_shapes=shapes,
        input_dtypes=dtypes,
    )


def _load_torchscript(p: Path) -> LoadedModel:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(os.fspath(p), map_location="cpu")
    except Exception as exc:  # torch.jit raises RuntimeError and friends
        raise NotAModelError(f"{p} is not a loadable TorchScript module: {exc}") from exc
    arguments = module.forward.schema.arguments[1:]  # drop self
    return LoadedModel(
        kind=SourceKind.TORCHSCRIPT,
        input_names=[a.name for a in arguments],
        module=module,
    )


def from_module(module: torch.nn.Module, input_names: Sequence[str] | None = None) -> LoadedModel:
    """Wrap a Python ``nn.Module`` (the API-only source).

    Args:
        module: The model; it is deep-copied before any change.
        input_names: Names for the ONNX inputs; default: ``forward``'s
            parameter names.

    Returns:
        The wrapped model.

    Raises:
        ExportError: ``forward`` takes ``*args``/``**kwargs`` and no names were given.
    """
    if input_names is None:
        params = inspect.signature(module.forward).parameters.values()
        if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            raise ExportError("forward() takes *args/**kwargs: pass input_names explicitly")
        input_names = [p.name for p in params]
    return LoadedModel(kind=SourceKind.MODULE, input_names=list(input_names), module=module)


def module_for_export(
    loaded: LoadedModel, example_inputs: tuple[torch.Tensor, ...]
) -> torch.nn.Module:
    """Return a fresh, eval-mode ``nn.Module`` that can be pruned and exported.

    ``.pt2`` programs give their unlifted ``GraphModule`` (with guards off,
    since the batch axis is re-exported as dynamic); TorchScript is converted
    to an exported program first, and its weight buffers are promoted to
    parameters so that ``torch.nn.utils.prune`` can mask them.

    Args:
        loaded: A torch-kind model.
        example_inputs: Example tensors (a few CALIB rows), in input order.

    Returns:
        A module independent of ``loaded`` (safe to prune).

    Raises:
        ExportError: The TorchScript module cannot be converted.
        ShapeMismatchError: The model rejects the example inputs.
    """
    module: torch.nn.Module
    if loaded.kind is SourceKind.TORCH_EXPORT:
        assert loaded.exported is not None
        module = loaded.exported.module(check_guards=False)
    elif loaded.kind is SourceKind.TORCHSCRIPT:
        from torch._export.converter import TS2EPConverter

        try:
            with quiet_exporters():
                program = TS2EPConverter(loaded.module, example_inputs).convert()
        except Exception as exc:  # converter failures come in many types
            raise ExportError(
                f"cannot convert TorchScript to torch.export: {_first_line(str(exc))}"
            ) from exc
        module = program.module()
        _promote_weight_buffers(module)
    elif loaded.kind is SourceKind.MODULE:
        module = copy.deepcopy(loaded.module)
    else:
        raise ExportError(f"{loaded.kind.value} models have no torch module")
    set_training(module, False)
    try:
        with torch.no_grad():
            module(*example_inputs)
    except (RuntimeError, AssertionError, IndexError, ValueError, TypeError) as exc:
        shapes = [tuple(t.shape) for t in example_inputs]
        raise ShapeMismatchError(
            f"the model rejects CALIB rows of shape(s) {shapes}: {_first_line(str(exc))}"
        ) from exc
    return module


def set_training(module: torch.nn.Module, training: bool) -> None:
    """Switch train/eval mode where the module allows it.

    The ``GraphModule`` of an exported program refuses ``train()``/``eval()``:
    its graph was captured in one mode already, so there is nothing to switch.
    """
    with suppress(NotImplementedError):
        module.train(training)


def _promote_weight_buffers(module: torch.nn.Module) -> None:
    for sub in module.modules():
        for name in list(sub._buffers):
            tensor = sub._buffers[name]
            if tensor is not None and tensor.is_floating_point() and name == "weight":
                del sub._buffers[name]
                sub.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=True))


# --- export --------------------------------------------------------------------


def count_outputs(module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> int:
    """Number of tensors the module returns (after flattening tuples/lists)."""
    with torch.no_grad():
        result = module(*example_inputs)
    leaves, _ = torch.utils._pytree.tree_flatten(result)
    return sum(1 for leaf in leaves if isinstance(leaf, torch.Tensor))


def default_output_names(count: int) -> list[str]:
    """``["output"]`` for one output, else ``["output_0", "output_1", ...]``."""
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def export_onnx(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int,
    reporter: ProgressReporter,
    label: str = "export",
) -> onnx.ModelProto:
    """Export a module to a finalized, self-contained ONNX model.

    Args:
        module: Eval-mode module (see :func:`module_for_export`).
        example_inputs: Example tensors with at least 2 rows, so that the
            batch axis is not specialized to 0/1.
        input_names: ONNX input names, one per example tensor.
        output_names: ONNX output names.
        opset: Default-domain opset.
        reporter: Progress bars.
        label: Progress bar label.

    Returns:
        The finalized model (see :func:`finalize_onnx`).

    Raises:
        UnsupportedOperatorError: Some operators have no ONNX translation.
        ExportError: Any other exporter failure (e.g. the model fixes the batch size).
    """
    batch = torch.export.Dim(BATCH_AXIS, min=1, max=1 << 20)
    dynamic_shapes = tuple({0: batch} for _ in example_inputs)
    with reporter.task(label, total=3) as advance:
        advance(1)
        try:
            with quiet_exporters():
                program = torch.onnx.export(
                    module,
                    example_inputs,
                    dynamo=True,
                    dynamic_shapes=dynamic_shapes,
                    input_names=list(input_names),
                    output_names=list(output_names),
                    opset_version=opset,
                    external_data=False,
                    optimize=True,
                    verbose=False,
                )
        except torch.onnx.OnnxExporterError as exc:
            raise _convert_export_error(module, example_inputs, exc) from exc
        advance(1)
        if program is None:  # only the legacy exporter returns None
            raise ExportError("the ONNX exporter returned no program")
        proto = finalize_onnx(program.model_proto)
        advance(1)
    return proto


_NO_FUNCTION = re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)'")


def _convert_export_error(
    module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...], exc: Exception
) -> Exception:
    message = str(exc)
    ops = unsupported_torch_ops(module, example_inputs)
    if not ops:
        ops = sorted(set(_NO_FUNCTION.findall(message)))
    if ops:
        return UnsupportedOperatorError(ops, "no ONNX translation in torch.onnx")
    summary = _exception_summary(message)
    if "Constraints violated" in message or "specializ" in message or "Guard failed" in message:
        return ExportError(
            f"cannot export with a dynamic batch axis (the model fixes the batch size?): {summary}"
        )
    return ExportError(f"ONNX export failed: {summary}")


def unsupported_torch_ops(
    module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]
) -> list[str]:
    """Name the operators of ``module`` that torch.onnx cannot translate.

    The module is captured with ``torch.export``, decomposed the way the
    exporter does, and every remaining ``OpOverload`` is looked up in the
    exporter's registry. This uses torch.onnx internals, so any failure here
    yields an empty list and the caller falls back to the error text.

    Args:
        module: The module that failed to export.
        example_inputs: Its example inputs.

    Returns:
        Sorted operator names such as ``["mylib::wobble"]`` (empty if unknown).
    """
    try:
        from torch.onnx._internal.exporter import _fx_passes, _registration

        with quiet_exporters():
            program = torch.export.export(module, example_inputs, strict=False)
            registry = _registration.ONNXRegistry.from_torchlib()
            program = _fx_passes.decompose_with_registry(program, registry)
        names = {
            node.target.name()
            for node in program.graph.nodes
            if node.op == "call_function"
            and isinstance(node.target, torch._ops.OpOverload)
            and not registry.is_registered(node.target)
        }
        return sorted(names)
    except Exception:  # internals moved or capture failed: caller falls back
        return []


def _first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()[:300]
    return "<no message>"


def _exception_summary(message: str) -> str:
    lines = message.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "## Exception summary":
            for rest in lines[i + 1 :]:
                if rest.strip():
                    return re.sub(r"\x1b\[[0-9;]*m", "", rest.strip())[:300]
    return re.sub(r"\x1b\[[0-9;]*m", "", _first_line(message))


# --- ONNX hygiene ----------------------------------------------------------------


def finalize_onnx(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Strip debug metadata and validate a model.

    The dynamo exporter annotates every node with stack traces and FX names;
    they cost bytes on the wire and mean nothing to the device, so they go.

    Args:
        proto: Model to clean (copied, not modified).

    Returns:
        A cleaned model that passed the checker and strict shape inference.

    Raises:
        ExportError: The model fails the checker or shape inference.
    """
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    strip_metadata(model)
    toposort_graph(model.graph)
    validate_onnx(model)
    return model


def toposort_graph(graph: onnx.GraphProto) -> None:
    """Reorder nodes topologically in place (stable: keeps order where valid).

    Some converters (fp16) append producer nodes after their consumers, which
    the ONNX checker rejects.

    Args:
        graph: The graph to reorder.

    Raises:
        ExportError: The graph has a cycle or reads an undefined value.
    """
    available = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                copied = onnx.NodeProto()
                copied.CopyFrom(node)
                ordered.append(copied)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({n for node in rest for n in node.input if n not in available})
            raise ExportError(f"graph has a cycle or undefined inputs: {missing[:5]}")
        pending = rest
    graph.ClearField("node")
    graph.node.extend(ordered)


def strip_metadata(model: onnx.ModelProto) -> None:
    """Remove doc strings, node/graph metadata and cached value_info in place."""
    del model.metadata_props[:]
    model.doc_string = ""
    graph = model.graph
    del graph.metadata_props[:]
    graph.doc_string = ""
    del graph.value_info[:]
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for tensor in graph.initializer:
        tensor.doc_string = ""
        del tensor.metadata_props[:]
    for value in list(graph.input) + list(graph.output):
        del value.metadata_props[:]
        value.doc_string = ""


def validate_onnx(model: onnx.ModelProto) -> None:
    """Run ``onnx.checker`` (full check) and strict shape inference.

    Args:
        model: The model to validate.

    Raises:
        ExportError: Either check fails, or weights live in external files.
    """
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise ExportError("model still references external weight files")
    try:
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"ONNX validation failed: {_first_line(str(exc))}") from exc


def onnx_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """Graph inputs (excluding initializers listed as inputs) as :class:`InputSpec`."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
        dims: list[Dim] = []
        for d in tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        specs.append(InputSpec(name=value.name, dtype=dtype, shape=tuple(dims)))
    return specs


def onnx_output_names(model: onnx.ModelProto) -> list[str]:
    """Names of the graph outputs, in order."""
    return [v.name for v in model.graph.output]


def default_opset(model: onnx.ModelProto) -> int:
    """Version of the default (``ai.onnx``) domain imported by the model."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def prepare_onnx_input(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Make an ONNX MODEL fit the pipeline: opset >= 13 and a symbolic batch axis.

    Args:
        model: The user's model (not modified).
        opset: Opset to convert to when the model's is below 13.

    Returns:
        A finalized copy.

    Raises:
        ExportError: Opset conversion fails, or the result fails validation.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if default_opset(out) < MIN_ONNX_INPUT_OPSET:
        try:
            out = onnx.version_converter.convert_version(out, opset)
        except (RuntimeError, ValueError) as exc:
            raise ExportError(
                f"cannot convert opset {default_opset(model)} to {opset}: {exc}"
            ) from exc
    initializers = {t.name for t in out.graph.initializer}
    for value in list(out.graph.input) + list(out.graph.output):
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) > 0 and not dims[0].HasField("dim_param"):
            dims[0].Clear()
            dims[0].dim_param = BATCH_AXIS
    return finalize_onnx(out)


def serialize(model: onnx.ModelProto) -> bytes:
    """Serialize a self-contained model (the exact bytes written to disk)."""
    return model.SerializeToString()


def save_onnx(model: onnx.ModelProto, path: str | os.PathLike[str]) -> int:
    """Write a self-contained model atomically.

    Args:
        model: Model with inline weights.
        path: Destination file.

    Returns:
        Bytes written.

    Raises:
        ExportError: The model references external data.
    """
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise ExportError("refusing to write a model with external weight files")
    data = serialize(model)
    write_atomic(Path(path), data)
    return len(data)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path`` and ``os.replace`` it."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# --- runtime --------------------------------------------------------------------

_NOT_IMPLEMENTED = re.compile(r"Could not find an implementation for (\w+)\((\d+)\)")
_NOT_REGISTERED = re.compile(r"([\w.]*:?\w+)\((-?\d+)\) is not a registered function/op")


def make_session(model_bytes: bytes, threads: int = 0) -> ort.InferenceSession:
    """Create a CPU onnxruntime session.

    Args:
        model_bytes: Serialized model.
        threads: ``intra_op_num_threads`` (0: onnxruntime's default).

    Returns:
        The session.

    Raises:
        UnsupportedOperatorError: onnxruntime has no kernel for some operator.
        ExportError: onnxruntime rejects the model for another reason.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(
            model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own pybind exception types
        message = str(exc)
        ops = [m.group(1) for m in _NOT_IMPLEMENTED.finditer(message)]
        ops += [m.group(1) for m in _NOT_REGISTERED.finditer(message)]
        if ops:
            raise UnsupportedOperatorError(ops, "no onnxruntime CPU kernel") from exc
        raise ExportError(f"onnxruntime cannot load the model: {_first_line(message)}") from exc
