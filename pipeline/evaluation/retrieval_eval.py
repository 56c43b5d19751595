"""Retrieval quality on the held-out questions: recall@k, MRR and nDCG@10 per mode.

A question's relevant document is its record's ``doc``; a ranking is the order in which
documents first appear among the retrieved chunks. Writes reports/retrieval.{json,md}.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.prompt import retrieval_query


def doc_ranking(passages) -> list[str]:
    seen: list[str] = []
    for p in passages:
        if p.doc_id not in seen:
            seen.append(p.doc_id)
    return seen


def rank_metrics(rank: int | None) -> dict:
    """Metrics for one question whose single relevant document sits at ``rank`` (1-based)."""
    return {"recall@1": float(rank is not None and rank <= 1), "recall@5": float(rank is not None and rank <= 5),
            "recall@10": float(rank is not None and rank <= 10), "mrr": 1 / rank if rank else 0.0,
            "ndcg@10": 1 / math.log2(rank + 1) if rank and rank <= 10 else 0.0}


def evaluate_retrieval(retriever, records, modes=("dense", "bm25", "hybrid"), depth: int = 30) -> dict:
    answerable = [r for r in records if r.answerable]
    results = {}
    for mode in modes:
        totals = dict.fromkeys(rank_metrics(None), 0.0)
        for record in answerable:
            ranking = doc_ranking(retriever.search(retrieval_query(record.question, record.history),
                                                   k=depth, mode=mode))
            rank = ranking.index(record.doc) + 1 if record.doc in ranking else None
            for key, value in rank_metrics(rank).items():
                totals[key] += value
        results[mode] = {k: round(v / max(1, len(answerable)), 4) for k, v in totals.items()}
    return {"questions": len(answerable), "modes": results}


def write_retrieval_report(report: dict, reports_dir: Path) -> None:
    reports_dir.mkdir(parents=True, exist_ok=True)
    (reports_dir / "retrieval.json").write_text(json.dumps(report, indent=2))
    keys = list(next(iter(report["modes"].values())))
    lines = ["# Retrieval on held-out questions", "",
             f"{report['questions']} answerable questions from data/qa/eval.jsonl; the relevant "
             "document is the record's `doc`. Regenerate: `python -m pipeline retrieval-eval`.", "",
             "| mode | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for mode, values in report["modes"].items():
        lines.append(f"| {mode} | " + " | ".join(f"{values[k]:.3f}" for k in keys) + " |")
    (reports_dir / "retrieval.md").write_text("\n".join(lines) + "\n")
