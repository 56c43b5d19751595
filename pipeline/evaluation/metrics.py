"""Answer metrics as pure functions. Every one is tested on hand-made cases."""
from __future__ import annotations

import math
from collections import Counter

from pipeline.data.normalize import contains_fact, normalize
from pipeline.prompt import cited_numbers, is_refusal


def tokens(text: str) -> list[str]:
    return normalize(text).split()


def key_facts_hit(answer: str, facts: list[list[str]]) -> bool:
    """All facts present (any alternative spelling, after normalisation). No facts: False."""
    return bool(facts) and all(contains_fact(answer, fact) for fact in facts)


def citation_precision(answer: str, passages: list, facts: list[list[str]]) -> float | None:
    """Share of cited passage numbers whose passage holds a fact; None when nothing is cited.

    A number outside 1..len(passages) counts as a wrong citation.
    """
    cited = cited_numbers(answer)
    if not cited:
        return None
    good = sum(1 for n in cited if 1 <= n <= len(passages)
               and any(contains_fact(passages[n - 1].text, fact) for fact in facts))
    return good / len(cited)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style bag-of-tokens F1. Both empty: 1.0; one empty: 0.0."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (Lin 2004) from the longest common subsequence of tokens."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def bleu(prediction: str, reference: str, max_n: int = 4) -> float:
    """Sentence BLEU (Papineni et al. 2002): clipped n-gram precisions, geometric mean,
    brevity penalty; add-one smoothing for n > 1 so a short answer is not zeroed outright."""
    pred, ref = tokens(prediction), tokens(reference)
    if not pred or not ref:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        pred_ngrams = Counter(tuple(pred[i:i + n]) for i in range(len(pred) - n + 1))
        ref_ngrams = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        matches = sum((pred_ngrams & ref_ngrams).values())
        total = max(1, sum(pred_ngrams.values()))
        if n == 1 and matches == 0:
            return 0.0
        smooth = 0 if n == 1 else 1
        log_precision += math.log((matches + smooth) / (total + smooth)) / max_n
    brevity = 1.0 if len(pred) > len(ref) else math.exp(1 - len(ref) / len(pred))
    return brevity * math.exp(log_precision)


def repetition_rate(answer: str, n: int = 3) -> float:
    """Share of repeated token n-grams: 0 for none repeated; 0 for answers shorter than n."""
    words = tokens(answer)
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if not grams else 1 - len(set(grams)) / len(grams)


def score_answer(answer: str, record, passages: list) -> dict:
    """Every per-answer metric for one QA record (answerable or not)."""
    refused = is_refusal(answer)
    row = {"refused": refused, "words": len(answer.split()), "repetition": repetition_rate(answer)}
    if record.answerable:
        row.update(answerable=True, fact_hit=key_facts_hit(answer, record.facts) and not refused,
                   citation_precision=citation_precision(answer, passages, record.facts),
                   f1=token_f1(answer, record.answer), rouge_l=rouge_l(answer, record.answer),
                   bleu=bleu(answer, record.answer))
    else:
        row.update(answerable=False, abstained=refused)
    return row


def aggregate(rows: list[dict]) -> dict:
    """Means over the rows that each metric applies to (None when none apply)."""
    def mean(values):
        values = [float(v) for v in values if v is not None]
        return round(sum(values) / len(values), 4) if values else None

    answerable = [r for r in rows if r["answerable"]]
    unanswerable = [r for r in rows if not r["answerable"]]
    return {
        "questions": len(rows), "answerable": len(answerable), "unanswerable": len(unanswerable),
        "key_fact_accuracy": mean(r["fact_hit"] for r in answerable),
        "abstention_accuracy": mean(r["abstained"] for r in unanswerable),
        "false_refusal_rate": mean(r["refused"] for r in answerable),
        "citation_precision": mean(r["citation_precision"] for r in answerable),
        "cited_share": mean(r["citation_precision"] is not None for r in answerable),
        "token_f1": mean(r["f1"] for r in answerable), "rouge_l": mean(r["rouge_l"] for r in answerable),
        "bleu": mean(r["bleu"] for r in answerable), "mean_words": mean(r["words"] for r in rows),
        "repetition_rate": mean(r["repetition"] for r in rows),
    }
