"""Train a small CNN on scikit-learn's bundled 8x8 digits.

Flow: :func:`load_split` reads ``sklearn.datasets.load_digits`` (shipped with
scikit-learn, nothing is downloaded), scales pixels to [0, 1] and makes a
seeded stratified split; :func:`train` fits :class:`DigitsCNN`; ``main`` writes
``DIR/model.pt2`` (``torch.export`` with a dynamic batch axis),
``DIR/calib.npz`` (``x``, shape ``[n, 1, 8, 8]``) and ``DIR/eval.npz`` (``x`` +
``labels``).

Invariants: seeded end to end, so reruns give the same split and weights;
training takes a few seconds on 2 CPU cores.

Run: ``python examples/digits/train.py --out DIR``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make ``examples.training`` importable
    sys.path.insert(0, str(ROOT))

from examples import training  # noqa: E402
from examples.training import Trained  # noqa: E402

SEED = 11


def load_split(seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as ``(x_train, y_train, x_eval, y_eval)``; x is float32 ``[n, 1, 8, 8]``."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_eval, y_train, y_eval = train_test_split(
        x, y, test_size=0.2, random_state=seed, stratify=y
    )
    return x_train, y_train, x_eval, y_eval


class DigitsCNN(torch.nn.Module):
    """Two 3x3 convs, a 2x2 max-pool, then a 1024-256-10 classifier (~283K params)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = torch.nn.Linear(64 * 4 * 4, 256)
        self.fc2 = torch.nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.nn.functional.max_pool2d(torch.relu(self.conv2(h)), 2)
        h = torch.relu(self.fc1(torch.flatten(h, 1)))
        return self.fc2(h)


def fit(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    lr: float = 2e-3,
    batch_size: int = 64,
    seed: int = SEED,
) -> None:
    """Train (or fine-tune) ``model`` on images: :func:`examples.training.fit`."""
    training.fit(model, x, y, epochs, lr=lr, batch_size=batch_size, seed=seed)


def fine_tuner(
    x: np.ndarray, y: np.ndarray, epochs: int = 3, lr: float = 5e-4
) -> Callable[[torch.nn.Module], None]:
    """A fine-tune callback for ``compression.compress(fine_tune=...)`` (:func:`fit` on x, y)."""
    return training.fine_tuner(x, y, epochs=epochs, lr=lr, batch_size=64, seed=SEED)


def build(epochs: int = 20, n_calib: int = 256) -> Trained:
    """Load the split and train the CNN (deterministic).

    Args:
        epochs: Training passes.
        n_calib: Calibration rows (taken from the training split).

    Returns:
        The trained model (eval mode) and the splits.
    """
    training.seed_everything(SEED)
    x_train, y_train, x_eval, y_eval = load_split()
    model = DigitsCNN()
    fit(model, x_train, y_train, epochs)
    return Trained(model, x_train, y_train, x_train[:n_calib], x_eval, y_eval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    start = time.perf_counter()
    trained = build(epochs=args.epochs)
    training.write_outputs(trained, args.out)
    pred = trained.eval_predictions()
    print(
        json.dumps(
            {
                "params": sum(p.numel() for p in trained.model.parameters()),
                "eval_accuracy": round(float(np.mean(pred == trained.y_eval)), 4),
                "eval_rows": len(trained.y_eval),
                "seconds": round(time.perf_counter() - start, 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
