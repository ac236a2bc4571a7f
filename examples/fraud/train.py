"""Train a fraud-detection MLP on synthetic card transactions.

Flow: :func:`make_transactions` draws an imbalanced (about 3% fraud) synthetic
dataset from a fixed seed -- amount, hour, distance from home, transaction
velocity, account age, merchant category and a few flags -- with fraud driven
by realistic, interacting risk factors; :func:`train` fits :class:`FraudMLP`
(input standardization baked in as buffers, so the model takes raw features);
``main`` writes ``DIR/model.pt2`` (``torch.export`` with a dynamic batch axis),
``DIR/calib.npz`` (``x``) and ``DIR/eval.npz`` (``x`` + ``labels``).

Invariants: everything is seeded (numpy, torch, single-threaded data order),
so two runs produce the same data and the same weights; training takes a few
seconds on 2 CPU cores. Nothing is downloaded.

Run: ``python examples/fraud/train.py --out DIR``
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: make ``examples.training`` importable
    sys.path.insert(0, str(ROOT))

from examples import training  # noqa: E402
from examples.training import Trained  # noqa: E402

SEED = 7
MERCHANT_CATEGORIES = (
    "grocery",
    "fuel",
    "restaurant",
    "travel",
    "electronics",
    "gift_cards",
    "online_retail",
    "pharmacy",
    "entertainment",
    "utilities",
)
NUMERIC_FEATURES = (
    "amount",
    "hour",
    "distance_km",
    "velocity_1h",
    "velocity_24h",
    "account_age_days",
    "amount_to_avg_ratio",
    "is_foreign",
    "card_present",
    "new_device",
)
FEATURE_NAMES = NUMERIC_FEATURES + tuple(f"mcc_{c}" for c in MERCHANT_CATEGORIES)
HIDDEN = (512, 512, 256)


def make_transactions(n: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` synthetic transactions and their fraud labels.

    Args:
        n: Number of rows.
        seed: RNG seed.

    Returns:
        ``(features float32 [n, 20], labels int64 [n])`` with columns in
        :data:`FEATURE_NAMES` order.
    """
    rng = np.random.default_rng(seed)
    category = rng.choice(
        len(MERCHANT_CATEGORIES),
        size=n,
        p=[0.22, 0.12, 0.16, 0.04, 0.06, 0.02, 0.18, 0.08, 0.07, 0.05],
    )
    typical = np.array([45, 50, 35, 420, 300, 80, 70, 30, 40, 110], dtype=np.float64)
    amount = typical[category] * rng.lognormal(0.0, 0.7, size=n)
    hour = (rng.normal(14.0, 4.5, size=n) % 24).astype(np.int64).astype(np.float64)
    distance = rng.lognormal(1.5, 1.1, size=n)
    velocity_1h = rng.poisson(0.6, size=n).astype(np.float64)
    velocity_24h = velocity_1h + rng.poisson(3.0, size=n)
    account_age = rng.gamma(2.0, 400.0, size=n)
    avg_amount = typical[category] * rng.lognormal(0.0, 0.3, size=n)
    ratio = amount / avg_amount
    is_foreign = (rng.random(n) < 0.06).astype(np.float64)
    card_present = (rng.random(n) < np.where(category == 6, 0.02, 0.75)).astype(np.float64)
    new_device = (rng.random(n) < 0.05).astype(np.float64)

    night = ((hour <= 4) | (hour >= 23)).astype(np.float64)
    risky_mcc = np.isin(category, [4, 5, 3]).astype(np.float64)
    # Sharp, interacting risk factors: fraud is rare but mostly explainable.
    logit = 2.2 * (
        -5.0
        + 1.6 * np.log1p(ratio) * (1.0 + risky_mcc)
        + 1.3 * night
        + 0.5 * np.log1p(distance)
        + 0.9 * np.maximum(velocity_1h - 1.0, 0.0)
        + 1.5 * is_foreign * (1.0 - card_present)
        + 1.7 * new_device
        + 1.2 * (account_age < 60)
        + 1.4 * risky_mcc * night
        - 1.0 * card_present
    )
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    onehot = np.eye(len(MERCHANT_CATEGORIES))[category]
    features = np.column_stack(
        [
            amount,
            hour,
            distance,
            velocity_1h,
            velocity_24h,
            account_age,
            ratio,
            is_foreign,
            card_present,
            new_device,
            onehot,
        ]
    ).astype(np.float32)
    return features, labels


class FraudMLP(torch.nn.Module):
    """Standardize raw features, then a 3-hidden-layer ReLU MLP to 2 logits."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, hidden: tuple[int, ...] = HIDDEN):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        dims = (len(mean), *hidden)
        self.hidden = torch.nn.ModuleList(
            torch.nn.Linear(a, b) for a, b in itertools.pairwise(dims)
        )
        self.head = torch.nn.Linear(dims[-1], 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (x - self.mean) / self.std
        for layer in self.hidden:
            h = torch.relu(layer(h))
        return self.head(h)


def fit(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = SEED,
) -> None:
    """Train (or fine-tune) ``model`` on features: :func:`examples.training.fit`."""
    training.fit(model, x, y, epochs, lr=lr, batch_size=batch_size, seed=seed)


def fine_tuner(
    x: np.ndarray, y: np.ndarray, epochs: int = 2, lr: float = 3e-4
) -> Callable[[torch.nn.Module], None]:
    """A fine-tune callback for ``compression.compress(fine_tune=...)`` (:func:`fit` on x, y)."""
    return training.fine_tuner(x, y, epochs=epochs, lr=lr, batch_size=256, seed=SEED)


def build(
    n_train: int = 30000, n_calib: int = 1000, n_eval: int = 6000, epochs: int = 6
) -> Trained:
    """Make the data and train the model (deterministic).

    Args:
        n_train: Training rows (CALIB is their first ``n_calib``).
        n_calib: Calibration rows.
        n_eval: Held-out rows with labels.
        epochs: Training passes.

    Returns:
        The trained model (eval mode) and the splits.
    """
    training.seed_everything(SEED)
    x, y = make_transactions(n_train + n_eval)
    x_train, y_train = x[:n_train], y[:n_train]
    model = FraudMLP(x_train.mean(axis=0), x_train.std(axis=0) + 1e-6)
    fit(model, x_train, y_train, epochs)
    return Trained(model, x_train, y_train, x_train[:n_calib], x[n_train:], y[n_train:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    start = time.perf_counter()
    trained = build(epochs=args.epochs)
    training.write_outputs(trained, args.out)
    pred = trained.eval_predictions()
    fraud = trained.y_eval == 1
    print(
        json.dumps(
            {
                "params": sum(p.numel() for p in trained.model.parameters()),
                "eval_accuracy": round(float(np.mean(pred == trained.y_eval)), 4),
                "eval_fraud_rate": round(float(np.mean(fraud)), 4),
                "eval_fraud_recall": round(float(np.mean(pred[fraud] == 1)), 4),
                "seconds": round(time.perf_counter() - start, 2),
                "feature_names": list(FEATURE_NAMES),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
