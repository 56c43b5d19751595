"""Eval metrics on hand-made cases, edge cases included."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.data.normalize import contains_fact, normalize
from pipeline.evaluation.metrics import (aggregate, bleu, citation_precision, key_facts_hit,
                                         repetition_rate, rouge_l, score_answer, token_f1)
from pipeline.prompt import REFUSAL


def _p(text):
    return SimpleNamespace(text=text, title="t", headers="t")


def _record(answer, facts):
    return SimpleNamespace(answer=answer, facts=facts, answerable=answer is not None)


def test_normalisation_makes_facts_robust():
    assert normalize("The Adam  Optimizer, (2014)!") == "the adam optimizer 2014"
    assert contains_fact("about 2,410 parameters", ["2410"])
    assert contains_fact("ratio p−y here", ["p-y"])
    assert not contains_fact("nothing", ["x", "y"])


def test_key_facts_need_every_fact_and_allow_alternatives():
    facts = [["Kingma", "Diederik"], ["2014"]]
    assert key_facts_hit("Diederik Kingma and Ba, 2014 [1].", facts)
    assert key_facts_hit("diederik in 2014", facts)
    assert not key_facts_hit("Kingma proposed it.", facts)
    assert not key_facts_hit("", facts)
    assert not key_facts_hit("anything", [])


def test_facts_match_on_word_boundaries():
    assert not contains_fact("It is not clear.", ["no"])  # "no" inside "not"
    assert contains_fact("No, never.", ["no"])
    assert not contains_fact("about 180 steps", ["18"]) and contains_fact("about 18 steps", ["18"])
    assert not contains_fact("published in 2014", ["4"])
    assert not contains_fact("the batch size", ["Ba"]) and contains_fact("Jimmy Ba and", ["Ba"])
    assert not contains_fact("p = 0.55", ["0.5"]) and contains_fact("p = 0.5.", ["0.5"])
    assert contains_fact("a regularising effect", ["regularis"])  # long alphabetic facts are stems
    assert not contains_fact("deregularised", ["regularis"])  # ... that still start a word


# Answers that game a substring metric. Each must score 0 on the facts it would once have hit.
GAMING = {
    "bare citation": ("See [1].", [["1"]]),
    "'no' inside 'not'": ("Not really, it depends on the data [1].", [["no"]]),
    "short fact inside a year": ("It appeared in 2014 [1].", [["4"]]),
    "short fact inside a word": ("The batch matters [1].", [["Ba"]]),
    "number inside a longer number": ("About 180 [2].", [["18"]]),
}


@pytest.mark.parametrize("case", sorted(GAMING))
def test_gaming_answers_score_zero(case):
    answer, facts = GAMING[case]
    assert not key_facts_hit(answer, facts), case


def test_keyword_stuffing_and_pasted_passages_get_no_credit():
    from pipeline.evaluation.metrics import MAX_ANSWER_WORDS

    facts = [["Kingma"], ["2014"]]
    stuffed = " ".join(["Kingma 2014 Adam dropout PPO DPO LoRA BM25 faiss 0.9 0.5 1 2 3 4 5"] * 5)
    assert len(stuffed.split()) > MAX_ANSWER_WORDS and not key_facts_hit(stuffed, facts)
    passage = ("Adam was proposed by Diederik Kingma and Jimmy Ba in 2014. " + "It adapts step sizes. " * 30)
    assert not key_facts_hit(passage + " [1]", facts)
    assert key_facts_hit("Adam was proposed by Diederik Kingma and Jimmy Ba in 2014 [1].", facts)
    # the cap counts words, not citation markers
    exact = " ".join(["word"] * (MAX_ANSWER_WORDS - 2) + ["Kingma", "2014"]) + " [1] [2] [3]"
    assert key_facts_hit(exact, facts)


def test_citation_precision():
    passages = [_p("Adam uses beta1 = 0.9."), _p("Dropout zeroes units.")]
    facts = [["0.9"]]
    assert citation_precision("It is 0.9 [1].", passages, facts) == 1.0
    assert citation_precision("It is 0.9 [2].", passages, facts) == 0.0
    assert citation_precision("0.9 [1][2]", passages, facts) == 0.5
    assert citation_precision("0.9 [7]", passages, facts) == 0.0
    assert citation_precision("It is 0.9.", passages, facts) is None
    assert citation_precision("", passages, facts) is None


def test_overlap_metrics():
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("cat", "the cat sat") == pytest.approx(2 * 1 * (1 / 3) / (1 + 1 / 3))
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0 and token_f1("dog", "cat") == 0.0
    assert rouge_l("a b c d", "a c d") == pytest.approx(2 * 0.75 * 1.0 / 1.75)
    assert rouge_l("", "a") == 0.0
    assert bleu("the cat is on the mat", "the cat is on the mat") == pytest.approx(1.0)
    assert bleu("the the the the", "the cat is on the mat") < 0.3
    assert bleu("", "x") == 0.0 and bleu("dog", "cat") == 0.0
    half = bleu("the cat", "the cat sat on the mat")
    assert half < bleu("the cat sat on the mat", "the cat sat on the mat")


def test_repetition_rate():
    assert repetition_rate("a b c d e") == 0.0
    assert repetition_rate("a b c a b c a b c") == pytest.approx(1 - 3 / 7)
    assert repetition_rate("") == 0.0 and repetition_rate("a b") == 0.0


def test_score_answer_and_aggregate_cover_unanswerable_and_empty():
    passages = [_p("Adam uses beta1 = 0.9.")]
    good = score_answer("beta1 is 0.9 [1].", _record("beta1 is 0.9.", [["0.9"]]), passages)
    refused = score_answer(REFUSAL, _record("beta1 is 0.9.", [["0.9"]]), passages)
    empty = score_answer("", _record("beta1 is 0.9.", [["0.9"]]), passages)
    abstained = score_answer(REFUSAL, _record(None, []), passages)
    invented = score_answer("It is 42 [1].", _record(None, []), passages)
    assert good["fact_hit"] and good["citation_precision"] == 1.0 and not good["refused"]
    assert refused["refused"] and not refused["fact_hit"]
    assert not empty["fact_hit"] and empty["f1"] == 0.0 and empty["citation_precision"] is None
    assert abstained["abstained"] and not invented["abstained"]
    summary = aggregate([good, refused, empty, abstained, invented])
    assert summary["key_fact_accuracy"] == pytest.approx(1 / 3, abs=1e-3)
    assert summary["false_refusal_rate"] == pytest.approx(1 / 3, abs=1e-3)
    assert summary["abstention_accuracy"] == 0.5
    assert summary["citation_precision"] == 1.0 and summary["cited_share"] == pytest.approx(1 / 3, abs=1e-3)
    only_unanswerable = aggregate([abstained])
    assert only_unanswerable["key_fact_accuracy"] is None and only_unanswerable["abstention_accuracy"] == 1.0


def test_extractive_baseline_copies_the_best_matching_sentence():
    from types import SimpleNamespace

    from pipeline.evaluation.baselines import extractive_answer

    passage = SimpleNamespace(text="Dropout was proposed in 2014. The paper used p = 0.5 for hidden units. "
                                   "It is simple.")
    other = SimpleNamespace(text="Which rate did the paper use for hidden units? Not this one.")
    answer = extractive_answer("Which dropout rate did the paper use for hidden units?", [passage, other])
    assert answer == "The paper used p = 0.5 for hidden units. [1]"
    assert extractive_answer("anything?", []) == "" and extractive_answer("x", [SimpleNamespace(text=" ")]) == ""
