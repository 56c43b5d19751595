"""A GRU encoder-decoder with additive attention (Bahdanau et al. 2014) learning to reverse
digit strings; teacher forcing in training, greedy decoding token by token, BLEU and accuracy."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.classic.common import figure, save, seed

PAD, START, END = 10, 11, 12  # digits are tokens 0-9
VOCAB = 13


def batch(n: int, generator: torch.Generator, min_len: int = 3, max_len: int = 7):
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator)
    src = torch.full((n, max_len), PAD)
    tgt = torch.full((n, max_len + 2), PAD)
    for i, length in enumerate(lengths.tolist()):
        digits = torch.randint(0, 10, (length,), generator=generator)
        src[i, :length] = digits
        tgt[i, 0], tgt[i, 1:length + 1], tgt[i, length + 1] = START, digits.flip(0), END
    return src, tgt


class Seq2Seq(nn.Module):
    def __init__(self, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.encoder = nn.GRU(32, hidden, batch_first=True)
        self.decoder = nn.GRUCell(32 + hidden, hidden)
        self.w_query, self.w_key = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, 1)
        self.out = nn.Linear(2 * hidden, VOCAB)

    def attend(self, state, keys, mask):
        scores = self.v(torch.tanh(self.w_query(state).unsqueeze(1) + self.w_key(keys))).squeeze(-1)
        weights = torch.softmax(scores.masked_fill(~mask, -1e9), -1)  # (batch, source length)
        return (weights.unsqueeze(-1) * keys).sum(1), weights

    def step(self, token, state, keys, mask):
        context, weights = self.attend(state, keys, mask)
        state = self.decoder(torch.cat([self.embed(token), context], -1), state)
        return self.out(torch.cat([state, context], -1)), state, weights

    def encode(self, src):
        keys, last = self.encoder(self.embed(src))
        return keys, last[0], src != PAD

    def forward(self, src, tgt):
        """Teacher forcing: the true previous token is fed at every step."""
        keys, state, mask = self.encode(src)
        logits = []
        for t in range(tgt.shape[1] - 1):
            step_logits, state, _ = self.step(tgt[:, t], state, keys, mask)
            logits.append(step_logits)
        return torch.stack(logits, 1)

    @torch.no_grad()
    def greedy(self, src, max_steps: int = 10):
        keys, state, mask = self.encode(src)
        token = torch.full((src.shape[0],), START)
        outputs, attention = [], []
        for _ in range(max_steps):
            logits, state, weights = self.step(token, state, keys, mask)
            token = logits.argmax(-1)
            outputs.append(token)
            attention.append(weights)
        return torch.stack(outputs, 1), torch.stack(attention, 1)


def strip(sequence: list[int]) -> list[int]:
    return sequence[: sequence.index(END)] if END in sequence else sequence


def run(quick: bool, out_dir: Path) -> dict:
    from pipeline.evaluation.metrics import bleu

    seed(0)
    generator = torch.Generator().manual_seed(0)
    model = Seq2Seq()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(500 if quick else 3000):
        src, tgt = batch(64, generator)
        logits = model(src, tgt)
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tgt[:, 1:].reshape(-1), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    src, tgt = batch(300, torch.Generator().manual_seed(123))
    predicted, attention = model.greedy(src)
    exact, scores = 0, []
    for p, t in zip(predicted.tolist(), tgt.tolist()):
        guess, truth = strip(p), strip(t[1:])
        exact += guess == truth
        scores.append(bleu(" ".join(map(str, guess)), " ".join(map(str, truth))))
    fig, axes = figure()
    axes[0, 0].imshow(attention[0].numpy(), cmap="viridis")
    axes[0, 0].set_xlabel("source position")
    axes[0, 0].set_ylabel("output step")
    axes[0, 0].set_title("attention while reversing (an anti-diagonal)")
    save(fig, out_dir, "seq2seq_attention.png")
    return {"exact_match": round(exact / len(scores), 3), "bleu": round(sum(scores) / len(scores), 3),
            "final_train_loss": round(float(loss), 4)}
