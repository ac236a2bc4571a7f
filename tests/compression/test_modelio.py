"""Loading MODEL files, ONNX export, and ONNX hygiene."""

from __future__ import annotations

import zipfile

import numpy as np
import onnx
import pytest
import torch
from compression_testkit import TinyCNN, make_mlp
from onnx import TensorProto, helper

from compression.errors import (
    ExportError,
    ModelLoadError,
    NotAModelError,
    ShapeMismatchError,
    UnsupportedOperatorError,
)
from compression.modelio import (
    SourceKind,
    export_onnx,
    finalize_onnx,
    from_module,
    load_model,
    make_session,
    module_for_export,
    onnx_input_specs,
    prepare_onnx_input,
)
from compression.progress import ProgressReporter


@torch.library.custom_op("eftest::wobble", mutates_args=())
def wobble(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0


@wobble.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Wobbly(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return wobble(self.fc(x))


def test_export_has_dynamic_batch_and_opset(mlp_onnx):
    model = onnx.load(str(mlp_onnx))
    assert [i.name for i in model.graph.input] == ["x"]
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param == "batch"
    assert {o.domain: o.version for o in model.opset_import}[""] == 18


def test_export_is_self_contained_and_stripped(mlp_onnx):
    model = onnx.load(str(mlp_onnx))
    assert not list(mlp_onnx.parent.glob("*.data"))
    assert all(t.data_location != TensorProto.EXTERNAL for t in model.graph.initializer)
    assert all(len(n.metadata_props) == 0 for n in model.graph.node)
    onnx.checker.check_model(model, full_check=True)


def test_export_matches_torch(mlp, mlp_onnx):
    x = np.random.default_rng(3).normal(size=(7, 16)).astype(np.float32)
    got = make_session(mlp_onnx.read_bytes()).run(None, {"x": x})[0]
    with torch.no_grad():
        want = mlp(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_load_detects_pt2(mlp_pt2):
    loaded = load_model(mlp_pt2)
    assert loaded.kind is SourceKind.TORCH_EXPORT
    assert loaded.input_names == ["x"]
    assert loaded.input_shapes["x"][1] == 16


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_load_detects_torchscript_and_exports(tmp_path, mlp):
    path = tmp_path / "model.ts"
    torch.jit.script(mlp).save(str(path))
    loaded = load_model(path)
    assert loaded.kind is SourceKind.TORCHSCRIPT and loaded.input_names == ["x"]
    example = (torch.randn(2, 16),)
    module = module_for_export(loaded, example)
    model = export_onnx(
        module, example, loaded.input_names, ["output"], 18, ProgressReporter(False)
    )
    x = np.random.default_rng(4).normal(size=(3, 16)).astype(np.float32)
    with torch.no_grad():
        want = mlp(torch.from_numpy(x)).numpy()
    got = make_session(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_load_detects_onnx(mlp_onnx):
    loaded = load_model(mlp_onnx)
    assert loaded.kind is SourceKind.ONNX
    assert onnx_input_specs(loaded.onnx_model)[0].shape == ("batch", 16)


def test_load_text_file_is_not_a_model(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n" * 20)
    with pytest.raises(NotAModelError):
        load_model(path)


def test_load_unrelated_zip_is_not_a_model(tmp_path):
    path = tmp_path / "thing.pt2"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("hello.txt", "hi")
    with pytest.raises(NotAModelError, match="zip archive"):
        load_model(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "absent.onnx")


def test_unsupported_torch_operator_is_named():
    module = Wobbly().eval()
    example = (torch.randn(2, 4),)
    with pytest.raises(UnsupportedOperatorError) as info:
        export_onnx(module, example, ["x"], ["output"], 18, ProgressReporter(False))
    assert info.value.operators == ["eftest::wobble"]


def test_unsupported_onnx_operator_is_named():
    node = helper.make_node("Wobble", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.example", 1)]
    )
    with pytest.raises(UnsupportedOperatorError, match="Wobble"):
        make_session(model.SerializeToString())


def test_model_rejecting_data_shape_is_shape_mismatch():
    loaded = from_module(make_mlp())
    with pytest.raises(ShapeMismatchError, match="rejects CALIB"):
        module_for_export(loaded, (torch.randn(2, 15),))


def test_fixed_batch_onnx_input_gets_symbolic_batch():
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    prepared = prepare_onnx_input(model, 18)
    assert onnx_input_specs(prepared)[0].shape == ("batch", 4)
    out = make_session(prepared.SerializeToString()).run(None, {"x": -np.ones((3, 4), np.float32)})
    assert out[0].shape == (3, 4)


def test_finalize_sorts_nodes_topologically():
    relu = helper.make_node("Relu", ["h"], ["y"])
    neg = helper.make_node("Neg", ["x"], ["h"])
    graph = helper.make_graph(
        [relu, neg],  # consumer before producer: invalid order
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    fixed = finalize_onnx(model)
    assert [n.op_type for n in fixed.graph.node] == ["Neg", "Relu"]


def test_finalize_rejects_undefined_values():
    node = helper.make_node("Relu", ["ghost"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(ExportError, match="ghost"):
        finalize_onnx(model)


def test_cnn_exports_with_dynamic_batch():
    torch.manual_seed(0)
    cnn = TinyCNN().eval()
    example = (torch.randn(2, 2, 6, 6),)
    model = export_onnx(cnn, example, ["image"], ["logits"], 18, ProgressReporter(False))
    session = make_session(model.SerializeToString())
    x = np.random.default_rng(0).normal(size=(5, 2, 6, 6)).astype(np.float32)
    with torch.no_grad():
        want = cnn(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(None, {"image": x})[0], want, rtol=1e-4, atol=1e-5)
