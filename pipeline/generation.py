"""Generation from chat messages, and the answer-or-refuse decision every path uses.

- ``DecodeBatch``: the one decode loop; every generating caller runs on it. Rows join a
  running batch after their own prefill and leave when they end, each with its own settings.
- ``decode_all``: rows through one ``DecodeBatch``, a finished row's place refilled at once:
  ``generate_batch`` (greedy answers for eval, the dataset stage's on-policy answers and PPO's
  held-out answers), PPO's rollout sampling (pipeline/rl/trainer.py) and the bench.
- ``stream_batch``: replies as they grow, for the bench and tests; the service's batcher
  (pipeline/batching.py) drives its own ``DecodeBatch``, admitting requests between steps.
- ``PromptPrefix``: the key/value cache of the system turn every prompt starts with, computed
  once per model, so a row's prefill reads only the tokens after it.
- ``lookup_draft``: prompt lookup decoding. A greedy row guesses its next tokens by finding
  its last few tokens earlier in its prompt, and the step's forward pass checks the whole
  guess; every token it writes is still the model's own argmax.

Decide, then answer: a variant trained to refuse carries a ``refusal_threshold`` chosen on the
dev split (pipeline/answerability.py). The refusal's mean token log-probability under the
model, given the prompt, is compared with it: above, the reply is the refusal and nothing is
generated; below, the model answers with the refusal's words banned, so the decision and the
answer never disagree. No ``repetition_penalty``: transformers applies it to the prompt's
tokens too, and the answer should copy the passage's words.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from tqdm.auto import tqdm
from transformers import (NoBadWordsLogitsProcessor, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from pipeline.prompt import REFUSAL


def prompt_text(tokenizer, conversation: list[dict]) -> str:
    return tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


def refusal_word_ids(tokenizer) -> list[list[int]]:
    """Token sequences to ban when the decision is "answer": the refusal's opening ("The
    provided") and its verb phrase ("do not contain"). Banning only the whole sentence lets the
    model finish it with another word ("... do not contain the idea"), a refusal in all but name."""
    return [tokenizer(text, add_special_tokens=False)["input_ids"]
            for text in ("The provided", " The provided", " do not contain", "do not contain")]


def refusal_scores(model, tokenizer, conversations: list[list[dict]], batch_size: int = 8,
                   desc: str | None = "refusal scores") -> list[float]:
    """Mean log-probability per token of the exact refusal as the reply to each conversation."""
    from pipeline.scoring import answer_logprobs

    totals = answer_logprobs(model, tokenizer, conversations, [REFUSAL] * len(conversations),
                             batch_size=batch_size, desc=desc)
    length = len(tokenizer(REFUSAL, add_special_tokens=False)["input_ids"])
    return [t / length for t in totals]


def generate_batch(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 96,
                   batch_size: int = 8, desc: str | None = "generating",
                   refusal_threshold: float | None = None, lookup_tokens: int = 0) -> list[str]:
    """Greedy answers to each conversation, ``batch_size`` rows decoding together in one
    ``DecodeBatch`` (a finished row's place goes to the next conversation at once), with
    ``lookup_tokens``, by prompt lookup decoding.

    With ``refusal_threshold``, each row decides as it reads its prompt (``DecodeBatch.join``,
    the score ``refusal_scores`` gives): above it the answer is the refusal, below it the row
    answers with the refusal's words banned."""
    import torch

    answers = [""] * len(conversations)
    with torch.inference_mode(), tqdm(total=len(conversations), desc=desc, unit="answer",
                                      disable=desc is None) as bar:
        rows = (Row(tokenizer(prompt_text(tokenizer, conversation), add_special_tokens=False)["input_ids"],
                    lambda text, i=i: _keep(answers, i, text, bar), max_new_tokens,
                    refusal_threshold=refusal_threshold)
                for i, conversation in enumerate(conversations))
        decode_all(model, tokenizer, rows, batch_size, lookup_tokens)
    return [a.strip() for a in answers]


def decode_all(model, tokenizer, rows, batch_size: int = 8, lookup_tokens: int = 0) -> None:
    """Decode every row (an iterable, read lazily) to its end, ``batch_size`` at a time in one
    ``DecodeBatch``: a finished row's place goes to the next row at the next step."""
    batch, pending = DecodeBatch(model, tokenizer, lookup_tokens=lookup_tokens), iter(rows)
    while True:
        while len(batch.rows) < batch_size and (row := next(pending, None)) is not None:
            batch.join(row)
        if not batch.rows:
            return
        batch.step()


def _keep(answers: list[str], i: int, text: str | None, bar) -> None:
    if text is None:
        bar.update(1)
    else:
        answers[i] = text


# Guessed tokens a greedy row feeds each step (0 = off). Chosen on the 85 served dev prompts
# (sft, greedy, one at a time): 15 guessed after the last two ids wrote 5.9 tokens a step and
# decoded 3.4x faster than none (73.3 against 21.5 tokens/s), every reply identical (docs/results.md,
# "Faster free decoding").
LOOKUP_TOKENS = 15


def lookup_draft(ids: list[int], size: int, ngram: int = 2) -> list[int]:
    """Prompt lookup decoding (Saxena, 2023): the ``size`` tokens that followed the latest
    earlier occurrence of the last ``ngram`` ids (then of fewer), or [] when none occurs.

    A grounded answer copies the passage's words, so its next tokens are usually already in
    the prompt. Decoding on a CPU is bound by reading the weights, so checking 15 guessed
    tokens in one forward pass costs about twice writing one (docs/results.md, "Faster free decoding")."""
    for n in range(min(ngram, len(ids) - 1), 0, -1):
        tail = ids[-n:]
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start:start + n] == tail:
                return ids[start + n:start + n + size]
    return []


