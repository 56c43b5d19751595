"""Logistic regression on the breast cancer data: sigmoid, cross-entropy against MSE, mini-batch SGD."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.classic.common import figure, save, seed, split


def sigmoid(z: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-z))


def score_gradients(z: float, y: float) -> tuple[float, float]:
    """d loss / d score for cross-entropy (p - y) and for half-MSE through a sigmoid
    ((p - y) p (1 - p)): the second vanishes when the model is confidently wrong."""
    p = float(sigmoid(torch.tensor(z)))
    return p - y, (p - y) * p * (1 - p)


def train(x, y, epochs: int, batch_size: int = 32, lr: float = 0.1, loss: str = "ce"):
    w, b = torch.zeros(x.shape[1], requires_grad=True), torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([w, b], lr=lr)
    history = []
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(batch_size):
            p = sigmoid(x[idx] @ w + b)
            target = y[idx].float()
            value = (torch.nn.functional.binary_cross_entropy(p, target) if loss == "ce"
                     else 0.5 * ((p - target) ** 2).mean())
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
        history.append(float(value.detach()))
    return w.detach(), b.detach(), history


def loss_surfaces(x, y, out_dir: Path) -> str:
    """Both losses over two weights (other weights 0): MSE goes flat far from the optimum."""
    grid = np.linspace(-12, 12, 61)
    ce, mse = np.zeros((61, 61)), np.zeros((61, 61))
    pair = x[:, :2]
    for i, w0 in enumerate(grid):
        for j, w1 in enumerate(grid):
            p = sigmoid(pair @ torch.tensor([w0, w1], dtype=torch.float32)).clamp(1e-6, 1 - 1e-6)
            t = y.float()
            ce[j, i] = float(-(t * p.log() + (1 - t) * (1 - p).log()).mean())
            mse[j, i] = float(0.5 * ((p - t) ** 2).mean())
    fig, axes = figure(2)
    for ax, surface, title in ((axes[0, 0], ce, "cross-entropy"), (axes[0, 1], mse, "MSE through a sigmoid")):
        contour = ax.contourf(grid, grid, surface, levels=30)
        fig.colorbar(contour, ax=ax)
        ax.set_title(title)
        ax.set_xlabel("w0")
        ax.set_ylabel("w1")
    return save(fig, out_dir, "logistic_loss_surfaces.png")


def run(quick: bool, out_dir: Path) -> dict:
    from sklearn.datasets import load_breast_cancer

    seed(0)
    data = load_breast_cancer()
    x_train, y_train, x_test, y_test = split(data.data, data.target)
    epochs = 20 if quick else 100
    w, b, ce_history = train(x_train, y_train, epochs)
    _, _, mse_history = train(x_train, y_train, epochs, loss="mse")
    accuracy = float(((sigmoid(x_test @ w + b) > 0.5).long() == y_test).float().mean())
    ce_grad, mse_grad = score_gradients(z=-6.0, y=1.0)
    fig, axes = figure()
    axes[0, 0].plot(ce_history, label="cross-entropy")
    axes[0, 0].plot(mse_history, label="MSE")
    axes[0, 0].set_xlabel("epoch")
    axes[0, 0].legend()
    save(fig, out_dir, "logistic_training.png")
    loss_surfaces(x_train, y_train, out_dir)
    return {"test_accuracy": round(accuracy, 4), "ce_grad_confident_wrong": round(ce_grad, 4),
            "mse_grad_confident_wrong": round(mse_grad, 5)}
