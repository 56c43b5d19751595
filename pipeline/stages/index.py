"""Stage `index`: chunk, embed and index the documents folder (faiss + BM25).

Reads:  the folder ``paths.docs`` (default data/docs); the previous artifacts/index/, if
        any, whose embeddings are reused for chunks whose content did not change.
Writes: artifacts/index/ (manifest.json, chunks.jsonl, embeddings.npy, dense.faiss, bm25/).
Alone:  python -m pipeline run --only index [paths.docs=my/folder]
        or, outside the pipeline: python -m pipeline index --docs DIR --out DIR
"""
from __future__ import annotations

from pathlib import Path

from pipeline.retrieval.settings import IndexSettings as Config

PARENTS: tuple[str, ...] = ()
__all__ = ["Config", "PARENTS", "inputs", "run"]


def inputs(cfg) -> list[Path]:
    return [cfg.paths.resolve("docs")]


def run(config: Config, ctx) -> dict:
    from pipeline.retrieval.embedder import Embedder
    from pipeline.retrieval.store import build_index

    previous = ctx.artifacts.dir("index")
    embedder = Embedder(config.embedder, config.batch_size)
    manifest = build_index(ctx.config.paths.resolve("docs"), ctx.out_dir, config, embedder,
                           previous if previous.exists() else None)
    return {k: manifest[k] for k in ("chunks", "documents", "embedded", "reused", "removed", "faiss")} | {
        "skipped_files": len(manifest["skipped_files"])}
