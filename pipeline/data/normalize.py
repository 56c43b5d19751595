"""Text normalisation shared by the data checks and the eval metrics."""
from __future__ import annotations

import re
import unicodedata

_DASHES = str.maketrans({"−": "-", "–": "-", "—": "-", "‐": "-", "×": "x", "’": "'", "‘": "'"})
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_PUNCT = re.compile(r"[\"'`.,;:!?()\[\]{}]")


def normalize(text: str) -> str:
    """Lowercase, NFKC, unify dashes, drop thousands separators and punctuation, squash spaces."""
    text = unicodedata.normalize("NFKC", text).translate(_DASHES).lower()
    text = _THOUSANDS.sub("", text)
    text = _PUNCT.sub(" ", text)
    return " ".join(text.split())


def contains_fact(text: str, alternatives: list[str]) -> bool:
    """True when ``text`` holds any one of a fact's alternative spellings."""
    haystack = f" {normalize(text)} "
    return any(normalize(alt) and normalize(alt) in haystack for alt in alternatives)