def system_prefix_ids(tokenizer) -> list[int]:
    """The tokens of the chat template's system turn, as every prompt of
    ``pipeline.prompt.build_messages`` begins."""
    from pipeline.prompt import SYSTEM_PROMPT

    text = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT}], tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class PromptPrefix:
    """The key/value cache of a token prefix shared by many prompts (the system turn: 71 of a
    typical 377 prompt tokens for SmolLM2), computed on first use and copied into each row
    that starts with it. Attention is causal, so the prefix's keys and values do not depend on
    what follows; a row that starts otherwise (another system prompt) is read whole."""

    def __init__(self, model, ids: list[int]):
        self.model, self.ids = model, list(ids)
        self._cache = None

    @classmethod
    def system_turn(cls, model, tokenizer) -> "PromptPrefix":
        """The prefix of every prompt ``pipeline.prompt.build_messages`` makes."""
        return cls(model, system_prefix_ids(tokenizer))

    def covers(self, prompt_ids: list[int]) -> bool:
        """True when the prompt starts with the prefix and has tokens after it."""
        return bool(self.ids) and len(prompt_ids) > len(self.ids) and prompt_ids[:len(self.ids)] == self.ids

    def cache(self):
        """A fresh copy of the prefix's cache (the row's prefill extends it in place)."""
        import copy

        import torch

        if self._cache is None:
            with torch.inference_mode():
                ids = torch.tensor([self.ids], device=self.model.device)
                self._cache = self.model(input_ids=ids, use_cache=True, logits_to_keep=1).cache
        return copy.deepcopy(self._cache)


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass
class Row:
    """One reply being decoded: its settings, its tokens so far, and where its text goes.

    ``emit(text)`` receives the growing reply, ``emit(None)`` once when the row has ended
    (end of turn, its token cap, its deadline, or ``abandoned`` set by a caller that left)."""

    prompt_ids: list[int]
    emit: Callable[[str | None], None]
    max_new_tokens: int = 160
    temperature: float = 0.0
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    refusal_threshold: float | None = None
    min_new_tokens: int = 0
    deadline: float = float("inf")  # time.monotonic() past which the row ends
    abandoned: threading.Event = field(default_factory=threading.Event)
    top_k: int = 0  # sampling only; 0 keeps every token
    generated: list[int] = field(default_factory=list)
    stopped: bool = False  # ended by the end-of-turn token (not a cap, deadline or caller)
    ended: bool = False
    processors: list = field(default_factory=list)

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self.emit(None)


