"""Tiny models and data built in code for the compression tests (nothing downloaded).

Imported by name (``from compression_testkit import ...``): pytest puts this
test directory on ``sys.path``; the unusual name avoids clashing with other
test directories' helpers.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import torch

from compression.config import CompressConfig, LatencyConfig


class TinyMLP(torch.nn.Module):
    """16 -> 64 -> 64 -> 4, enough weights for int8 to matter, small enough to be fast."""

    def __init__(self, features: int = 16, hidden: int = 64, classes: int = 4) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(features, hidden)
        self.fc2 = torch.nn.Linear(hidden, hidden)
        self.out = torch.nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TinyCNN(torch.nn.Module):
    """[n, 2, 6, 6] -> conv 8 -> conv 8 -> linear 3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(2, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(h, 1))


def task_data(rows: int = 400, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A 4-class task with a margin: labels are the argmax of a fixed linear map."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 16)).astype(np.float32)
    w = np.random.default_rng(99).normal(size=(16, 4))
    return x, np.argmax(x @ w, axis=1).astype(np.int64)


@functools.lru_cache(maxsize=1)
def _trained_mlp() -> TinyMLP:
    torch.manual_seed(0)
    model = TinyMLP()
    x, y = task_data(2000, seed=3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(150):
        idx = slice((step * 100) % 2000, (step * 100) % 2000 + 100)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
        optimizer.step()
    return model.eval()


def make_mlp() -> TinyMLP:
    """A fresh copy of the tiny MLP trained (once, ~0.3 s) on :func:`task_data`."""
    return copy.deepcopy(_trained_mlp())


def mlp_data(model: torch.nn.Module, rows: int = 400, seed: int = 1):
    """Task features and true labels (the trained MLP gets most of them right)."""
    del model
    return task_data(rows, seed)


def fast_config(**overrides) -> CompressConfig:
    """Few latency runs, no bars: keeps each pipeline test around a second."""
    base = {
        "latency": LatencyConfig(runs=5, warmup=1),
        "show_progress": False,
    }
    base.update(overrides)
    return CompressConfig(**base)


class OutlierMLP(torch.nn.Module):
    """Feature 0 spans +-1000 but barely matters; the output lives in the small features.

    Quantizing the input tensor to 8 bits (one range for all features) wipes
    out the small features, so the first Gemm is by far the most sensitive node.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.fc1 = torch.nn.Linear(8, 32)
        self.fc2 = torch.nn.Linear(32, 4)
        with torch.no_grad():
            self.fc1.weight[:, 0] = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def outlier_data(rows: int = 300, seed: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 8)).astype(np.float32)
    x[:, 0] *= 1000.0
    return x
