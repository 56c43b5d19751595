"""Softmax regression on iris (two petal features): argmax prediction, weight vectors, regions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.classic.common import accuracy, figure, save, seed, split


def softmax(logits: torch.Tensor) -> torch.Tensor:
    shifted = logits - logits.max(-1, keepdim=True).values  # the log-sum-exp trick
    e = shifted.exp()
    return e / e.sum(-1, keepdim=True)


def run(quick: bool, out_dir: Path) -> dict:
    from sklearn.datasets import load_iris

    seed(0)
    data = load_iris()
    x_train, y_train, x_test, y_test = split(data.data[:, 2:4], data.target)
    model = torch.nn.Linear(2, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(100 if quick else 500):
        loss = torch.nn.functional.cross_entropy(model(x_train), y_train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        test_acc = accuracy(model(x_test), y_test)
        xs = np.linspace(-2.5, 2.5, 200)
        grid = torch.tensor(np.array(np.meshgrid(xs, xs)).reshape(2, -1).T, dtype=torch.float32)
        regions = model(grid).argmax(-1).reshape(200, 200).numpy()
    fig, axes = figure()
    ax = axes[0, 0]
    ax.contourf(xs, xs, regions, alpha=0.3, levels=[-0.5, 0.5, 1.5, 2.5])
    ax.scatter(x_train[:, 0], x_train[:, 1], c=y_train, s=12, edgecolors="k")
    for k, (wx, wy) in enumerate(model.weight.detach().numpy()):
        ax.arrow(0, 0, wx / 3, wy / 3, width=0.03, color=f"C{k}")
    ax.set_title("softmax regression: weight vectors and argmax regions")
    save(fig, out_dir, "softmax_regions.png")
    return {"test_accuracy": round(test_acc, 4), "final_train_loss": round(float(loss.detach()), 4)}
