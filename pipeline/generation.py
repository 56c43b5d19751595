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
                   desc: str = "refusal scores") -> list[float]:
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


def stream_text(model, tokenizer, messages: list[dict], max_new_tokens: int = 160, temperature: float = 0.0,
                top_p: float = 0.9, repetition_penalty: float = 1.0, refusal_threshold: float | None = None,
                deadline_seconds: float = 120.0):
    """Yield the growing reply to one conversation, as the model writes it.

    With ``refusal_threshold``, decide first: above it the one reply is the refusal, with
    nothing generated; below it the model answers with the refusal's words banned. Generation
    runs in a thread; closing this generator (a caller that stopped reading) stops it at the
    next decode step, and it stops by itself after ``deadline_seconds``."""
    import threading
    import time

    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    extra = {}
    if refusal_threshold is not None:
        if refusal_scores(model, tokenizer, [messages])[0] > refusal_threshold:
            yield REFUSAL
            return
        extra["bad_words_ids"] = refusal_word_ids(tokenizer)
    batch = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(**batch, streamer=streamer, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                  repetition_penalty=repetition_penalty, pad_token_id=pad, **extra)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_p=top_p)
    stop, failure = threading.Event(), []
    deadline = time.monotonic() + deadline_seconds

    class StopWhenAbandoned(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return stop.is_set() or time.monotonic() > deadline

    kwargs["stopping_criteria"] = StoppingCriteriaList([StopWhenAbandoned()])

    def work():
        try:
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as err:  # surfaced to the caller below
            failure.append(err)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    text = ""
    try:
        for piece in streamer:
            text += piece
            yield text
    finally:
        stop.set()
        thread.join()
    if failure:
        raise RuntimeError(f"generation failed: {failure[0]}") from failure[0]
