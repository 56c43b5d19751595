"""The evaluation loop on a tiny model (rows, the answer-or-refuse decision) and the report's
numbers worked out by hand from hand-written answers."""
from __future__ import annotations

import json

import pytest

from pipeline.artifacts import Artifacts
from pipeline.data.records import QARecord
from pipeline.evaluation.loop import EvalSettings, Run, evaluate, score_rows
from pipeline.evaluation.report import write_report
from pipeline.evaluation.stats import sign_test
from pipeline.prompt import REFUSAL
from pipeline.retrieval.retriever import Retriever

RECORDS = [
    QARecord("a", "Who proposed Adam?", "Diederik Kingma and Jimmy Ba.", "adam.md", [["Kingma"]]),
    QARecord("b", "What dropout rate did the paper use?", "p = 0.5.", "dropout.md", [["0.5"]]),
    QARecord("c", "What is the capital of Mars?", None, None, []),
]


@pytest.mark.slow
def test_evaluate_scores_every_row_and_applies_the_refusal_threshold(served_artifacts, tmp_path):
    artifacts = Artifacts(served_artifacts)
    retriever = Retriever(artifacts.require("index"))
    sft_meta = artifacts.dir("sft") / "meta.json"
    saved = sft_meta.read_text()
    meta = json.loads(saved)
    meta["metrics"]["refusal_threshold"] = -1e9  # every refusal score is above it: sft refuses all
    sft_meta.write_text(json.dumps(meta))
    try:
        settings = EvalSettings(max_new_tokens=6, batch_size=3, numeric_paths=["int8-decode"],
                                numeric_path_variants=["sft"])
        runs = evaluate(artifacts, RECORDS, retriever, settings, ["Adam uses beta1 = 0.9."])
    finally:
        sft_meta.write_text(saved)
    assert [run.name for run in runs] == ["extractive / sentence / rag", "base / template / rag",
                                          "sft / template / rag", "sft / template / rag / int8-decode"]
    extractive, base, sft, _ = runs
    assert extractive.answers[0] == "Adam was proposed by Diederik Kingma and Jimmy Ba in 2014. [1]"
    assert extractive.rows[0]["fact_hit"] and extractive.rows[2]["abstained"] is False  # never abstains
    assert sft.answers == [REFUSAL] * 3 and sft.rows[2]["abstained"] and sft.rows[0]["refused"]
    assert REFUSAL not in base.answers  # base has no threshold: it just generates
    assert "perplexity" in sft.extra


@pytest.mark.slow
def test_copy_decoding_rows_copy_a_shown_sentence_and_compare_with_free_decoding(served_artifacts, tmp_path):
    from pipeline.copying import SETTINGS_FILE, Linear, Selector
    from pipeline.evaluation.report import comparisons

    artifacts = Artifacts(served_artifacts)
    retriever = Retriever(artifacts.require("index"))
    overlap_only = Selector(("word_overlap",), Linear([0], [1], [1], 0.0), Linear([0] * 2, [1] * 2, [0, 0], 0.0), 1.0,
                            ("word_overlap", "embedding_similarity"))
    path = artifacts.dir("sft") / SETTINGS_FILE
    path.write_text(json.dumps({"selector": overlap_only.to_dict()}))
    try:
        runs = evaluate(artifacts, RECORDS, retriever, EvalSettings(max_new_tokens=6, batch_size=3,
                        extractive_baseline=False, variants=["sft"],
                        free_decoding_variants=["sft"], numeric_paths=["fp32-lookup"],
                        numeric_path_variants=["sft"]), [])
    finally:
        path.unlink()
    assert [run.name for run in runs] == ["sft / template / rag", "sft / copy / rag",
                                          "sft / template / rag / fp32-lookup"]
    free, copied, guessed = runs
    assert guessed.answers == free.answers and any(a != REFUSAL for a in free.answers), \
        "prompt lookup answers exactly as fp32 decoding"
    assert copied.answers[0] == "Adam was proposed by Diederik Kingma and Jimmy Ba in 2014 [1]."
    assert copied.rows[0]["fact_hit"] and copied.rows[1]["fact_hit"]
    assert [(c["variant"], c["against"]) for c in comparisons(runs)] == [("sft copy", "sft")]


