"""The evaluation loop on a tiny model: every configured row, the int8 rows and their cost,
the extractive baseline, and the written report."""
from __future__ import annotations

import json

from pipeline.artifacts import Artifacts
from pipeline.data.records import QARecord
from pipeline.evaluation.loop import EvalSettings, evaluate
from pipeline.evaluation.report import sign_test, write_report
from pipeline.retrieval.retriever import Retriever

RECORDS = [
    QARecord("a", "Who proposed Adam?", "Diederik Kingma and Jimmy Ba.", "adam.md", [["Kingma"]]),
    QARecord("b", "What dropout rate did the paper use?", "p = 0.5.", "dropout.md", [["0.5"]]),
    QARecord("c", "What is the capital of Mars?", None, None, []),
]


def test_evaluate_scores_every_row_and_the_int8_cost(served_artifacts, tmp_path):
    artifacts = Artifacts(served_artifacts)
    retriever = Retriever(artifacts.require("index"))
    settings = EvalSettings(max_new_tokens=6, batch_size=3, numeric_path_variants=["sft"])
    runs = evaluate(artifacts, RECORDS, retriever, settings, ["Adam uses beta1 = 0.9."])
    names = [run.name for run in runs]
    assert names == ["extractive / sentence / rag", "base / template / rag", "base / template / no-rag",
                     "base / plain / rag", "sft / template / rag", "sft / template / no-rag",
                     "sft / template / rag / bf16", "sft / template / rag / int8",
                     "sft / template / rag / int8-decode"]
    extractive = runs[0]
    assert extractive.answers[0] == "Adam was proposed by Diederik Kingma and Jimmy Ba in 2014. [1]"
    assert extractive.rows[0]["fact_hit"] and extractive.rows[2]["abstained"] is False  # never abstains
    assert all(len(run.answers) == len(RECORDS) for run in runs)
    assert "kl_to_sft" in runs[4].extra and "perplexity" in runs[4].extra  # fp32 template rows only
    assert "kl_to_sft" not in runs[-1].extra

    report = write_report(runs, RECORDS, [tmp_path], "# header", examples=2)
    bf16, cost, decode = report["fast_path_costs"]
    assert decode["numeric"] == "int8-decode"
    assert (bf16["numeric"], cost["variant"], cost["numeric"]) == ("bf16", "sft", "int8") and cost["speedup"] > 0
    summaries = {(s["variant"], s["numeric"]): s for s in report["runs"] if s["layout"] == "template" and s["retrieval"]}
    expected = 100 * (summaries[("sft", "int8")]["key_fact_accuracy"] - summaries[("sft", "fp32")]["key_fact_accuracy"])
    assert cost["key_fact_points"] == round(expected, 1)
    fp32_answers, int8_answers = runs[4].answers, runs[7].answers
    assert cost["same_answers"] == round(sum(a == b for a, b in zip(int8_answers, fp32_answers)) / 3, 3)
    hits = [(f["fact_hit"], q["fact_hit"]) for f, q in zip(runs[4].rows, runs[7].rows) if f["answerable"]]
    assert (cost["questions_lost"], cost["questions_gained"]) == (
        sum(f and not q for f, q in hits), sum(q and not f for f, q in hits))
    markdown = (tmp_path / "eval.md").read_text()
    assert "| sft | template | on | int8 |" in markdown and "Fast numeric paths against fp32" in markdown
    assert json.loads((tmp_path / "eval.json").read_text())["questions"] == 3


def test_sign_test_by_hand():
    assert sign_test(4, 0) == 0.125  # 2 * (1/2)**4
    assert sign_test(0, 4) == 0.125
    assert sign_test(3, 3) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(5, 1) == round(2 * (1 + 6) / 64, 3)  # P(X <= 1) of Binomial(6, 1/2), twice
