"""The retrieval commands of ``python -m pipeline``: index, search, retrieve."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.artifacts import Artifacts
from pipeline.errors import UserError
from pipeline.retrieval.retriever import Retriever


def index_folder(cfg, docs: str, out: str) -> dict:
    """Build (or incrementally update) an index of ``docs`` in ``out``, atomically."""
    from pipeline.retrieval.embedder import Embedder
    from pipeline.retrieval.store import build_index

    out_path = Path(out).resolve()
    embedder = Embedder(cfg.index.embedder, cfg.index.batch_size)
    with Artifacts(out_path.parent).publish(out_path.name) as staging:
        manifest = build_index(Path(docs), staging, cfg.index, embedder,
                               out_path if out_path.exists() else None)
    print(f"indexed {manifest['documents']} documents into {manifest['chunks']} chunks "
          f"({manifest['embedded']} embedded, {manifest['reused']} reused, "
          f"{manifest['removed']} removed, {len(manifest['skipped_files'])} files skipped) -> {out_path}")
    return manifest


def default_index(cfg) -> Path:
    return Artifacts(cfg.paths.resolve("artifacts")).require("index")


def search(cfg, query: str, k: int, mode: str | None, index: str | None) -> None:
    retriever = Retriever(Path(index) if index else default_index(cfg), cfg.retrieval)
    for rank, p in enumerate(retriever.search(query, k, mode), 1):
        snippet = " ".join(p.text.split())[:160]
        print(f"{rank:>2}. {p.score:.4f}  {p.source}  [{p.headers}]\n    {snippet}")


def read_queries(path: Path) -> list[tuple[str, str]]:
    queries = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            queries.append((str(record["_id"]), str(record["text"])))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"{path}:{number}: not a BEIR query {{\"_id\", \"text\"}} ({err})") from None
    return queries


def retrieve(cfg, index: str, queries: str, k: int, out: str, mode: str | None) -> None:
    """Write a TREC run file: ``qid Q0 docid rank score tag``, one document per line."""
    retriever = Retriever(Path(index), cfg.retrieval)
    mode = mode or cfg.retrieval.mode
    lines = []
    for qid, text in read_queries(Path(queries)):
        best: dict[str, float] = {}
        for passage in retriever.search(text, k=max(k * 3, k), mode=mode):
            best.setdefault(passage.doc_id, passage.score)  # a document ranks by its best chunk
        for rank, (doc_id, score) in enumerate(list(best.items())[:k], 1):
            lines.append(f"{qid} Q0 {doc_id} {rank} {score:.6f} alignrag-{mode}")
    Path(out).write_text("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} lines for {len(set(l.split()[0] for l in lines))} queries to {out}")
