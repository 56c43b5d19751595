"""Split documents into chunks sized in tokens of the embedder's tokenizer.

Markdown is split on its headers first (the header path is kept as metadata and prepended
to the text that gets embedded); every section, and every other kind of text, is then
split recursively. Chunk ids come from the source and the content, so they are stable
across rebuilds and change only when the chunk does.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from pipeline.retrieval.ingest import Document

HEADERS = [("#", "h1"), ("##", "h2"), ("###", "h3")]


@dataclass
class Chunk:
    chunk_id: str  # sha1 of source and text, 16 hex digits
    doc_id: str
    source: str
    title: str
    headers: str  # "Title > Section > Subsection" for Markdown; the title elsewhere
    text: str

    @property
    def embed_text(self) -> str:
        """What is embedded and BM25-indexed: the header path gives a chunk its topic."""
        return f"{self.headers}\n{self.text}"

    def to_dict(self) -> dict:
        return asdict(self)


def chunk_id(source: str, text: str) -> str:
    return hashlib.sha1(f"{source}\n{text}".encode()).hexdigest()[:16]


def _sections(doc: Document) -> list[tuple[str, str]]:
    if doc.kind != "markdown":
        return [(doc.title, doc.text)]
    from langchain_text_splitters import MarkdownHeaderTextSplitter

    splitter = MarkdownHeaderTextSplitter(HEADERS, strip_headers=True)
    sections = []
    for part in splitter.split_text(doc.text):
        path = [part.metadata[key] for _, key in HEADERS if key in part.metadata]
        if not path or path[0] != doc.title:
            path.insert(0, doc.title)
        sections.append((" > ".join(path), part.page_content))
    return sections


def make_splitter(tokenizer, chunk_tokens: int, overlap_tokens: int):
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    if overlap_tokens >= chunk_tokens:
        raise ValueError(f"chunk overlap ({overlap_tokens}) must be below chunk size ({chunk_tokens})")
    return RecursiveCharacterTextSplitter.from_huggingface_tokenizer(
        tokenizer, chunk_size=chunk_tokens, chunk_overlap=overlap_tokens)


def chunk_documents(documents: list[Document], splitter) -> list[Chunk]:
    chunks, seen = [], set()
    for doc in documents:
        for headers, body in _sections(doc):
            for piece in splitter.split_text(body):
                piece = piece.strip()
                if not piece:
                    continue
                cid = chunk_id(doc.source + "#" + doc.doc_id, headers + "\n" + piece)
                if cid in seen:  # identical text in one document: keep it once
                    continue
                seen.add(cid)
                chunks.append(Chunk(cid, doc.doc_id, doc.source, doc.title, headers, piece))
    return chunks
