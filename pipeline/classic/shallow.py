"""A shallow network and a sweep of hidden width: underfitting, then overfitting (noisy moons)."""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.classic.common import accuracy, figure, save, seed, split


def mlp(width: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(2, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))


def fit(width: int, x_train, y_train, x_val, y_val, epochs: int) -> tuple[float, float]:
    seed(width)
    model = mlp(width)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(epochs):
        loss = torch.nn.functional.cross_entropy(model(x_train), y_train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return accuracy(model(x_train), y_train), accuracy(model(x_val), y_val)


def run(quick: bool, out_dir: Path) -> dict:
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=300, noise=0.35, random_state=0)
    x_train, y_train, x_val, y_val = split(x, y, test_share=0.5)
    widths = [1, 2, 4, 16, 64, 256] if quick else [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    epochs = 300 if quick else 2000
    results = {w: fit(w, x_train, y_train, x_val, y_val, epochs) for w in widths}
    fig, axes = figure()
    ax = axes[0, 0]
    ax.plot(widths, [r[0] for r in results.values()], marker="o", label="train")
    ax.plot(widths, [r[1] for r in results.values()], marker="o", label="validation")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("hidden width")
    ax.set_ylabel("accuracy")
    ax.legend()
    save(fig, out_dir, "shallow_width_sweep.png")
    best = max(results, key=lambda w: results[w][1])
    return {"width1_train_acc": round(results[1][0], 3), "best_width": best,
            "best_val_acc": round(results[best][1], 3),
            "widest_gap": round(results[widths[-1]][0] - results[widths[-1]][1], 3)}
