"""The on-disk index: chunk store (JSONL), embeddings, faiss index, BM25 index, manifest.

Layout of an index folder::

    manifest.json    embedder, dimension, chunk count, digest of the chunk ids, index kind
    chunks.jsonl     one Chunk a line (text and metadata; never pickle)
    embeddings.npy   (chunks, dim) float32, reused by incremental rebuilds
    dense.faiss      flat inner product, or HNSW / IVF above a size threshold
    bm25/            bm25s sparse matrices and vocabulary (numpy + JSON)
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np

from pipeline.errors import UserError

from pipeline.retrieval.chunking import Chunk, chunk_documents, make_splitter
from pipeline.retrieval.ingest import load_documents
from pipeline.retrieval.settings import IndexSettings

log = logging.getLogger("pipeline.index")
FILES = ("manifest.json", "chunks.jsonl", "embeddings.npy", "dense.faiss", "bm25")


class IndexCorrupt(UserError):
    """An index folder whose parts are missing, unreadable or do not match each other."""


def ids_digest(chunk_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(chunk_ids).encode()).hexdigest()[:16]


def bm25_tokenize(texts: list[str]):
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", show_progress=False)


def build_faiss(vectors: np.ndarray, settings: IndexSettings):
    """Exact inner product up to ``ann_threshold`` chunks, approximate above it."""
    import faiss

    n, dim = vectors.shape
    if n <= settings.ann_threshold:
        index = faiss.IndexFlatIP(dim)
    elif settings.ann_kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    elif settings.ann_kind == "ivf":
        lists = settings.ivf_lists or max(1, int(4 * math.sqrt(n)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
    else:
        raise UserError(f"index.ann_kind must be 'hnsw' or 'ivf', not '{settings.ann_kind}'")
    index.add(vectors)
    return index


def _previous_vectors(previous: Path | None, embedder_name: str) -> dict[str, np.ndarray]:
    """Embeddings of an earlier build, by chunk id, when it used the same embedder."""
    if previous is None or not (previous / "manifest.json").exists():
        return {}
    try:
        manifest = json.loads((previous / "manifest.json").read_text())
        if manifest.get("embedder") != embedder_name:
            return {}
        chunks = read_chunks(previous / "chunks.jsonl")
        vectors = np.load(previous / "embeddings.npy")
    except (OSError, ValueError, KeyError) as err:
        log.warning("previous index in %s unreadable (%s); embedding everything", previous, err)
        return {}
    if len(chunks) != len(vectors):
        return {}
    return {c.chunk_id: v for c, v in zip(chunks, vectors)}


def read_chunks(path: Path) -> list[Chunk]:
    return [Chunk(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def build_index(docs_dir: Path, out_dir: Path, settings: IndexSettings, embedder,
                previous: Path | None = None) -> dict:
    """Ingest, chunk, embed (reusing ``previous`` vectors by chunk id) and write the index."""
    import bm25s
    import faiss

    documents, report = load_documents(docs_dir)
    splitter = make_splitter(embedder.tokenizer, settings.chunk_tokens, settings.chunk_overlap)
    chunks = chunk_documents(documents, splitter)
    known = _previous_vectors(previous, settings.embedder)
    fresh = [c for c in chunks if c.chunk_id not in known]
    log.info("%d chunks from %d documents: %d reused, %d to embed", len(chunks), len(documents),
             len(chunks) - len(fresh), len(fresh))
    new_vectors = dict(zip((c.chunk_id for c in fresh),
                           embedder.encode([c.embed_text for c in fresh], progress=True)))
    vectors = np.stack([known.get(c.chunk_id, new_vectors.get(c.chunk_id)) for c in chunks])
    vectors = vectors.astype(np.float32)

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "chunks.jsonl", "w") as fh:
        for chunk in chunks:
            fh.write(json.dumps(chunk.to_dict(), ensure_ascii=False) + "\n")
    np.save(out_dir / "embeddings.npy", vectors)
    dense = build_faiss(vectors, settings)
    faiss.write_index(dense, str(out_dir / "dense.faiss"))
    bm25 = bm25s.BM25()
    bm25.index(bm25_tokenize([c.embed_text for c in chunks]), show_progress=False)
    bm25.save(str(out_dir / "bm25"), show_progress=False)
    removed = len(set(known) - {c.chunk_id for c in chunks})
    manifest = {
        "embedder": settings.embedder, "dim": int(vectors.shape[1]), "chunks": len(chunks),
        "documents": len(documents), "chunk_ids_digest": ids_digest([c.chunk_id for c in chunks]),
        "faiss": type(dense).__name__, "reused": len(chunks) - len(fresh), "embedded": len(fresh),
        "removed": removed, "skipped_files": report.skipped,
        "replacement_decoded": report.replaced_bytes,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def load_parts(folder: Path):
    """(manifest, chunks, embeddings, faiss index, bm25); ``IndexCorrupt`` when inconsistent."""
    import bm25s
    import faiss

    folder = Path(folder)
    rebuild = f"rebuild it with: python -m pipeline index --docs DOCS --out {folder}"
    missing = [name for name in FILES if not (folder / name).exists()]
    if missing:
        raise IndexCorrupt(f"index at {folder} is incomplete (missing {', '.join(missing)}); {rebuild}")
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        chunks = read_chunks(folder / "chunks.jsonl")
        embeddings = np.load(folder / "embeddings.npy")
        dense = faiss.read_index(str(folder / "dense.faiss"))
        bm25 = bm25s.BM25.load(str(folder / "bm25"))
    except Exception as err:  # faiss raises RuntimeError, json ValueError, numpy OSError...
        raise IndexCorrupt(f"index at {folder} is unreadable ({type(err).__name__}: "
                           f"{str(err).splitlines()[0][:200]}); {rebuild}") from None
    problems = []
    if dense.ntotal != len(chunks):
        problems.append(f"faiss holds {dense.ntotal} vectors but the chunk store {len(chunks)} chunks")
    if len(embeddings) != len(chunks):
        problems.append(f"{len(embeddings)} embeddings for {len(chunks)} chunks")
    if manifest.get("chunk_ids_digest") != ids_digest([c.chunk_id for c in chunks]):
        problems.append("the chunk store does not match the manifest")
    if problems:
        raise IndexCorrupt(f"index at {folder} does not match itself: {'; '.join(problems)}; {rebuild}")
    return manifest, chunks, embeddings, dense, bm25
