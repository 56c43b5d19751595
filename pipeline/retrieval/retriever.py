"""``Retriever.search(query, k) -> list[Passage]``: dense, BM25 or hybrid (fused), optional MMR.

The dataset stage, eval and the service all retrieve through this class, with the
``retrieval`` config section, so training sees the passages serving will show.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.retrieval.settings import RetrievalSettings
from pipeline.retrieval.store import bm25_tokenize, load_parts

MODES = ("dense", "bm25", "hybrid")
FUSIONS = ("score", "rrf")


@dataclass
class Passage:
    chunk_id: str
    doc_id: str  # the source document's id (relative path, or BEIR _id)
    source: str
    title: str
    headers: str  # header path, "Title > Section"
    text: str
    score: float  # dense: cosine; bm25: BM25; hybrid: the fused score


def rrf_fuse(rankings: list[list[int]], weights: list[float], rrf_k: int) -> list[tuple[int, float]]:
    """Reciprocal-rank fusion (Cormack et al. 2009): sum of w / (rrf_k + rank), rank from 1."""
    scores: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights):
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + weight / (rrf_k + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def score_fuse(rankings: list[list[tuple[int, float]]], weights: list[float]) -> list[tuple[int, float]]:
    """Weighted sum of min-max normalised scores; an item missing from a ranking adds 0 there.

    Each ranking's best hit maps to 1 and its last candidate to 0, so BM25's unbounded scores
    and cosine similarities share one scale (the "convex combination" of Bruch et al. 2023).
    """
    scores: dict[int, float] = {}
    for ranking, weight in zip(rankings, weights):
        if not ranking:
            continue
        values = [s for _, s in ranking]
        low, spread = min(values), max(values) - min(values)
        for item, value in ranking:
            norm = (value - low) / spread if spread > 0 else 1.0
            scores[item] = scores.get(item, 0.0) + weight * norm
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))


def fuse(dense: list[tuple[int, float]], sparse: list[tuple[int, float]],
         settings: RetrievalSettings) -> list[tuple[int, float]]:
    weights = [settings.dense_weight, settings.bm25_weight]
    if settings.fusion == "score":
        return score_fuse([dense, sparse], weights)
    if settings.fusion == "rrf":
        return rrf_fuse([[i for i, _ in dense], [i for i, _ in sparse]], weights, settings.rrf_k)
    raise UserError(f"retrieval.fusion must be one of {FUSIONS}, not '{settings.fusion}'")


def mmr(candidates: list[tuple[int, float]], vectors: np.ndarray, k: int,
        lam: float) -> list[tuple[int, float]]:
    """Maximal marginal relevance: trade relevance (rank order) against redundancy."""
    relevance = {idx: 1.0 - pos / max(1, len(candidates)) for pos, (idx, _) in enumerate(candidates)}
    chosen: list[tuple[int, float]] = []
    pool = list(candidates)
    while pool and len(chosen) < k:
        def gain(item):
            idx = item[0]
            redundancy = max((float(vectors[idx] @ vectors[c]) for c, _ in chosen), default=0.0)
            return lam * relevance[idx] - (1 - lam) * redundancy
        best = max(pool, key=gain)
        chosen.append(best)
        pool.remove(best)
    return chosen


class Retriever:
    def __init__(self, folder: Path, settings: RetrievalSettings | None = None, embedder=None):
        self.folder = Path(folder)
        self.settings = settings or RetrievalSettings()
        self.manifest, self.chunks, self.embeddings, self.dense, self.bm25 = load_parts(self.folder)
        self._embedder = embedder
        self._configure_ann()

    def _configure_ann(self) -> None:
        import faiss

        if hasattr(self.dense, "nprobe"):
            self.dense.nprobe = self.settings.nprobe
        if isinstance(self.dense, faiss.IndexHNSW):
            self.dense.hnsw.efSearch = self.settings.ef_search

    @property
    def embedder(self):
        if self._embedder is None:
            from pipeline.retrieval.embedder import Embedder

            self._embedder = Embedder(self.manifest["embedder"])
        return self._embedder

    def dense_ranking(self, query: str, n: int) -> list[tuple[int, float]]:
        scores, ids = self.dense.search(self.embedder.encode_query(query), min(n, len(self.chunks)))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def bm25_ranking(self, query: str, n: int) -> list[tuple[int, float]]:
        tokens = bm25_tokenize([query])
        if not tokens.vocab:
            return []
        ids, scores = self.bm25.retrieve(tokens, k=min(n, len(self.chunks)), show_progress=False)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if s > 0]

    def search(self, query: str, k: int | None = None, mode: str | None = None) -> list[Passage]:
        settings = self.settings
        k = k or settings.top_k
        mode = mode or settings.mode
        if mode not in MODES:
            raise UserError(f"retrieval mode must be one of {MODES}, not '{mode}'")
        if not query.strip():
            return []
        n = max(settings.candidates, k)
        if mode == "dense":
            ranked = self.dense_ranking(query, n)
        elif mode == "bm25":
            ranked = self.bm25_ranking(query, n)
        else:
            ranked = fuse(self.dense_ranking(query, n), self.bm25_ranking(query, n), settings)
        if settings.mmr_lambda > 0:
            ranked = mmr(ranked[:n], self.embeddings, k, settings.mmr_lambda)
        return [self._passage(i, s) for i, s in ranked[:k]]

    def _passage(self, idx: int, score: float) -> Passage:
        c = self.chunks[idx]
        return Passage(c.chunk_id, c.doc_id, c.source, c.title, c.headers, c.text, round(score, 6))