class DecodeBatch:
    """Rows decoded together: one forward pass per step extends every row by a token.

    A row joins whenever it comes, after its own prompt is read (prefill), and leaves as soon
    as it ends; the other rows go on. The key/value cache holds the rows left-padded to one
    length, with an attention mask over the padding and each row's own position ids, so a
    row decodes as it would alone. A decode step reads every weight once however many rows it
    extends, so more rows a step cost less each: on 2 AVX2 cores eight concurrent clients decoded
    35.5 tokens/s against one client's 10.4 (reports/bench-serving.md).

    With ``lookup_tokens`` > 0, each greedy row feeds its next token together with guessed ones
    (``lookup_draft``) and keeps the guesses the model itself would have chosen, plus the
    model's own next token: one step can write several tokens a row. A step feeds about
    ``lookup_tokens`` + 1 tokens in all: with 15, one row guesses 15, four rows 3 each, eight
    rows 1 each (every fed token costs compute once the weights are read: eight rows guessing
    15 each decoded slower than with no guesses). Rows whose guesses are shorter are filled out
    to the step's width; filler and guesses that did not stand are masked like padding, and
    columns no row uses are cut."""

    def __init__(self, model, tokenizer, prefix: PromptPrefix | None = None, lookup_tokens: int = 0,
                 lookup_ngram: int = 2):
        self.model, self.tokenizer, self.prefix = model, tokenizer, prefix
        self.lookup_tokens, self.lookup_ngram = lookup_tokens, lookup_ngram
        self.rows: list[Row] = []
        self.cache = None  # transformers DynamicCache; each layer (rows, heads, length, dim)
        self.mask = None  # (rows, length), 0 over left padding
        self.stop_ids = (set(_as_list(tokenizer.eos_token_id))
                         | set(_as_list(getattr(model.generation_config, "eos_token_id", None))))
        self._pending: list[int] = []  # each row's last chosen token, fed at the next step
        self.steps, self.step_seconds, self.step_tokens = 0, 0.0, 0  # decode steps only (no prompt reading)

    def join(self, row: Row) -> None:
        """Read the row's prompt (after the cached prefix, when it starts with it) and choose its
        first token; with a refusal threshold, decide first (one pass reads the prompt and
        scores the refusal after it) and, above it, reply with the refusal without decoding."""
        import torch

        refusal = (self.tokenizer(REFUSAL, add_special_tokens=False)["input_ids"]
                   if row.refusal_threshold is not None else [])
        past, start = None, 0
        if self.prefix is not None and self.prefix.covers(row.prompt_ids):
            past, start = self.prefix.cache(), len(self.prefix.ids)
        ids = torch.tensor([row.prompt_ids[start:] + refusal], device=self.model.device)
        out = self.model(input_ids=ids, cache=past, use_cache=True, logits_to_keep=len(refusal) + 1)
        logits = out.logits[0].float()
        if refusal:
            logp = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(refusal, device=logits.device)[:, None])
            if float(logp.mean()) > row.refusal_threshold:
                row.emit(REFUSAL)
                row.end()
                return
            row.processors.append(NoBadWordsLogitsProcessor(refusal_word_ids(self.tokenizer),
                                                            eos_token_id=list(self.stop_ids)))
        cache = _truncate(out.cache, len(row.prompt_ids))  # forget the refusal's tokens: the reply follows the prompt
        if row.repetition_penalty != 1.0:
            row.processors.append(RepetitionPenaltyLogitsProcessor(row.repetition_penalty))
        if row.temperature > 0:
            row.processors.append(TemperatureLogitsWarper(row.temperature))
            if row.top_k:
                row.processors.append(TopKLogitsWarper(row.top_k))
            row.processors.append(TopPLogitsWarper(row.top_p))
        token = self._choose(row, logits[0])
        if row.ended:
            return
        mask = torch.ones(1, len(row.prompt_ids), dtype=torch.long, device=ids.device)
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            for mine, theirs in zip(self.cache.layers, cache.layers):
                mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
                mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)])
            self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.rows.append(row)
        self._pending.append(token)

    def step(self) -> None:
        """End the rows past their deadline or abandoned, then extend the rest by one token (and
        by the guesses that stand, with ``lookup_tokens``)."""
        import time

        import torch

        now = time.monotonic()
        for row in self.rows:
            if row.abandoned.is_set() or now > row.deadline:
                row.end()
        self._drop_ended()
        if not self.rows:
            return
        started, written = time.perf_counter(), sum(len(row.generated) for row in self.rows)
        share = (self.lookup_tokens + 1) // len(self.rows) - 1  # guessed tokens a row may feed
        drafts = [self._draft(row, share) for row in self.rows]
        width = 1 + max(len(d) for d in drafts)
        fed = [[pending] + draft + [pending] * (width - 1 - len(draft))  # filler past a short draft, masked
               for pending, draft in zip(self._pending, drafts)]
        tokens = torch.tensor(fed, device=self.mask.device)
        added = torch.tensor([[1] * (1 + len(d)) + [0] * (width - 1 - len(d)) for d in drafts], device=self.mask.device)
        before = self.mask.shape[1]
        positions = self.mask.sum(1, keepdim=True) + torch.arange(width, device=self.mask.device)
        self.mask = torch.cat([self.mask, added.to(self.mask.dtype)], 1)
        out = self.model(input_ids=tokens, attention_mask=self.mask, position_ids=positions,
                         cache=self.cache, use_cache=True)
        self.cache = out.cache
        logits = out.logits.float()
        self._pending = []
        for i, (row, draft) in enumerate(zip(self.rows, drafts)):
            token, stood = self._check(row, draft, logits[i])
            self._pending.append(token)
            self.mask[i, before + 1 + stood:] = 0  # guesses that did not stand: masked from now on
        keep = int(self.mask.shape[1] - (self.mask.sum(0) == 0).long().flip(0).cumprod(0).sum())
        self.mask, self.cache = self.mask[:, :keep], _truncate(self.cache, keep)  # columns no row uses
        self.step_tokens += sum(len(row.generated) for row in self.rows) - written
        self.step_seconds += time.perf_counter() - started
        self.steps += 1
        self._drop_ended()

    def _draft(self, row: Row, share: int) -> list[int]:
        """Up to ``share`` guessed next tokens for a greedy row (``lookup_draft``), else []."""
        room = min(share, row.max_new_tokens - len(row.generated) - 1)  # the pending token counts too
        if room <= 0 or row.temperature > 0:
            return []
        return lookup_draft(row.prompt_ids + row.generated, room, self.lookup_ngram)

    def _check(self, row: Row, draft: list[int], logits) -> tuple[int, int]:
        """Choose the row's tokens along its fed draft while each is the guess fed next:
        (the last chosen token, to feed at the next step; how many guesses stood)."""
        for j in range(len(draft) + 1):
            token = self._choose(row, logits[j])
            if row.ended or j == len(draft) or token != draft[j]:
                return token, j

    def _choose(self, row: Row, logits) -> int:
        import torch

        scores = logits[None]
        if row.processors:
            ids = torch.tensor([row.prompt_ids + row.generated], device=scores.device)
            for processor in row.processors:
                scores = processor(ids, scores)
        if len(row.generated) < row.min_new_tokens:
            scores[:, list(self.stop_ids)] = float("-inf")
        if row.temperature > 0:
            token = int(torch.multinomial(torch.softmax(scores, -1), 1))
        else:
            token = int(scores.argmax(-1))
        if token in self.stop_ids:
            row.stopped = True
            row.end()
            return token
        row.generated.append(token)
        text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            row.emit(text)
        if len(row.generated) >= row.max_new_tokens:
            row.end()
        return token

    def _drop_ended(self) -> None:
        keep = [i for i, row in enumerate(self.rows) if not row.ended]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self._pending = [self._pending[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return
        import torch

        index = torch.tensor(keep, device=self.mask.device)
        self.mask = self.mask[index]
        lead = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # padding no row needs now
        self.mask = self.mask[:, lead:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, lead:], layer.values[index, :, lead:]


def _truncate(cache, size: int):
    """The cache cut to its first ``size`` positions (in place; returned for convenience)."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[..., :size, :], layer.values[..., :size, :]
    return cache


def _pad_left(tensor, width: int, dim: int):
    import torch.nn.functional as F

    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - dim - 1) + [missing, 0]
    return F.pad(tensor, pad)


def stream_batch(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int | list[int] = 160,
                 temperature: float = 0.0, top_p: float = 0.9, repetition_penalty: float = 1.0,
                 refusal_threshold: float | None = None, deadline_seconds: float | list[float] = 120.0,
                 abandoned: list | None = None, min_new_tokens: int = 0, prefix: PromptPrefix | None = None,
                 lookup_tokens: int = 0):
    """Decode several conversations together (``DecodeBatch``) and yield ``(row, text)`` as
    each row's reply grows, then ``(row, None)`` when that row has ended.

    With ``refusal_threshold``, each row decides first: above it the reply is the refusal,
    with nothing generated; below it the row answers with the refusal's words banned. Each row
    has its own token cap and deadline, and ends at the next step once its ``abandoned`` event
    is set. ``min_new_tokens`` holds off the end of turn (the bench times fixed lengths);
    ``prefix`` (a ``PromptPrefix`` kept across calls) skips re-reading the system turn;
    ``lookup_tokens`` turns on prompt lookup decoding for greedy rows."""
    import time

    import torch

    count = len(conversations)
    caps = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * count
    waits = deadline_seconds if isinstance(deadline_seconds, list) else [deadline_seconds] * count
    abandoned = abandoned or [threading.Event() for _ in range(count)]
    updates: list[tuple[int, str | None]] = []
    batch = DecodeBatch(model, tokenizer, prefix, lookup_tokens)
    now = time.monotonic()
    with torch.inference_mode():
        for i, conversation in enumerate(conversations):
            ids = tokenizer(prompt_text(tokenizer, conversation), add_special_tokens=False)["input_ids"]
            batch.join(Row(ids, lambda text, i=i: updates.append((i, text)), caps[i], temperature, top_p,
                           repetition_penalty, refusal_threshold, min_new_tokens, now + waits[i], abandoned[i]))
            yield from updates
            updates.clear()
        while batch.rows:
            batch.step()
            yield from updates
            updates.clear()
