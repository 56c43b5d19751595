"""A non-neural reference point for the eval table: copy one sentence from the top passage.

The sentence of passage [1] that shares the most words with the question (lightly penalised
for length) is returned with a ``[1]`` citation. It never abstains. If it scores well on
key-fact accuracy, retrieval has put the facts in front of the model and what is missing is
the generator's ability to find and copy them.
"""
from __future__ import annotations

import re

from pipeline.evaluation.metrics import tokens

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def extractive_answer(question: str, passages: list) -> str:
    if not passages:
        return ""
    wanted = set(tokens(question))
    sentences = [s for s in _SENTENCE_END.split(passages[0].text) if s.strip()]
    if not sentences:
        return ""

    def overlap(sentence: str) -> float:
        words = tokens(sentence)
        return len(wanted & set(words)) / (1 + 0.02 * len(words))

    best = max(sentences, key=overlap)  # first of the best: max keeps the earliest on ties
    return f"{best.strip()} [1]"
