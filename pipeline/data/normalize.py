"""Text normalisation and fact matching, shared by the data checks and the eval metrics."""
from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

_DASHES = str.maketrans({"−": "-", "–": "-", "—": "-", "‐": "-", "×": "x", "’": "'", "‘": "'"})
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_PUNCT = re.compile(r"[\"'`.,;:!?()\[\]{}]")
# A fact this short, or ending in a digit, must be a whole word: "no" never matches inside
# "not", "18" never inside "180". Longer alphabetic facts may be stems ("regularis" matches
# "regularising"), which is how the QA files spell inflected facts.
_WHOLE_WORD_MAX_CHARS = 3


def normalize(text: str) -> str:
    """Lowercase, NFKC, unify dashes, drop thousands separators and punctuation, squash spaces."""
    text = unicodedata.normalize("NFKC", text).translate(_DASHES).lower()
    text = _THOUSANDS.sub("", text)
    text = _PUNCT.sub(" ", text)
    return " ".join(text.split())


@lru_cache(maxsize=8192)
def fact_pattern(alternative: str) -> re.Pattern | None:
    """The regex one spelling of a fact matches with: it starts at a word boundary, and ends at
    one too when it is short or ends in a digit. None for a spelling that normalises to ''."""
    needle = normalize(alternative)
    if not needle:
        return None
    whole_word = len(needle) <= _WHOLE_WORD_MAX_CHARS or not needle[-1].isalpha()
    end = r"(?![^\W_])" if whole_word else ""
    return re.compile(r"(?<![^\W_])" + re.escape(needle) + end)


def contains_fact(text: str, alternatives: list[str]) -> bool:
    """True when ``text`` holds any one of a fact's alternative spellings, on word boundaries."""
    haystack = normalize(text)
    return any(p is not None and p.search(haystack) for p in map(fact_pattern, alternatives))
