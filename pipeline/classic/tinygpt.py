"""A tiny decoder-only transformer (multi-head causal self-attention, learned positions)
trained on the characters of the project's documents; held-out perplexity and a sample."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from pipeline.classic.common import seed

DOCS = Path(__file__).resolve().parents[2] / "data" / "docs"


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, causal_mask):
        h = self.norm1(x)
        x = x + self.attention(h, h, h, attn_mask=causal_mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int, context: int = 64, dim: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.context = context
        self.tokens, self.positions = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, idx):
        n = idx.shape[1]
        # True above the diagonal = "may not attend": position t sees only positions <= t
        mask = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        x = self.tokens(idx) + self.positions(torch.arange(n))
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))

    @torch.no_grad()
    def sample(self, idx, steps: int, temperature: float = 0.8):
        for _ in range(steps):
            logits = self(idx[:, -self.context:])[:, -1] / temperature
            idx = torch.cat([idx, torch.multinomial(torch.softmax(logits, -1), 1)], 1)
        return idx


def text_split():
    text = "\n".join(p.read_text() for p in sorted(DOCS.glob("*.md")))
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:], chars


def windows(ids, context: int, n: int, generator):
    starts = torch.randint(0, len(ids) - context - 1, (n,), generator=generator)
    x = torch.stack([ids[s:s + context] for s in starts])
    y = torch.stack([ids[s + 1:s + context + 1] for s in starts])
    return x, y


def perplexity(model, ids, context: int, n: int = 64) -> float:
    x, y = windows(ids, context, n, torch.Generator().manual_seed(7))
    with torch.no_grad():
        return math.exp(float(nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())))


def run(quick: bool, out_dir: Path) -> dict:
    seed(0)
    train, held_out, chars = text_split()
    model = TinyGPT(len(chars))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200 if quick else 2000):
        x, y = windows(train, model.context, 32, generator)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    counts = torch.bincount(train, minlength=len(chars)).float() + 1
    unigram = math.exp(float(-(counts / counts.sum() * (counts / counts.sum()).log()).sum()))
    prompt = torch.tensor([[chars.index(c) for c in "The "]])
    sample = "".join(chars[i] for i in model.sample(prompt, 120)[0].tolist())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tinygpt_sample.txt").write_text(sample + "\n")
    return {"held_out_perplexity": round(perplexity(model, held_out, model.context), 3),
            "unigram_perplexity": round(unigram, 3), "vocabulary": len(chars),
            "parameters": sum(p.numel() for p in model.parameters()), "sample": sample[:60].replace("\n", " ")}
