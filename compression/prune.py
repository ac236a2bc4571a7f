"""Pruning with ``torch.nn.utils.prune``, made permanent.

Flow: :func:`prune_module` finds every conv/linear weight of a torch module
(by type for ordinary modules, by the ATen op that consumes the weight for the
``GraphModule`` of an exported program), masks it with
``prune.global_unstructured`` (L1 magnitude over the pooled weights) or
``prune.ln_structured`` (whole output channels, per layer), runs the optional
fine-tune callback with the masks enforced, and calls ``prune.remove`` so the
zeros are baked into plain parameters. :func:`prune_onnx` does the same on the
weight initializers of an ONNX graph (conv ``W``, gemm/matmul ``B``), wrapping
them as parameters so that the very same ``torch.nn.utils.prune`` functions apply.

Invariants: after either function no mask, hook or ``*_orig`` parameter
remains; the reported sparsity is measured on the final tensors, not assumed
from the requested amount; the layer that produces the model output is never
pruned (unless it is the only conv/linear layer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch.nn.utils import prune

from compression.config import GlobalMagnitudePruning, PruneConfig
from compression.modelio import set_training

FineTune = Callable[[torch.nn.Module], None]

_LINEAR_OPS = {"aten::linear"}
_CONV_OPS = {"aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::convolution"}
_LINEAR_TYPES = (torch.nn.Linear,)
_CONV_TYPES = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


@dataclass
class PruneTarget:
    """One weight tensor selected for pruning.

    Attributes:
        name: Qualified name (``fc1.weight``) or ONNX initializer name.
        owner: Module holding the tensor as attribute ``attr``.
        attr: Attribute name on ``owner``.
        kind: ``"linear"`` or ``"conv"``.
        out_dim: Axis of output channels in the tensor.
    """

    name: str
    owner: torch.nn.Module
    attr: str
    kind: str
    out_dim: int = 0


@dataclass
class SparsityReport:
    """Measured sparsity after pruning.

    Attributes:
        method: ``"global_unstructured"`` or ``"ln_structured"``.
        amount: Requested fraction.
        layers: Fraction of zeros per pruned tensor, by name.
        zeros: Zeroed elements over all pruned tensors.
        total: Elements in all pruned tensors.
        skipped: Tensors deliberately left unpruned (the output layer).
    """

    method: str
    amount: float
    layers: dict[str, float] = field(default_factory=dict)
    zeros: int = 0
    total: int = 0
    skipped: list[str] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned tensors."""
        return self.zeros / self.total if self.total else 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict for the report."""
        return {
            "method": self.method,
            "amount": self.amount,
            "sparsity": round(self.sparsity, 6),
            "zeros": self.zeros,
            "total": self.total,
            "layers": {k: round(v, 6) for k, v in self.layers.items()},
            "skipped": list(self.skipped),
        }


def find_targets(
    module: torch.nn.Module, example_inputs: tuple[torch.Tensor, ...]
) -> list[PruneTarget]:
    """List conv/linear weights in execution order.

    Args:
        module: An ordinary module or an exported program's ``GraphModule``.
        example_inputs: Used to record execution order of ordinary modules.

    Returns:
        Targets, first-executed first (so the last one feeds the output).
    """
    if isinstance(module, torch.fx.GraphModule):
        return _graph_targets(module)
    order: list[torch.nn.Module] = []
    handles = []
    for sub in module.modules():
        if isinstance(sub, _LINEAR_TYPES + _CONV_TYPES):
            handles.append(sub.register_forward_hook(lambda m, _i, _o: order.append(m)))
    try:
        with torch.no_grad():
            module(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    names = {id(m): n for n, m in module.named_modules()}
    targets: list[PruneTarget] = []
    seen: set[int] = set()
    for sub in order:
        if id(sub) in seen:
            continue
        seen.add(id(sub))
        kind = "linear" if isinstance(sub, _LINEAR_TYPES) else "conv"
        targets.append(PruneTarget(f"{names[id(sub)]}.weight", sub, "weight", kind))
    return targets


def _graph_targets(module: torch.fx.GraphModule) -> list[PruneTarget]:
    targets: list[PruneTarget] = []
    seen: set[str] = set()
    for node in module.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        op = node.target.name()
        if op not in _LINEAR_OPS | _CONV_OPS or len(node.args) < 2:
            continue
        weight = node.args[1]
        if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
            continue
        qualname = str(weight.target)
        if qualname in seen:
            continue
        seen.add(qualname)
        owner_name, _, attr = qualname.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if not isinstance(getattr(owner, attr, None), torch.nn.Parameter):
            continue
        kind = "linear" if op in _LINEAR_OPS else "conv"
        targets.append(PruneTarget(qualname, owner, attr, kind))
    return targets


def _apply_masks(targets: Sequence[PruneTarget], config: PruneConfig) -> list[str]:
    """Attach ``torch.nn.utils.prune`` masks; return names of skipped targets."""
    # The output layer stays dense: its weights are few, each reaches an
    # output directly, and its magnitudes sit on a different scale than the
    # hidden layers', so a global threshold could wipe it out entirely.
    body = list(targets[:-1]) if len(targets) > 1 else list(targets)
    skipped = [t.name for t in targets if t not in body]
    if isinstance(config, GlobalMagnitudePruning):
        prune.global_unstructured(
            [(t.owner, t.attr) for t in body],
            pruning_method=prune.L1Unstructured,
            amount=config.amount,
        )
        return skipped
    for target in body:
        prune.ln_structured(
            target.owner, target.attr, amount=config.amount, n=config.norm, dim=target.out_dim
        )
    return skipped


def _method(config: PruneConfig) -> str:
    return "global_unstructured" if isinstance(config, GlobalMagnitudePruning) else "ln_structured"


def _measure(
    targets: Sequence[PruneTarget], config: PruneConfig, skipped: list[str]
) -> SparsityReport:
    report = SparsityReport(method=_method(config), amount=config.amount, skipped=skipped)
    for target in targets:
        if target.name in skipped:
            continue
        tensor = getattr(target.owner, target.attr).detach()
        zeros = int((tensor == 0).sum().item())
        report.layers[target.name] = zeros / tensor.numel()
        report.zeros += zeros
        report.total += tensor.numel()
    return report


def prune_module(
    module: torch.nn.Module,
    config: PruneConfig,
    example_inputs: tuple[torch.Tensor, ...],
    fine_tune: FineTune | None = None,
) -> SparsityReport:
    """Prune a module in place and make the result permanent.

    During ``fine_tune`` the masks are re-applied before every forward call
    of ``module`` (torch's own per-layer hooks do not fire for the submodules
    of a ``GraphModule``, whose graph reads the weights directly), so training
    cannot revive pruned weights.

    Args:
        module: Module to prune (modified in place).
        config: Pruning method and amount.
        example_inputs: Example tensors, to order the layers.
        fine_tune: Optional callback that trains ``module`` for a while; it
            receives the module in train mode (where the module has modes).

    Returns:
        Measured sparsity of the pruned tensors.

    Raises:
        ValueError: The module has no conv/linear weight to prune.
    """
    targets = find_targets(module, example_inputs)
    if not targets:
        raise ValueError("the model has no conv/linear weights to prune")
    skipped = _apply_masks(targets, config)
    masked = [t for t in targets if hasattr(t.owner, f"{t.attr}_mask")]
    if fine_tune is not None:

        def reapply(_module: torch.nn.Module, _inputs: Any) -> None:
            for t in masked:
                orig = getattr(t.owner, f"{t.attr}_orig")
                setattr(t.owner, t.attr, orig * getattr(t.owner, f"{t.attr}_mask"))

        handle = module.register_forward_pre_hook(reapply)
        try:
            set_training(module, True)
            fine_tune(module)
        finally:
            handle.remove()
            set_training(module, False)
    for t in masked:
        prune.remove(t.owner, t.attr)
    return _measure(targets, config, skipped)


class _InitializerHolder(torch.nn.Module):
    """Holds one ONNX initializer as parameter ``weight`` for torch.nn.utils.prune."""

    def __init__(self, array: np.ndarray) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.from_numpy(array.copy()), requires_grad=False)


def onnx_weight_targets(model: onnx.ModelProto) -> list[tuple[str, str, int]]:
    """Weight initializers of conv/gemm/matmul nodes in graph order.

    Args:
        model: An fp32 ONNX model.

    Returns:
        ``(initializer name, kind, output-channel axis)`` tuples.
    """
    inits = {t.name: t for t in model.graph.initializer}
    out: list[tuple[str, str, int]] = []
    seen: set[str] = set()
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1:
            name, kind, axis = node.input[1], "conv", 0
        elif node.op_type == "Gemm" and len(node.input) > 1:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            name, kind, axis = node.input[1], "linear", 0 if trans_b else 1
        elif node.op_type == "MatMul" and len(node.input) > 1:
            name, kind, axis = node.input[1], "linear", 1
        else:
            continue
        tensor = inits.get(name)
        if tensor is None or name in seen or tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        if len(tensor.dims) < 2:
            continue
        seen.add(name)
        out.append((name, kind, axis))
    return out


def prune_onnx(
    model: onnx.ModelProto, config: PruneConfig
) -> tuple[onnx.ModelProto, SparsityReport]:
    """Prune the conv/gemm/matmul weights of an ONNX model.

    Args:
        model: fp32 model (not modified).
        config: Pruning method and amount.

    Returns:
        The pruned copy and its measured sparsity.

    Raises:
        ValueError: The model has no prunable weight initializer.
    """
    found = onnx_weight_targets(model)
    if not found:
        raise ValueError("the model has no conv/gemm/matmul weight initializers to prune")
    inits = {t.name: t for t in model.graph.initializer}
    holders: dict[str, _InitializerHolder] = {}
    targets: list[PruneTarget] = []
    for name, kind, axis in found:
        holder = _InitializerHolder(numpy_helper.to_array(inits[name]))
        holders[name] = holder
        targets.append(PruneTarget(name, holder, "weight", kind, axis))
    skipped = _apply_masks(targets, config)
    for t in targets:
        if hasattr(t.owner, "weight_mask"):
            prune.remove(t.owner, "weight")
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    for tensor in pruned.graph.initializer:
        if tensor.name in holders and tensor.name not in skipped:
            array = holders[tensor.name].weight.detach().numpy()
            tensor.CopyFrom(numpy_helper.from_array(array, name=tensor.name))
    return pruned, _measure(targets, config, skipped)


def onnx_weight_sparsity(model: onnx.ModelProto) -> float:
    """Fraction of exact zeros over the weight initializers (>= 2-D, int8/uint8/float).

    Quantized weights are compared with their zero point, which is 0 for the
    symmetric int8 weights onnxruntime produces, so pruned weights stay zero.

    Args:
        model: Any model produced by the pipeline.

    Returns:
        Zero fraction in [0, 1] (0 when the model has no such weight).
    """
    zeros = total = 0
    kinds = {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.INT8,
        onnx.TensorProto.UINT8,
    }
    for tensor in model.graph.initializer:
        if len(tensor.dims) < 2 or tensor.data_type not in kinds:
            continue
        array = numpy_helper.to_array(tensor)
        if tensor.data_type == onnx.TensorProto.UINT8:
            continue  # asymmetric: zero point is not 0, zeros are not pruned weights
        zeros += int(np.count_nonzero(array == 0))
        total += int(array.size)
    return zeros / total if total else 0.0
