"""Best-of-n: the reward model chooses among copy decoding's n best candidates.

An inference-time alignment variant (no weights change): copy decoding's selector
(pipeline/copying.py) decides whether to answer and ranks the shown sentences; when it
answers, the `reward` stage's model scores the selector's n highest-ranked sentences as the
assistant's reply to the served prompt, and the best-scored one is the reply. n = 1 is copy
decoding itself. The eval stage judges it by key facts, never by the reward model that chose it.
"""
from __future__ import annotations

import numpy as np

from pipeline.copying import in_context
from pipeline.prompt import REFUSAL


def reward_ranked(selector, scorer, tokenizer, messages: list[dict], cands, most: int) -> list[tuple[int, float]]:
    """(candidate index, reward) of the selector's ``most`` best candidates, in the selector's
    order; empty when the selector refuses."""
    from pipeline.scoring import reward_scores

    if selector.refuses(cands):
        return []
    order = selector.ranked(cands)[:most]
    conversations = [messages + [{"role": "assistant", "content": in_context(cands.replies, i)}] for i in order]
    return list(zip(order, reward_scores(scorer, tokenizer, conversations, batch_size=len(order))))


def best_of(scored: list[tuple[int, float]], replies: list[str], n: int) -> str:
    """The reply (in context, ``copying.in_context``) with the highest reward among the first
    ``n`` of ``scored`` (the refusal when ``scored`` is empty); a tie goes to the selector's
    earlier choice."""
    if not scored:
        return REFUSAL
    head = scored[:n]
    return in_context(replies, head[int(np.argmax([reward for _, reward in head]))][0])


def best_of_n_answers(selector, scorer, score_tokenizer, prompts: list[list[dict]], cands: list,
                      ns: list[int], desc: str | None = "best-of-n") -> dict[int, list[str]]:
    """The replies for every n in ``ns``, one reward pass per prompt over its max(ns) best
    candidates; ``cands`` are the prompts' featurised candidates (what copy decoding chose from)."""
    from tqdm.auto import tqdm

    scored = [reward_ranked(selector, scorer, score_tokenizer, p, c, max(ns))
              for p, c in tqdm(list(zip(prompts, cands)), desc=f"{desc}: rewards", unit="prompt", disable=desc is None)]
    return {n: [best_of(s, c.replies, n) for s, c in zip(scored, cands)] for n in ns}
