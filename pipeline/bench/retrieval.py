"""Retrieval benchmarks: embedding throughput and quality per numeric path; query latency and
recall@10 of flat / IVF / HNSW indexes on synthetic collections of 10k and 1M chunks."""
from __future__ import annotations

import time

import numpy as np


def _percentiles(samples: list[float]) -> dict:
    ms = np.array(samples) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p95_ms": round(float(np.percentile(ms, 95)), 3)}


def embedding_paths(texts: list[str], queries: list[str], relevant: list[set[int]]) -> dict:
    """Chunks/s and tokens/s of each path against plain fp32 ``SentenceTransformer.encode``,
    and nDCG@10 of dense retrieval with that path's vectors."""
    import torch
    from sentence_transformers import SentenceTransformer

    from pipeline.models import minilm_dir

    n_tokens = None
    results = {}

    def ndcg(doc_vectors, query_vectors):
        scores = query_vectors @ doc_vectors.T
        total = 0.0
        for row, rel in zip(scores, relevant):
            top = np.argsort(-row)[:10]
            total += next((1 / np.log2(rank + 2) for rank, i in enumerate(top) if i in rel), 0.0)
        return total / len(relevant)

    def measure(name, model, batch_size=32, autocast=False):
        nonlocal n_tokens
        model.encode(texts[:8], batch_size=8)  # warm-up
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            docs = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
            qs = model.encode(queries, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
        seconds = time.perf_counter() - started
        if n_tokens is None:
            n_tokens = sum(len(model.tokenizer(t, truncation=True, max_length=256)["input_ids"]) for t in texts)
        results[name] = {"chunks_per_s": round(len(texts) / seconds, 1),
                         "tokens_per_s": round(n_tokens / seconds, 1),
                         "ndcg@10_dense": round(ndcg(docs.astype(np.float32), qs.astype(np.float32)), 4)}

    fp32 = SentenceTransformer(str(minilm_dir()), device="cpu")
    measure("fp32 encode (baseline)", fp32)
    measure("fp32, batch 128", fp32, batch_size=128)
    measure("bf16 autocast", fp32, autocast=True)
    int8 = torch.ao.quantization.quantize_dynamic(
        SentenceTransformer(str(minilm_dir()), device="cpu"), {torch.nn.Linear}, dtype=torch.qint8)
    measure("int8 dynamic quantisation", int8)
    base = results["fp32 encode (baseline)"]
    for row in results.values():
        row["speed_ratio"] = round(row["chunks_per_s"] / base["chunks_per_s"], 2)
        row["ndcg_delta"] = round(row["ndcg@10_dense"] - base["ndcg@10_dense"], 4)
    return results


def synthetic_vectors(centres: np.ndarray, n: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit vectors scattered around real embeddings: clustered like real collections."""
    out = np.empty((n, centres.shape[1]), dtype=np.float32)
    for start in range(0, n, 100_000):
        size = min(100_000, n - start)
        picks = centres[rng.integers(0, len(centres), size)]
        block = picks + noise * rng.standard_normal(picks.shape).astype(np.float32)
        out[start:start + size] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def index_latency(centres: np.ndarray, query_vectors: np.ndarray, sizes: list[int], hnsw_max: int,
                  query_embed_seconds: list[float]) -> list[dict]:
    """Per size and index kind: build seconds, memory, p50/p95 search latency (+ measured query
    embedding time), recall@10 against exact search."""
    import faiss

    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        vectors = synthetic_vectors(centres, n, noise=0.05, rng=rng)
        queries = synthetic_vectors(query_vectors, 200, noise=0.05, rng=rng)
        kinds = [("flat", lambda d: faiss.IndexFlatIP(d))]
        lists = int(4 * np.sqrt(n))
        kinds.append((f"ivf{lists}, nprobe 16", lambda d: faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists,
                                                                            faiss.METRIC_INNER_PRODUCT)))
        if n <= hnsw_max:
            kinds.append(("hnsw M32, efSearch 64", lambda d: faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)))
        exact = None
        for name, make in kinds:
            index = make(vectors.shape[1])
            started = time.perf_counter()
            if not index.is_trained:
                index.train(vectors[rng.choice(n, min(n, 50 * lists), replace=False)])
            index.add(vectors)
            build = time.perf_counter() - started
            if hasattr(index, "nprobe"):
                index.nprobe = 16
            if hasattr(index, "hnsw"):
                index.hnsw.efSearch = 64
            latencies, found = [], []
            for q in queries:
                started = time.perf_counter()
                _, ids = index.search(q[None, :], 10)
                latencies.append(time.perf_counter() - started)
                found.append(ids[0])
            if exact is None:
                exact = found
            recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact)]))
            embed = float(np.median(query_embed_seconds))
            rows.append({"chunks": n, "index": name, "build_s": round(build, 2),
                         "index_mb": round(len(faiss.serialize_index(index)) / 2**20, 1),
                         **_percentiles(latencies),
                         "p50_with_query_embedding_ms": round((np.median(latencies) + embed) * 1000, 2),
                         "recall@10_vs_exact": round(recall, 4)})
            del index
        del vectors
    return rows
