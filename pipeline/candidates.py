"""What copy decoding may reply to a prompt, and whether a reply is right.

A candidate is one sentence the prompt shows, cited to its passage: ``"<sentence> [n]."``.
The reader (pipeline/reader.py) learns from these labels and the copy selector
(pipeline/copying.py) chooses among these candidates.
"""
from __future__ import annotations

import re
from typing import NamedTuple

from pipeline.data.normalize import contains_fact
from pipeline.prompt import cite, content_stems, is_refusal, split_sentences, strip_citations

_HEADING = re.compile(r"^\[(\d{1,2})\] \((.*)\)$")


class Shown(NamedTuple):
    question: str
    replies: list[str]  # "<sentence> [n]." in prompt order
    headings: list[str]  # each reply's passage heading (document title > section)


def candidates(messages: list[dict]) -> Shown:
    """The question and the replies of a prompt built by pipeline.prompt.build_messages: each
    shown sentence cited to its passage, in prompt order, with its passage's heading. No
    passages: no replies."""
    text = messages[-1]["content"]
    if not text.startswith("Passages:\n") or "\n\nQuestion: " not in text:
        return Shown(text.strip(), [], [])
    shown, question = text.rsplit("\n\nQuestion: ", 1)
    lines = shown.split("\n")
    replies, headings = [], []
    for line, body in zip(lines, lines[1:]):
        match = _HEADING.match(line)
        if match:
            sentences = split_sentences(body)
            replies += [cite(s, int(match.group(1))) for s in sentences]
            headings += [match.group(2)] * len(sentences)
    return Shown(question.strip(), replies, headings)


def word_overlap(question: str, sentence: str) -> float:
    wanted = content_stems(question)
    return len(wanted & content_stems(sentence)) / len(wanted) if wanted else 0.0


def right(reply: str, facts: list[list[str]] | None) -> bool:
    """Refusing a silent prompt (``facts`` None), or copying a sentence that holds every fact."""
    if facts is None:
        return is_refusal(reply)
    return not is_refusal(reply) and all(contains_fact(strip_citations(reply), f) for f in facts)