def _run(variant: str, answers: list[str], records, passages) -> Run:
    run = Run(variant, "template" if variant != "extractive" else "sentence", True)
    run.answers = answers
    score_rows(run, records, passages)
    return run


def test_report_numbers_by_hand(tmp_path):
    from types import SimpleNamespace

    records = [QARecord(f"q{i}", f"question {i}?", f"fact{i}.", "d.md", [[f"fact{i}"]]) for i in range(10)]
    records += [QARecord("u", "unanswerable?", None, None, [])]
    passages = [[SimpleNamespace(text=f"fact{i} is here.", title="t", headers="t")] for i in range(11)]
    hit = [f"It is fact{i} [1]." for i in range(10)]
    runs = [
        _run("base", ["No idea."] * 10 + ["Something."], records, passages),
        _run("sft", hit[:8] + ["wrong [1]."] * 2 + [REFUSAL], records, passages),
        _run("dpo", hit[:9] + [REFUSAL, REFUSAL], records, passages),
    ]
    report = write_report(runs, records, [tmp_path], "# header", examples=2)
    summary = {s["variant"]: s for s in report["runs"]}
    assert summary["sft"]["key_fact_accuracy"] == 0.8 and summary["dpo"]["key_fact_accuracy"] == 0.9
    assert summary["dpo"]["false_refusal_rate"] == 0.1 and summary["dpo"]["abstention_accuracy"] == 1.0
    assert summary["sft"]["answer_accuracy"] == round(9 / 11, 4) and summary["base"]["answer_accuracy"] == 0.0
    pairs = {(c["variant"], c["against"]): c for c in report["comparisons"]}
    sft_vs_base = pairs[("sft", "base")]
    assert sft_vs_base["key_fact"]["difference"] == 0.8 and sft_vs_base["questions_gained"] == 8
    assert sft_vs_base["key_fact"]["low"] > 0, "8 of 10 gained, none lost: the interval excludes 0"
    dpo_vs_sft = pairs[("dpo", "sft")]
    assert (dpo_vs_sft["questions_gained"], dpo_vs_sft["questions_lost"]) == (1, 0)
    assert dpo_vs_sft["key_fact"]["low"] <= 0 <= dpo_vs_sft["key_fact"]["high"], "one question proves nothing"
    assert ("base", "base") not in pairs
    markdown = (tmp_path / "eval.md").read_text()
    assert "| sft | base | +80.0 [" in markdown


def test_sign_test_by_hand():
    assert sign_test(4, 0) == 0.125  # 2 * (1/2)**4
    assert sign_test(0, 4) == 0.125
    assert sign_test(3, 3) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(5, 1) == pytest.approx(round(2 * (1 + 6) / 64, 3))  # P(X <= 1) of Binomial(6, 1/2), twice


def test_operating_curve_and_the_served_point():
    from pipeline.answerability import best_threshold, most_correct, operating_curve

    scores = [-3.0, -2.0, -1.0, -0.5, -0.4, -0.2]  # refusal log-probabilities on six dev prompts
    silent = [False, False, False, True, False, True]
    curve = operating_curve(scores, silent)
    assert curve[0] == {"threshold": -4.0, "abstention": 1.0, "false_refusal": 1.0}  # refuse all
    assert curve[-1]["abstention"] == 0.0 and curve[-1]["false_refusal"] == 0.0  # answer all
    at = {p["threshold"]: p for p in curve}
    assert at[-0.75] == {"threshold": -0.75, "abstention": 1.0, "false_refusal": 0.25}
    assert best_threshold(curve)["threshold"] == -0.75  # balanced accuracy (1 + 0.75) / 2
    # most right decisions with 4 answerable, 2 silent: -0.75 gets 3 + 2 = 5, -0.3 gets 4 + 1 = 5,
    # the earliest of equals wins
    assert most_correct(curve, 4, 2)["threshold"] == -0.75
    assert most_correct(curve, 40, 2)["threshold"] == -0.3  # many answerable: refuse less
