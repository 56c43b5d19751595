"""Choose the hybrid fusion on the *training* questions: ``python -m pipeline retrieval-eval --tune``.

Each question is retrieved once per retriever; every fusion in the grid then re-ranks the
same candidates, so the whole grid costs one pass. The held-out split is never looked at.
"""
from __future__ import annotations

from dataclasses import replace

from pipeline.evaluation.retrieval_eval import doc_ranking, rank_metrics
from pipeline.prompt import retrieval_query
from pipeline.retrieval.retriever import fuse


def fusion_grid(settings) -> list:
    grid = []
    for bm25_share in (0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8):
        grid.append(replace(settings, fusion="score", dense_weight=round(1 - bm25_share, 2),
                            bm25_weight=bm25_share))
    for rrf_k in (1, 5, 10, 20, 60):
        for bm25_weight in (1.0, 2.0, 4.0):
            grid.append(replace(settings, fusion="rrf", rrf_k=rrf_k, dense_weight=1.0,
                                bm25_weight=bm25_weight))
    return grid


def tune_fusion(retriever, records, top: int = 8) -> list[tuple[float, dict]]:
    """nDCG@10 of document retrieval for each fusion in the grid, best first."""
    n = retriever.settings.candidates
    candidates = []
    for record in (r for r in records if r.answerable):
        query = retrieval_query(record.question, record.history)
        candidates.append((record.doc, retriever.dense_ranking(query, n), retriever.bm25_ranking(query, n)))
    results = []
    for settings in fusion_grid(retriever.settings):
        total = 0.0
        for doc, dense, sparse in candidates:
            docs = doc_ranking(retriever.chunks[idx] for idx, _ in fuse(dense, sparse, settings))
            total += rank_metrics(docs.index(doc) + 1 if doc in docs else None)["ndcg@10"]
        overrides = {"fusion": settings.fusion, "dense_weight": settings.dense_weight,
                     "bm25_weight": settings.bm25_weight}
        if settings.fusion == "rrf":
            overrides["rrf_k"] = settings.rrf_k
        results.append((round(total / max(1, len(candidates)), 4), overrides))
    return sorted(results, key=lambda r: -r[0])[:top]
