"""A deep network, each point a measured comparison: sigmoid vs ReLU gradients, default vs He
initialisation, dropout, batch normalisation, and SGD vs momentum vs Adam (digits)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.classic.common import figure, save, seed, split


def deep_net(depth: int = 10, width: int = 64, activation=nn.ReLU, dropout: float = 0.0,
             batchnorm: bool = False, init: str = "default") -> nn.Sequential:
    layers, size = [], 64
    for _ in range(depth):
        linear = nn.Linear(size, width)
        if init == "he":
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
        layers += [linear] + ([nn.BatchNorm1d(width)] if batchnorm else []) + [activation()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        size = width
    return nn.Sequential(*layers, nn.Linear(size, 10))


def gradient_norms(model: nn.Sequential, x, y) -> list[float]:
    """Norm of each linear layer's weight gradient after one backward pass, input to output."""
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return [float(m.weight.grad.norm()) for m in model if isinstance(m, nn.Linear)][:-1]


def activation_stds(model: nn.Sequential, x) -> list[float]:
    stds, h = [], x
    for module in model:
        h = module(h)
        if isinstance(module, nn.ReLU):
            stds.append(float(h.std()))
    return stds


def train(model, x, y, x_val, y_val, epochs: int, optimizer: str = "adam", lr: float = 1e-3):
    opt = {"sgd": lambda p: torch.optim.SGD(p, lr=lr), "momentum": lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9),
           "adam": lambda p: torch.optim.Adam(p, lr=lr)}[optimizer](model.parameters())
    losses = []
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            losses.append((float(nn.functional.cross_entropy(model(x), y)),
                           float(nn.functional.cross_entropy(model(x_val), y_val))))
    return losses


def run(quick: bool, out_dir: Path) -> dict:
    from sklearn.datasets import load_digits

    seed(0)
    digits = load_digits()
    x, y, x_val, y_val = split(digits.data, digits.target)
    epochs = 8 if quick else 30
    seed(0)
    sigmoid_norms = gradient_norms(deep_net(activation=nn.Sigmoid), x[:256], y[:256])
    seed(0)
    relu_norms = gradient_norms(deep_net(init="he"), x[:256], y[:256])
    seed(0)
    default_std = activation_stds(deep_net(depth=20), x[:256])
    seed(0)
    he_std = activation_stds(deep_net(depth=20, init="he"), x[:256])
    curves = {}
    for name, kwargs, opt, lr in (("sgd", {}, "sgd", 0.01), ("momentum", {}, "momentum", 0.01),
                                  ("adam", {}, "adam", 1e-3), ("adam+dropout", {"dropout": 0.3}, "adam", 1e-3),
                                  ("adam+batchnorm", {"batchnorm": True}, "adam", 1e-3)):
        seed(0)
        curves[name] = train(deep_net(depth=4, width=128, init="he", **kwargs), x, y, x_val, y_val, epochs, opt, lr)
    fig, axes = figure(3)
    axes[0, 0].semilogy(sigmoid_norms, marker="o", label="sigmoid")
    axes[0, 0].semilogy(relu_norms, marker="o", label="ReLU + He")
    axes[0, 0].set_title("gradient norm per layer (input → output)")
    axes[0, 1].plot(default_std, label="default init")
    axes[0, 1].plot(he_std, label="He init")
    axes[0, 1].set_title("activation std per ReLU layer")
    for name, values in curves.items():
        axes[0, 2].plot([v[1] for v in values], label=name)
    axes[0, 2].set_title("validation loss")
    for ax in axes[0]:
        ax.legend(fontsize=8)
    save(fig, out_dir, "deep_comparisons.png")
    final = {name: values[-1] for name, values in curves.items()}
    return {"sigmoid_first_over_last_grad": float(f"{sigmoid_norms[0] / sigmoid_norms[-1]:.3g}"),
            "relu_first_over_last_grad": float(f"{relu_norms[0] / relu_norms[-1]:.3g}"),
            "default_init_last_std": round(default_std[-1], 5), "he_init_last_std": round(he_std[-1], 4),
            **{f"{name}_val_loss": round(v[1], 4) for name, v in final.items()},
            "dropout_gap": round(final["adam+dropout"][1] - final["adam+dropout"][0], 4),
            "no_dropout_gap": round(final["adam"][1] - final["adam"][0], 4)}
