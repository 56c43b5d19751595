"""Settings for building an index and for querying it (two config sections)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class IndexSettings:
    embedder: str = "embedded"  # "embedded" = packaged all-MiniLM-L6-v2; or a hub id / path
    chunk_tokens: int = 160  # chunk size, in tokens of the embedder's tokenizer
    chunk_overlap: int = 24  # tokens shared by neighbouring chunks
    batch_size: int = 64  # chunks per embedding batch
    ann_threshold: int = 50_000  # above this many chunks, use an approximate index
    ann_kind: str = "hnsw"  # approximate index: "hnsw" or "ivf"
    hnsw_m: int = 32  # HNSW graph degree: higher, better recall, more memory
    ivf_lists: int = 0  # IVF cells; 0 = 4 * sqrt(chunks)


@dataclass
class RetrievalSettings:
    top_k: int = 4  # passages put in the prompt (dataset, eval and the service all use it)
    mode: str = "hybrid"  # "dense", "bm25" or "hybrid"
    # Fusion defaults were chosen on the *training* questions (nDCG@10 of document retrieval,
    # `python -m pipeline retrieval-eval --tune`): BM25 is the stronger single retriever on
    # this corpus, and a weighted sum of min-max normalised scores beat reciprocal-rank fusion.
    fusion: str = "score"  # hybrid fusion: "score" (weighted normalised scores) or "rrf"
    dense_weight: float = 0.35  # weight of the dense retriever in the fusion
    bm25_weight: float = 0.65  # weight of the BM25 retriever in the fusion
    rrf_k: int = 10  # fusion "rrf": score = weight / (rrf_k + rank); Cormack et al. (2009) used 60
    candidates: int = 50  # hits taken from each retriever before fusion
    mmr_lambda: float = 0.0  # 0 = off; else relevance/diversity trade-off of MMR (0..1)
    nprobe: int = 16  # IVF cells visited per query
    ef_search: int = 64  # HNSW candidate list size per query
