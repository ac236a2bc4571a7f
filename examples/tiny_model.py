"""Make a tiny, self-contained ONNX model in code (no download, no torch).

``python examples/tiny_model.py OUT.onnx [--features N] [--classes K] [--seed S]``
writes a one-layer softmax classifier (MatMul + Add + Softmax) with a dynamic
batch axis. Tests and the demo use it wherever any real model will do.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from firmware_sim.models import linear_model


def make_linear_model(features: int = 8, classes: int = 3, seed: int = 0, opset: int = 17) -> bytes:
    """Return ONNX bytes of ``softmax(x @ W + b)`` for input ``x`` (batch, features)."""
    return linear_model(features, classes, seed, opset)


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
