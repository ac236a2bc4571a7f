"""Pruning with torch.nn.utils.prune: amounts, permanence, fine-tune, ONNX weights."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import zstandard
from compression_testkit import TinyCNN, make_mlp
from onnx import numpy_helper

from compression.config import GlobalMagnitudePruning, StructuredChannelPruning
from compression.modelio import from_exported_program, module_for_export
from compression.prune import find_targets, onnx_weight_sparsity, prune_module, prune_onnx

EXAMPLE = (torch.randn(2, 16),)


def test_global_magnitude_hits_amount_on_hidden_layers():
    model = make_mlp()
    report = prune_module(model, GlobalMagnitudePruning(0.6), EXAMPLE)
    hidden = model.fc1.weight.numel() + model.fc2.weight.numel()
    zeros = int((model.fc1.weight == 0).sum() + (model.fc2.weight == 0).sum())
    assert zeros == round(0.6 * hidden)
    assert report.sparsity == pytest.approx(0.6, abs=1e-3)
    assert report.skipped == ["out.weight"]
    assert int((model.out.weight == 0).sum()) == 0


def test_global_magnitude_keeps_the_largest_weights():
    model = make_mlp()
    before = torch.cat([model.fc1.weight.detach().flatten(), model.fc2.weight.detach().flatten()])
    prune_module(model, GlobalMagnitudePruning(0.5), EXAMPLE)
    after = torch.cat([model.fc1.weight.detach().flatten(), model.fc2.weight.detach().flatten()])
    kept = before[after != 0].abs()
    dropped = before[after == 0].abs()
    assert kept.min() >= dropped.max()


def test_pruning_is_permanent():
    model = make_mlp()
    prune_module(model, GlobalMagnitudePruning(0.5), EXAMPLE)
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    assert not any(n.endswith(("_orig", "_mask")) for n in names)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert isinstance(model.fc1.weight, torch.nn.Parameter)


def test_structured_zeroes_whole_output_rows_except_output_layer():
    model = make_mlp()
    report = prune_module(model, StructuredChannelPruning(0.25), EXAMPLE)
    for layer in (model.fc1, model.fc2):
        zero_rows = (layer.weight == 0).all(dim=1)
        assert int(zero_rows.sum()) == 16  # 25% of 64 rows
    assert not (model.out.weight == 0).all(dim=1).any()
    assert report.method == "ln_structured"


def test_structured_on_conv_zeroes_output_channels():
    torch.manual_seed(0)
    cnn = TinyCNN().eval()
    prune_module(cnn, StructuredChannelPruning(0.5), (torch.randn(2, 2, 6, 6),))
    for conv in (cnn.conv1, cnn.conv2):
        zero_channels = (conv.weight == 0).flatten(1).all(dim=1)
        assert int(zero_channels.sum()) == 4


def test_fine_tune_cannot_revive_pruned_weights():
    model = make_mlp()
    calls = []

    def fine_tune(module: torch.nn.Module) -> None:
        optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
        for _ in range(3):
            optimizer.zero_grad()
            module(torch.randn(32, 16)).pow(2).mean().backward()
            optimizer.step()
        calls.append(module.training)

    report = prune_module(model, GlobalMagnitudePruning(0.7), EXAMPLE, fine_tune)
    assert calls == [True] and not model.training
    assert report.sparsity == pytest.approx(0.7, abs=1e-3)


def test_exported_program_graph_module_is_pruned_and_fine_tuned(mlp_pt2):
    program = torch.export.load(str(mlp_pt2))
    module = module_for_export(from_exported_program(program), EXAMPLE)
    targets = find_targets(module, EXAMPLE)
    assert [t.name for t in targets] == ["fc1.weight", "fc2.weight", "out.weight"]
    seen_zero_fraction = []

    def fine_tune(m: torch.nn.Module) -> None:
        optimizer = torch.optim.SGD(m.parameters(), lr=0.5)
        for _ in range(3):
            optimizer.zero_grad()
            m(torch.randn(8, 16)).pow(2).mean().backward()
            optimizer.step()
            seen_zero_fraction.append(float((m.fc1.weight == 0).float().mean()))

    report = prune_module(module, GlobalMagnitudePruning(0.5), EXAMPLE, fine_tune)
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    assert len(seen_zero_fraction) == 3 and min(seen_zero_fraction) > 0.2


def test_prune_onnx_uses_gemm_output_axis(mlp_onnx):
    model = onnx.load(str(mlp_onnx))
    pruned, report = prune_onnx(model, StructuredChannelPruning(0.25))
    weights = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    gemm_b = [n.input[1] for n in pruned.graph.node if n.op_type == "Gemm"]
    first = weights[gemm_b[0]]  # transB=1: rows are output features
    assert int((first == 0).all(axis=1).sum()) == 16
    assert report.skipped == [gemm_b[-1]]
    assert (weights[gemm_b[-1]] != 0).any(axis=1).all()


def test_sparsity_survives_into_wire_size(mlp_onnx):
    model = onnx.load(str(mlp_onnx))
    pruned, _ = prune_onnx(model, GlobalMagnitudePruning(0.8))
    dense = model.SerializeToString()
    sparse = pruned.SerializeToString()
    assert len(sparse) == pytest.approx(len(dense), rel=0.01)  # same raw size
    zstd = zstandard.ZstdCompressor(level=19)
    assert len(zstd.compress(sparse)) < 0.6 * len(zstd.compress(dense))
    assert onnx_weight_sparsity(pruned) > 0.5 > onnx_weight_sparsity(model)


def test_prune_onnx_without_weights_raises():
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    with pytest.raises(ValueError, match="no conv/gemm/matmul"):
        prune_onnx(onnx.helper.make_model(graph), GlobalMagnitudePruning(0.5))


def test_onnx_weight_sparsity_counts_exact_zeros():
    w = np.array([[0.0, 1.0], [0.0, 0.0]], dtype=np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(w, "w")],
    )
    assert onnx_weight_sparsity(onnx.helper.make_model(graph)) == 0.75
