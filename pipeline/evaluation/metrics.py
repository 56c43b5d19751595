"""Answer metrics as pure functions. Every one is tested on hand-made cases."""
from __future__ import annotations

import statistics
from collections import Counter
from functools import lru_cache

from pipeline.data.normalize import contains_fact, normalize
from pipeline.prompt import cited_numbers, is_refusal, strip_citations


# An answer longer than this gets no key-fact credit: pasting whole passages, or a list of
# likely facts, must not score (the extractive baseline's sentences average ~24 words).
MAX_ANSWER_WORDS = 60


def tokens(text: str) -> list[str]:
    return normalize(text).split()


def answer_words(answer: str) -> int:
    """Words in an answer, citation markers like [1] not counted."""
    return len(strip_citations(answer).split())


def key_facts_hit(answer: str, facts: list[list[str]], max_words: int = MAX_ANSWER_WORDS) -> bool:
    """All facts present on word boundaries (any alternative spelling), citations ignored, and
    the answer at most ``max_words`` long. No facts: False."""
    body = strip_citations(answer)
    if not facts or len(body.split()) > max_words:
        return False
    return all(contains_fact(body, fact) for fact in facts)


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
    """SQuAD-style bag-of-tokens F1 (citations ignored). Both empty: 1.0; one empty: 0.0."""
    pred, ref = tokens(strip_citations(prediction)), tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (Lin 2004), Google's rouge-score package, on normalised tokens."""
    pred, ref = " ".join(tokens(strip_citations(prediction))), " ".join(tokens(reference))
    if not pred or not ref:
        return float(pred == ref)
    return _rouge_scorer().score(ref, pred)["rougeL"].fmeasure


def bleu(prediction: str, reference: str) -> float:
    """Sentence BLEU in [0, 1] from sacreBLEU (13a tokenizer, exponential smoothing, 4-grams)
    on normalised text; signature: nrefs:1|case:lc|eff:no|tok:13a|smooth:exp."""
    from sacrebleu.metrics import BLEU

    pred, ref = " ".join(tokens(strip_citations(prediction))), " ".join(tokens(reference))
    if not pred or not ref:
        return 0.0
    return BLEU(effective_order=False, smooth_method="exp").sentence_score(pred, [ref]).score / 100


def repetition_rate(answer: str, n: int = 3) -> float:
    """Share of repeated token n-grams: 0 for none repeated; 0 for answers shorter than n."""
    words = tokens(answer)
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if not grams else 1 - len(set(grams)) / len(grams)


def score_answer(answer: str, record, passages: list) -> dict:
    """Every per-answer metric for one QA record (answerable or not)."""
    refused = is_refusal(answer)
    row = {"refused": refused, "words": answer_words(answer), "repetition": repetition_rate(answer)}
    if record.answerable:
        row.update(answerable=True, fact_hit=key_facts_hit(answer, record.facts) and not refused,
                   citation_precision=citation_precision(answer, passages, record.facts),
                   f1=token_f1(answer, record.answer), rouge_l=rouge_l(answer, record.answer),
                   bleu=bleu(answer, record.answer))
    else:
        row.update(answerable=False, abstained=refused)
    return row


def correct(row: dict) -> bool:
    """Right on this question: the facts when it is answerable, a refusal when it is not."""
    return bool(row["fact_hit"]) if row["answerable"] else bool(row["abstained"])


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
        "median_words": float(statistics.median(r["words"] for r in rows)) if rows else None,
        "answer_accuracy": mean(correct(r) for r in rows),
        "repetition_rate": mean(r["repetition"] for r in rows),
    }
