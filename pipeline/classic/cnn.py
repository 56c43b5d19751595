"""A CNN on the 8x8 digits: convolution, max pooling, channels, flattening; kernels and
activation maps drawn; transfer learning with a frozen feature extractor (0-4 -> 5-9)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.classic.common import accuracy, figure, save, seed, split


class DigitCNN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 8x8 -> 8 maps of 4x4
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # -> 16 maps of 2x2
            nn.Flatten())                                                 # -> 64 numbers
        self.head = nn.Linear(16 * 2 * 2, classes)

    def forward(self, x):
        return self.head(self.features(x))


def fit(model, x, y, epochs: int, params=None, lr: float = 3e-3) -> None:
    optimizer = torch.optim.Adam(params if params is not None else model.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(32):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def images(x):
    return x.reshape(-1, 1, 8, 8)


def run(quick: bool, out_dir: Path) -> dict:
    from sklearn.datasets import load_digits

    seed(0)
    digits = load_digits()
    x, y, x_test, y_test = split(digits.data / 16.0, digits.target, standardize=False)
    x, x_test = images(x), images(x_test)
    epochs = 10 if quick else 30
    model = DigitCNN()
    fit(model, x, y, epochs)
    with torch.no_grad():
        test_acc = accuracy(model(x_test), y_test)
        maps = model.features[:2](x_test[:1])[0]
    fig, axes = figure(8, 2, size=(1.4, 1.4))
    for i in range(8):
        axes[0, i].imshow(model.features[0].weight[i, 0].detach(), cmap="gray")
        axes[1, i].imshow(maps[i], cmap="viridis")
        axes[0, i].axis("off")
        axes[1, i].axis("off")
    save(fig, out_dir, "cnn_kernels_and_maps.png")

    # transfer: features learned on digits 0-4, a new head for 5-9 with the features frozen
    seed(1)
    low, high = y < 5, y >= 5
    source = DigitCNN(classes=5)
    fit(source, x[low], y[low], epochs)
    for parameter in source.features.parameters():
        parameter.requires_grad = False
    frozen = [p.clone() for p in source.features.parameters()]
    source.head = nn.Linear(64, 5)
    fit(source, x[high], y[high] - 5, epochs, params=source.head.parameters())
    test_high = y_test >= 5
    with torch.no_grad():
        transfer_acc = accuracy(source(x_test[test_high]), y_test[test_high] - 5)
    unchanged = all(torch.equal(a, b) for a, b in zip(frozen, source.features.parameters()))
    return {"test_accuracy": round(test_acc, 4), "transfer_accuracy_5_to_9": round(transfer_acc, 4),
            "frozen_features_unchanged": unchanged,
            "parameters": sum(p.numel() for p in DigitCNN().parameters())}
