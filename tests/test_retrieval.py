"""Ingestion, chunking, the faiss + BM25 index, fusion, incremental rebuilds, bad input."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.retrieval.chunking import chunk_documents, make_splitter
from pipeline.retrieval.ingest import EmptyCorpus, load_documents
from pipeline.retrieval.retriever import Retriever, fuse, mmr, rrf_fuse, score_fuse
from pipeline.retrieval.settings import IndexSettings, RetrievalSettings
from pipeline.retrieval.store import IndexCorrupt, build_index

DOCS = {
    "adam.md": "# Adam\n\n## Defaults\n\nAdam uses beta1 = 0.9 and beta2 = 0.999 with epsilon 1e-8.\n\n"
               "## Authors\n\nAdam was proposed by Diederik Kingma and Jimmy Ba in 2014.\n",
    "dropout.md": "# Dropout\n\nDropout zeroes each unit with probability p during training; "
                  "the original paper used p = 0.5 for hidden layers.\n",
    "faiss.txt": "faiss searches vectors. An HNSW graph links each vector to M neighbours, and "
                 "efSearch sets the candidate list size.\n",
}


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF showing ``text`` (with correct xref offsets, so pypdf reads it)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


@pytest.fixture(scope="module")
def embedder():
    from pipeline.retrieval.embedder import Embedder

    return Embedder("embedded", batch_size=16)


@pytest.fixture
def docs(tmp_path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    return folder


def _build(docs: Path, out: Path, embedder, previous=None, **settings) -> dict:
    return build_index(docs, out, IndexSettings(**settings), embedder, previous)


def test_every_format_is_read_and_bad_files_are_skipped(docs, caplog):
    (docs / "page.html").write_text("<html><title>Pooling</title><script>x=1</script>"
                                    "<body><p>Max pooling keeps the largest value.</p></body></html>")
    (docs / "paper.pdf").write_bytes(minimal_pdf("Batch normalisation was proposed in 2015."))
    (docs / "corpus.jsonl").write_text(json.dumps({"_id": "d7", "title": "BLEU", "text": "BLEU clips n-gram counts."}) + "\n")
    (docs / "latin1.txt").write_bytes("Caf\xe9 notes about momentum".encode("latin-1"))
    (docs / "blob.md").write_bytes(b"\x00\x01\x02binary")
    (docs / "empty.md").write_text("   \n")
    (docs / "image.png").write_bytes(b"\x89PNG")
    with caplog.at_level(logging.WARNING):
        documents, report = load_documents(docs)
    by_id = {d.doc_id: d for d in documents}
    assert by_id["page.html"].title == "Pooling" and "x=1" not in by_id["page.html"].text
    assert "Batch normalisation" in by_id["paper.pdf"].text
    assert by_id["d7"].title == "BLEU" and by_id["d7"].kind == "beir"
    assert by_id["adam.md"].title == "Adam"
    assert "\ufffd" in by_id["latin1.txt"].text and report.replaced_bytes == ["latin1.txt"]
    skipped = sorted(s.split(":")[0] for s in report.skipped)
    assert skipped == ["blob.md", "empty.md", "image.png"]
    assert sum("skipping" in r.message for r in caplog.records) == 3


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(EmptyCorpus, match="no readable documents"):
        load_documents(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents(tmp_path / "nope")


@pytest.mark.slow
def test_chunks_keep_header_path_fit_the_window_and_have_stable_ids(docs, embedder):
    documents, _ = load_documents(docs)
    long_doc = documents[0].__class__("long.md", "long.md", "Long", "# Long\n\n" + " ".join(f"word{i}" for i in range(900)), "markdown")
    splitter = make_splitter(embedder.tokenizer, chunk_tokens=64, overlap_tokens=8)
    chunks = chunk_documents(documents + [long_doc], splitter)
    adam = [c for c in chunks if c.doc_id == "adam.md"]
    assert {c.headers for c in adam} == {"Adam > Defaults", "Adam > Authors"}
    assert adam[0].embed_text.startswith("Adam > ")
    sizes = [len(embedder.tokenizer(c.text, add_special_tokens=False)["input_ids"]) for c in chunks]
    assert max(sizes) <= 64 and sum(c.doc_id == "long.md" for c in chunks) >= 10
    again = chunk_documents(documents + [long_doc], splitter)
    assert [c.chunk_id for c in again] == [c.chunk_id for c in chunks]
    with pytest.raises(ValueError, match="overlap"):
        make_splitter(embedder.tokenizer, 32, 32)


@pytest.mark.slow
def test_search_finds_the_right_document_in_every_mode(docs, tmp_path, embedder):
    _build(docs, tmp_path / "index", embedder, chunk_tokens=64, chunk_overlap=8)
    retriever = Retriever(tmp_path / "index", RetrievalSettings(top_k=2), embedder)
    for mode in ("dense", "bm25", "hybrid"):
        top = retriever.search("Who proposed Adam and when?", mode=mode)[0]
        assert top.doc_id == "adam.md" and top.headers == "Adam > Authors", mode
    assert retriever.search("HNSW efSearch", k=1)[0].source == "faiss.txt"
    assert retriever.search("   ") == []


@pytest.mark.slow
def test_long_query_is_truncated_not_a_crash(docs, tmp_path, embedder, caplog):
    _build(docs, tmp_path / "index", embedder)
    retriever = Retriever(tmp_path / "index", RetrievalSettings(), embedder)
    with caplog.at_level(logging.INFO):
        hits = retriever.search("dropout probability " * 400, k=1)
    assert hits and any("embedder reads the first" in r.message for r in caplog.records)


@pytest.mark.slow
def test_incremental_rebuild_reembeds_only_changed_files(docs, tmp_path, embedder):
    first = _build(docs, tmp_path / "v1", embedder)
    assert first["embedded"] == first["chunks"] and first["reused"] == 0
    (docs / "dropout.md").write_text(DOCS["dropout.md"] + "\nInverted dropout rescales by 1/(1-p).\n")
    (docs / "faiss.txt").unlink()
    second = _build(docs, tmp_path / "v2", embedder, previous=tmp_path / "v1")
    dropout_chunks = sum(1 for line in (tmp_path / "v2/chunks.jsonl").read_text().splitlines()
                         if json.loads(line)["doc_id"] == "dropout.md")
    assert second["embedded"] == dropout_chunks
    assert second["reused"] == second["chunks"] - dropout_chunks
    assert second["removed"] >= 1
    assert "faiss.txt" not in (tmp_path / "v2/chunks.jsonl").read_text()


@pytest.mark.slow
def test_corrupt_or_mismatched_index_is_detected(docs, tmp_path, embedder):
    folder = tmp_path / "index"
    _build(docs, folder, embedder)
    (folder / "dense.faiss").write_bytes(b"garbage")
    with pytest.raises(IndexCorrupt, match="unreadable.*python -m pipeline index"):
        Retriever(folder, embedder=embedder)
    _build(docs, folder, embedder)
    lines = (folder / "chunks.jsonl").read_text().splitlines()
    (folder / "chunks.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(IndexCorrupt, match="faiss holds .* vectors but the chunk store"):
        Retriever(folder, embedder=embedder)
    (folder / "manifest.json").unlink()
    with pytest.raises(IndexCorrupt, match="missing manifest.json"):
        Retriever(folder, embedder=embedder)


@pytest.mark.slow
def test_approximate_indexes_agree_with_exact_search(docs, tmp_path, embedder):
    _build(docs, tmp_path / "flat", embedder, chunk_tokens=32, chunk_overlap=4)
    _build(docs, tmp_path / "hnsw", embedder, chunk_tokens=32, chunk_overlap=4, ann_threshold=0)
    _build(docs, tmp_path / "ivf", embedder, chunk_tokens=32, chunk_overlap=4, ann_threshold=0,
           ann_kind="ivf", ivf_lists=2)
    exact = Retriever(tmp_path / "flat", RetrievalSettings(), embedder)
    for kind in ("hnsw", "ivf"):
        approx = Retriever(tmp_path / kind, RetrievalSettings(nprobe=2), embedder)
        assert json.loads((tmp_path / kind / "manifest.json").read_text())["faiss"] != "IndexFlatIP"
        for query in ("Adam defaults", "dropout rate", "HNSW neighbours"):
            assert [p.chunk_id for p in approx.search(query, 3, "dense")] == \
                   [p.chunk_id for p in exact.search(query, 3, "dense")]


def test_approximate_search_recall_is_measured_against_exact():
    """IVF on 4,000 clustered vectors: visiting a few lists loses some true neighbours (it is
    approximate), visiting all of them finds every one; HNSW sits near exact."""
    import faiss

    from pipeline.retrieval.store import build_faiss

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 32))
    vectors = (centres[rng.integers(0, 40, 4000)] + 0.6 * rng.normal(size=(4000, 32))).astype("float32")
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[rng.choice(4000, 100, replace=False)] + 0.05 * rng.normal(size=(100, 32)).astype("float32")
    exact = build_faiss(vectors, IndexSettings(ann_threshold=10**9))
    _, truth = exact.search(queries, 10)

    def recall(index) -> float:
        _, found = index.search(queries, 10)
        return np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])

    ivf = build_faiss(vectors, IndexSettings(ann_threshold=0, ann_kind="ivf", ivf_lists=64))
    assert isinstance(ivf, faiss.IndexIVFFlat)
    ivf.nprobe = 1
    few = recall(ivf)
    ivf.nprobe = 64
    assert few < 0.9 and recall(ivf) == 1.0, few
    hnsw = build_faiss(vectors, IndexSettings(ann_threshold=0, ann_kind="hnsw"))
    hnsw.hnsw.efSearch = 64
    assert recall(hnsw) > 0.9


def test_rrf_and_mmr_by_hand():
    fused = rrf_fuse([[10, 20, 30], [20, 40]], [1.0, 1.0], rrf_k=60)
    scores = dict(fused)
    assert fused[0][0] == 20 and scores[20] == pytest.approx(1 / 62 + 1 / 61)
    assert scores[10] == pytest.approx(1 / 61) and scores[40] == pytest.approx(1 / 62)
    tilted = dict(rrf_fuse([[10], [40]], [2.0, 1.0], rrf_k=60))
    assert tilted[10] == pytest.approx(2 / 61)
    vectors = np.array([[1, 0], [1, 0], [0, 1]], dtype=np.float32)
    assert [i for i, _ in mmr([(0, 3.0), (1, 2.0), (2, 1.0)], vectors, 2, lam=0.3)] == [0, 2]
    assert [i for i, _ in mmr([(0, 3.0), (1, 2.0), (2, 1.0)], vectors, 2, lam=1.0)] == [0, 1]


def test_score_fusion_by_hand():
    # dense scores 0.9/0.5/0.1 normalise to 1/0.5/0; BM25 12/2 to 1/0
    fused = dict(score_fuse([[(10, 0.9), (20, 0.5), (30, 0.1)], [(20, 12.0), (40, 2.0)]], [0.4, 0.6]))
    assert fused[20] == pytest.approx(0.4 * 0.5 + 0.6 * 1.0)
    assert fused[10] == pytest.approx(0.4) and fused[30] == 0.0 and fused[40] == 0.0
    assert score_fuse([[(7, 3.0)], []], [1.0, 1.0]) == [(7, 1.0)]  # one hit: no spread, still ranked
    with pytest.raises(UserError, match="retrieval.fusion"):
        fuse([(1, 1.0)], [], RetrievalSettings(fusion="max"))


@pytest.mark.slow
def test_cli_index_search_and_trec_run(docs, tmp_path, capsys):
    from pipeline.cli import main

    out = tmp_path / "idx"
    assert main(["index", "--docs", str(docs), "--out", str(out), "--profile", "tiny"]) == 0
    assert "indexed 3 documents" in capsys.readouterr().out
    assert main(["search", "beta2 default", "--index", str(out), "--k", "2", "--profile", "tiny"]) == 0
    assert "adam.md" in capsys.readouterr().out.splitlines()[0]
    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"_id": "q1", "text": "dropout probability"}\n{"_id": "q2", "text": "Kingma"}\n')
    run = tmp_path / "run.tsv"
    assert main(["retrieve", "--index", str(out), "--queries", str(queries), "--k", "2",
                 "--out", str(run), "--profile", "tiny"]) == 0
    lines = [l.split() for l in run.read_text().splitlines()]
    assert lines[0][:4] == ["q1", "Q0", "dropout.md", "1"] and lines[0][5].startswith("alignrag-")
    assert {l[2] for l in lines if l[0] == "q2"} >= {"adam.md"}
    assert len({(l[0], l[2]) for l in lines}) == len(lines), "one line per (query, document)"
    queries.write_text('{"_id": "q1", "text": "ok"}\nnot json\n')
    assert main(["retrieve", "--index", str(out), "--queries", str(queries), "--out", str(run),
                 "--profile", "tiny"]) == 2
    assert "queries.jsonl:2: not a BEIR query" in capsys.readouterr().err
    (out / "dense.faiss").write_bytes(b"x")
    assert main(["search", "x", "--index", str(out), "--profile", "tiny"]) == 2
    assert "rebuild it with: python -m pipeline index" in capsys.readouterr().err


def test_hard_wrapped_paragraphs_are_joined_and_blocks_kept(tmp_path):
    from pipeline.prompt import split_sentences
    from pipeline.retrieval.ingest import join_wrapped_lines, load_documents

    wrapped = ("# Cards\n\nBring a photo ID and a proof of address. Children under\n14 need a parent to sign.\n\n"
               "- lost cards\n- renewals\n\n```\ncode one\ncode two\n```\n")
    joined = join_wrapped_lines(wrapped)
    assert "Children under 14 need a parent to sign." in split_sentences(joined)
    assert "- lost cards\n- renewals" in joined and "```\ncode one\ncode two\n```" in joined
    assert join_wrapped_lines(joined) == joined  # one paragraph a line is left as it is
    (tmp_path / "policy.md").write_text(wrapped)
    documents, _ = load_documents(tmp_path)
    assert "Children under 14 need" in documents[0].text
