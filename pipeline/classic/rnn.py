"""RNN, LSTM and GRU on a sequence task that needs memory: the label is the sign of the first
element of a noisy sequence, so the hidden state must carry it to the end."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.classic.common import figure, save, seed


def make_task(n: int, length: int, generator: torch.Generator):
    """(n, length, 1) inputs: first element +-1, the rest noise; label 1 when the first is +1."""
    first = torch.randint(0, 2, (n,), generator=generator)
    x = 0.3 * torch.randn(n, length, 1, generator=generator)
    x[:, 0, 0] = first.float() * 2 - 1
    return x, first


class Classifier(nn.Module):
    def __init__(self, cell: str, hidden: int = 32):
        super().__init__()
        self.rnn = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell](1, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 2)

    def forward(self, x):
        outputs, _ = self.rnn(x)  # outputs: (batch, length, hidden), one hidden state per step
        return self.out(outputs[:, -1])  # classify from the last hidden state only


def train_cell(cell: str, length: int, steps: int) -> tuple[float, list[float]]:
    seed(0)
    generator = torch.Generator().manual_seed(0)
    model = Classifier(cell)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        x, y = make_task(64, length, generator)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss))
    x, y = make_task(512, length, torch.Generator().manual_seed(99))
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean()), losses


def run(quick: bool, out_dir: Path) -> dict:
    length, steps = (10, 300) if quick else (30, 1500)
    results = {cell: train_cell(cell, length, steps) for cell in ("rnn", "lstm", "gru")}
    fig, axes = figure()
    for cell, (_, losses) in results.items():
        axes[0, 0].plot(losses, label=cell)
    axes[0, 0].set_title(f"remember the first of {length} steps: training loss")
    axes[0, 0].legend()
    save(fig, out_dir, "rnn_memory.png")
    return {f"{cell}_accuracy": round(acc, 3) for cell, (acc, _) in results.items()} | {"sequence_length": length}
