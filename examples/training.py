"""Training helpers shared by the example scripts (``examples/fraud``, ``examples/digits``).

Flow: a script seeds everything (:func:`seed_everything`), trains its model
with :func:`fit` (Adam, cross-entropy, seeded shuffling), wraps the result in
:class:`Trained` and writes the three files ``edgefleet compress`` reads with
:func:`write_outputs`: ``model.pt2`` (``torch.export`` with a dynamic batch
axis), ``calib.npz`` (``x``) and ``eval.npz`` (``x`` + ``labels``).

Invariants: seeded end to end (same data order, same weights on a rerun);
:func:`fit` also fine-tunes an exported program's module (no train/eval modes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed numpy and torch and make torch deterministic."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def set_training(model: torch.nn.Module, training: bool) -> None:
    """Switch train/eval mode; an exported program's GraphModule has no modes."""
    with contextlib.suppress(NotImplementedError):
        model.train(training)


def fit(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    *,
    lr: float,
    batch_size: int,
    seed: int,
) -> None:
    """Train (or fine-tune) ``model`` with Adam and cross-entropy.

    Args:
        model: The model (its current weights are the starting point).
        x: Inputs, first axis the rows.
        y: Labels.
        epochs: Passes over the data.
        lr: Adam learning rate.
        batch_size: Rows per step.
        seed: Seed of the shuffling order.
    """
    generator = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    set_training(model, True)
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            optimizer.step()
    set_training(model, False)


def fine_tuner(
    x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, batch_size: int, seed: int
) -> Callable[[torch.nn.Module], None]:
    """A fine-tune callback for ``compression.compress(fine_tune=...)``: :func:`fit` on x, y."""

    def fine_tune(module: torch.nn.Module) -> None:
        fit(module, x, y, epochs, lr=lr, batch_size=batch_size, seed=seed)

    return fine_tune


@dataclass
class Trained:
    """A trained model with its data splits."""

    model: torch.nn.Module
    x_train: np.ndarray
    y_train: np.ndarray
    x_calib: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray

    def eval_predictions(self) -> np.ndarray:
        """Predicted class per EVAL row."""
        with torch.no_grad():
            return self.model(torch.from_numpy(self.x_eval)).argmax(1).numpy()


def export(model: torch.nn.Module, example: np.ndarray, path: Path) -> None:
    """Save ``model`` as a ``torch.export`` program with a dynamic batch axis."""
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    program = torch.export.export(
        model, (torch.from_numpy(example[:2]),), dynamic_shapes=({0: batch},)
    )
    torch.export.save(program, str(path))


def write_outputs(trained: Trained, out: Path) -> None:
    """Write ``out/model.pt2``, ``out/calib.npz`` and ``out/eval.npz``."""
    out.mkdir(parents=True, exist_ok=True)
    export(trained.model, trained.x_calib, out / "model.pt2")
    np.savez(out / "calib.npz", x=trained.x_calib)
    np.savez(out / "eval.npz", x=trained.x_eval, labels=trained.y_eval)
