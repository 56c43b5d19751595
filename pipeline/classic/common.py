"""Small helpers the teaching modules share: seeding, data splits, plotting."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def seed(value: int = 0) -> None:
    torch.manual_seed(value)
    np.random.seed(value)


def split(x: np.ndarray, y: np.ndarray, test_share: float = 0.25, standardize: bool = True, seed_value: int = 0):
    """Shuffled train/test tensors; features standardised with the training statistics."""
    rng = np.random.default_rng(seed_value)
    order = rng.permutation(len(x))
    cut = int(len(x) * (1 - test_share))
    train, test = order[:cut], order[cut:]
    x_train, x_test = x[train].astype(np.float32), x[test].astype(np.float32)
    if standardize:
        mean, std = x_train.mean(0), x_train.std(0) + 1e-8
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    as_t = lambda a: torch.tensor(a)  # noqa: E731
    return as_t(x_train), as_t(y[train]), as_t(x_test), as_t(y[test])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def figure(ncols: int = 1, nrows: int = 1, size=(6.4, 4.0)):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    return fig, axes


def save(fig, out_dir: Path, name: str) -> str:
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
