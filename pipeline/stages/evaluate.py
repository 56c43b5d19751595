"""Stage `eval`: what each stage bought, on held-out questions, in one report.

Reads:  data/qa/eval.jsonl (held out: no trainer ever sees it), `base` and `index`, and
        every variant that is built (sft, dpo, ppo) with its refusal threshold.
Writes: artifacts/eval/ and reports/: eval.json, eval.md, eval.png, retrieval.json,
        retrieval.md. Metrics: key-fact accuracy, abstention, false refusals, citation
        precision, token F1, ROUGE-L, BLEU, length, repetition, held-out perplexity, seconds
        per answer, and paired bootstrap intervals between variants.
Alone:  python -m pipeline run --only eval     (also `make eval`)
        python -m pipeline eval --docs DIR --qa FILE   (your own documents and questions)
"""
from __future__ import annotations

from pathlib import Path

from pipeline.evaluation.loop import EvalSettings as Config

PARENTS = ("base", "index")
OPTIONAL_PARENTS = ("sft", "dpo", "ppo")
CONFIG_SECTIONS = ("retrieval",)
__all__ = ["Config", "PARENTS", "OPTIONAL_PARENTS", "inputs", "run", "score"]


def inputs(cfg) -> list[Path]:
    return [cfg.paths.resolve("qa") / "eval.jsonl", cfg.paths.resolve("qa") / "train.jsonl"]


def perplexity_texts(retriever, records, train_docs: set[str], n: int) -> list[str]:
    """Chunks of documents that no training question touches: held-out text."""
    unseen = {r.doc for r in records if r.doc and r.doc not in train_docs}
    return [c.text for c in retriever.chunks if c.doc_id in unseen][:n]


def score(artifacts, records, retriever, config: Config, out_dirs: list[Path], header: str,
          train_docs: set[str], seed: int) -> dict:
    from pipeline.evaluation.loop import evaluate, select
    from pipeline.evaluation.report import write_report

    chosen = select(records, config.max_questions, seed)
    texts = perplexity_texts(retriever, chosen, train_docs, config.perplexity_chunks)
    runs = evaluate(artifacts, chosen, retriever, config, texts)
    return write_report(runs, chosen, out_dirs, header, config.examples, seed)


def run(config: Config, ctx) -> dict:
    from pipeline.data.records import load_split
    from pipeline.evaluation.retrieval_eval import evaluate_retrieval, write_retrieval_report
    from pipeline.retrieval.retriever import Retriever

    cfg = ctx.config
    records = load_split(cfg.paths.resolve("qa"), "eval")
    train_docs = {r.doc for r in load_split(cfg.paths.resolve("qa"), "train") if r.doc}
    retriever = Retriever(ctx.parent("index"), cfg.retrieval)
    retrieval = evaluate_retrieval(retriever, records)
    write_retrieval_report(retrieval, ctx.reports_dir)
    write_retrieval_report(retrieval, ctx.out_dir)
    header = (f"# Evaluation on held-out questions ({cfg.profile} profile)\n\n"
              "Made by `python -m pipeline run --only eval` from data/qa/eval.jsonl; greedy decoding, "
              f"seed {cfg.seed}, top_k={cfg.retrieval.top_k} {cfg.retrieval.mode} retrieval. "
              "Layout `template` is the project's prompt; `plain` is the base model's best plain layout; "
              "`extractive / sentence` is no model at all: the sentence of passage [1] sharing most words "
              "with the question (pipeline/evaluation/baselines.py). Layout `copy` is copy decoding "
              "(pipeline/copying.py): the reply is one shown sentence with its [n], or the refusal, picked "
              "by the variant's selector fitted on the dev split; this is what the service serves. Trained "
              "variants decoding freely (`template`) answer or refuse by the threshold chosen on the dev split. Key-fact accuracy matches each "
              "fact on word boundaries, ignores [n] markers and gives no credit past 60 words "
              "(pipeline/evaluation/metrics.py). Rows marked `bf16`, `int8` or `int8-decode` (opt-in) "
              "serve the same weights through a faster numeric path (pipeline/numeric.py).")
    report = score(ctx.artifacts, records, retriever, config, [ctx.reports_dir, ctx.out_dir], header,
                   train_docs, cfg.seed)
    metrics = {"questions": report["questions"],
               "retrieval_ndcg@10_hybrid": retrieval["modes"]["hybrid"]["ndcg@10"]}
    for summary in report["runs"]:
        if summary["layout"] in ("template", "copy") and summary["retrieval"] and summary["numeric"] == "fp32":
            name = summary["variant"] + ("_copy" if summary["layout"] == "copy" else "")
            metrics[f"{name}_key_fact_accuracy"] = summary["key_fact_accuracy"]
            metrics[f"{name}_abstention"] = summary["abstention_accuracy"]
            metrics[f"{name}_false_refusal"] = summary["false_refusal_rate"]
    for cost in report["fast_path_costs"]:
        metrics[f"{cost['variant']}_{cost['numeric']}_key_fact_points"] = cost["key_fact_points"]
        metrics[f"{cost['variant']}_{cost['numeric']}_same_answers"] = cost["same_answers"]
        metrics[f"{cost['variant']}_{cost['numeric']}_questions_lost"] = cost["questions_lost"]
    return metrics
