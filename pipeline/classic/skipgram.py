"""Skip-gram word embeddings with negative sampling, nn.Embedding, on the project's documents."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from pipeline.classic.common import seed

DOCS = Path(__file__).resolve().parents[2] / "data" / "docs"


def corpus(max_vocab: int = 1500) -> tuple[list[int], list[str]]:
    words = re.findall(r"[a-z][a-z0-9-]+", " ".join(p.read_text().lower() for p in sorted(DOCS.glob("*.md"))))
    vocab = [w for w, _ in Counter(words).most_common(max_vocab)]
    index = {w: i for i, w in enumerate(vocab)}
    return [index[w] for w in words if w in index], vocab


class SkipGram(nn.Module):
    def __init__(self, vocab_size: int, dim: int = 64):
        super().__init__()
        self.centre = nn.Embedding(vocab_size, dim)
        self.context = nn.Embedding(vocab_size, dim)
        nn.init.uniform_(self.centre.weight, -0.5 / dim, 0.5 / dim)
        nn.init.zeros_(self.context.weight)

    def loss(self, centre, context, negatives):
        """-log sigma(u_c . v_o) - sum log sigma(-u_c . v_n) (Mikolov et al. 2013)."""
        c = self.centre(centre)
        positive = nn.functional.logsigmoid((c * self.context(context)).sum(-1))
        negative = nn.functional.logsigmoid(-(self.context(negatives) @ c.unsqueeze(-1)).squeeze(-1)).sum(-1)
        return -(positive + negative).mean()


def pairs(ids: list[int], window: int) -> torch.Tensor:
    t = torch.tensor(ids)
    out = [torch.stack([t[:-k], t[k:]], 1) for k in range(1, window + 1)]
    out += [torch.stack([t[k:], t[:-k]], 1) for k in range(1, window + 1)]
    return torch.cat(out)


def neighbours(model: SkipGram, vocab: list[str], word: str, k: int = 5) -> list[str]:
    weights = nn.functional.normalize(model.centre.weight.detach(), dim=-1)
    sims = weights @ weights[vocab.index(word)]
    return [vocab[i] for i in sims.argsort(descending=True)[1:k + 1]]


def run(quick: bool, out_dir: Path) -> dict:
    seed(0)
    ids, vocab = corpus()
    data = pairs(ids, window=3)
    counts = torch.bincount(torch.tensor(ids), minlength=len(vocab)).float() ** 0.75
    model = SkipGram(len(vocab))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    epochs = 2 if quick else 8
    losses = []
    for _ in range(epochs):
        for batch in data[torch.randperm(len(data))].split(1024):
            negatives = torch.multinomial(counts, len(batch) * 5, replacement=True).view(len(batch), 5)
            loss = model.loss(batch[:, 0], batch[:, 1], negatives)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
    shown = {w: neighbours(model, vocab, w) for w in ("adam", "dropout", "lora", "attention") if w in vocab}
    (out_dir).mkdir(parents=True, exist_ok=True)
    (out_dir / "skipgram_neighbours.txt").write_text(
        "\n".join(f"{w}: {', '.join(n)}" for w, n in shown.items()) + "\n")
    return {"vocabulary": len(vocab), "pairs": len(data), "first_loss": round(sum(losses[:20]) / 20, 4),
            "last_loss": round(sum(losses[-20:]) / 20, 4), "neighbours_of_adam": ", ".join(shown.get("adam", []))}
