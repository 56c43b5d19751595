"""Generation from chat messages: batched greedy (eval, dataset), streamed (the chat engine),
and the answer-or-refuse decision both use.

Decide, then answer: a variant trained to refuse carries a ``refusal_threshold`` chosen on the
dev split (pipeline/answerability.py). The refusal's mean token log-probability under the
model, given the prompt, is compared with it: above, the reply is the refusal and nothing is
generated; below, the model answers with the refusal's words banned, so the decision and the
answer never disagree. No ``repetition_penalty``: transformers applies it to the prompt's
tokens too, and the answer should copy the passage's words.
"""
from __future__ import annotations

from tqdm.auto import tqdm

from pipeline.prompt import REFUSAL


def _prepare(tokenizer):
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
                   batch_size: int = 8, desc: str = "generating", refusal_threshold: float | None = None,
                   scores: list[float] | None = None) -> list[str]:
    """Greedy answers to each conversation (left-padded batches; deterministic).

    With ``refusal_threshold``, conversations whose refusal score (``scores``, computed here
    when not given) is above it get the refusal; the rest are answered with it banned."""
    import torch

    _prepare(tokenizer)
    decide = refusal_threshold is not None
    if decide and scores is None:
        scores = refusal_scores(model, tokenizer, conversations, batch_size)
    answers: list[str | None] = [REFUSAL if decide and s > refusal_threshold else None
                                 for s in (scores or [None] * len(conversations))]
    todo = [i for i, a in enumerate(answers) if a is None]
    extra = {"bad_words_ids": refusal_word_ids(tokenizer)} if decide else {}
    for start in tqdm(range(0, len(todo), batch_size), desc=desc, unit="batch"):
        chunk = todo[start:start + batch_size]
        texts = [prompt_text(tokenizer, conversations[i]) for i in chunk]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id, **extra)
        new_tokens = output[:, batch["input_ids"].shape[1]:]
        for i, text in zip(chunk, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            answers[i] = text.strip()
    return answers


class _RowStreamer:
    """A transformers streamer for a batched ``generate``: hands each row's growing text to
    ``emit(row, text)`` and ``emit(row, None)`` once the row has ended (end of turn, its own
    token cap, or its caller gone). Finished rows keep receiving padding; it is ignored."""

    def __init__(self, tokenizer, caps: list[int], abandoned: list, emit):
        self.tokenizer, self.caps, self.abandoned, self.emit = tokenizer, caps, abandoned, emit
        self.ids: list[list[int]] = [[] for _ in caps]
        self.done = [False] * len(caps)
        self.stop_ids = set(_as_list(tokenizer.eos_token_id))
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call hands over the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            if token in self.stop_ids or self.abandoned[row].is_set():
                self._finish(row)
                continue
            self.ids[row].append(token)
            text = self.tokenizer.decode(self.ids[row], skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                self.emit(row, text)
            if len(self.ids[row]) >= self.caps[row]:
                self._finish(row)

    def end(self) -> None:
        for row in range(len(self.caps)):
            if not self.done[row]:
                self._finish(row)

    def _finish(self, row: int) -> None:
        self.done[row] = True
        self.emit(row, None)


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def stream_batch(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int | list[int] = 160,
                 temperature: float = 0.0, top_p: float = 0.9, repetition_penalty: float = 1.0,
                 refusal_threshold: float | None = None, deadline_seconds: float | list[float] = 120.0,
                 abandoned: list | None = None, min_new_tokens: int = 0):
    """Decode several conversations together, one batched decode step for all, and yield
    ``(row, text)`` as each row's reply grows, then ``(row, None)`` when that row has ended.

    With ``refusal_threshold``, decide first: rows whose refusal score is above it get the
    refusal, with nothing generated; the rest answer with the refusal's words banned. Each row
    has its own token cap and deadline, and ends at the next step once its ``abandoned`` event
    is set (a caller that stopped reading). ``min_new_tokens`` holds off the end of turn (the
    bench times fixed lengths). Generation runs in a thread; closing this generator
    abandons every row and waits for that thread."""
    import queue
    import threading
    import time

    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    count = len(conversations)
    caps = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * count
    now = time.monotonic()
    deadlines = [now + d for d in (deadline_seconds if isinstance(deadline_seconds, list)
                                   else [deadline_seconds] * count)]
    abandoned = abandoned or [threading.Event() for _ in range(count)]
    rows = list(range(count))
    extra = {}
    if refusal_threshold is not None:
        scores = refusal_scores(model, tokenizer, conversations, batch_size=max(1, count), desc=None)
        for row in [r for r in rows if scores[r] > refusal_threshold]:
            yield row, REFUSAL
            yield row, None
        rows = [r for r in rows if scores[r] <= refusal_threshold]
        extra["bad_words_ids"] = refusal_word_ids(tokenizer)
    if not rows:
        return
    _prepare(tokenizer)
    texts = [prompt_text(tokenizer, conversations[r]) for r in rows]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    updates: queue.Queue = queue.Queue()
    streamer = _RowStreamer(tokenizer, [caps[r] for r in rows], [abandoned[r] for r in rows],
                            lambda i, text: updates.put((rows[i], text)))

    class StopRows(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            clock = time.monotonic()
            return torch.tensor([streamer.done[i] or abandoned[r].is_set() or clock > deadlines[r]
                                 for i, r in enumerate(rows)], device=input_ids.device)

    kwargs = dict(**batch, streamer=streamer, max_new_tokens=max(streamer.caps), do_sample=temperature > 0,
                  repetition_penalty=repetition_penalty, pad_token_id=tokenizer.pad_token_id,
                  stopping_criteria=StoppingCriteriaList([StopRows()]), min_new_tokens=min_new_tokens, **extra)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    finished = object()

    def work():
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as err:  # surfaced to the caller below
            updates.put((None, err))
        finally:
            streamer.end()
            updates.put((None, finished))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            row, item = updates.get()
            if row is not None:
                yield row, item
            elif item is finished:
                break
            else:
                raise RuntimeError(f"generation failed: {item}") from item
    finally:
        for event in abandoned:
            event.set()
        thread.join()


def stream_text(model, tokenizer, messages: list[dict], max_new_tokens: int = 160, temperature: float = 0.0,
                top_p: float = 0.9, repetition_penalty: float = 1.0, refusal_threshold: float | None = None,
                deadline_seconds: float = 120.0):
    """Yield the growing reply to one conversation, as the model writes it (``stream_batch``
    with one row). Closing this generator stops generation at the next decode step."""
    for _, text in stream_batch(model, tokenizer, [messages], max_new_tokens, temperature, top_p,
                                repetition_penalty, refusal_threshold, deadline_seconds):
        if text is None:
            return
        yield text
