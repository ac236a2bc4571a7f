"""Make a tiny, self-contained ONNX model in code (no download, no torch).

``python examples/tiny_model.py OUT.onnx [--features N] [--classes K] [--seed S]``
writes a one-layer softmax classifier (MatMul + Add + Softmax) with a dynamic
batch axis. Tests and the demo use it wherever any real model will do.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def make_linear_model(features: int = 8, classes: int = 3, seed: int = 0, opset: int = 17) -> bytes:
    """Return ONNX bytes of ``softmax(x @ W + b)`` for input ``x`` (batch, features)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.normal(size=(features, classes)).astype(np.float32)
    b = rng.normal(size=(classes,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "tiny_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(make_linear_model(args.features, args.classes, args.seed))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
