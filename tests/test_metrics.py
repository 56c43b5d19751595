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
