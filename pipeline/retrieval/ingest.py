"""Read a folder of documents into ``Document`` records.

Formats: ``.md``, ``.txt``, ``.html``/``.htm``, ``.pdf`` (pypdf) and BEIR-style ``.jsonl``
corpora (``{"_id", "title", "text"}`` a line). Unreadable, empty or binary files are
skipped with one warning each and a summary at the end; non-UTF-8 text is decoded with
replacement characters and reported.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UserError

log = logging.getLogger("pipeline.ingest")

SUPPORTED = {".md", ".markdown", ".txt", ".html", ".htm", ".pdf", ".jsonl"}


class EmptyCorpus(UserError):
    """A folder with no readable document in it."""


@dataclass
class Document:
    doc_id: str  # stable id: relative path, or the BEIR ``_id``
    source: str  # relative path of the file it came from
    title: str
    text: str
    kind: str  # "markdown", "text", "html", "pdf" or "beir"


@dataclass
class IngestReport:
    read: int = 0
    skipped: list[str] = field(default_factory=list)  # "path: reason"
    replaced_bytes: list[str] = field(default_factory=list)  # files decoded with replacement

    def summary(self) -> str:
        return (f"{self.read} documents read, {len(self.skipped)} skipped, "
                f"{len(self.replaced_bytes)} decoded with replacement characters")


def _decode(raw: bytes, path: str, report: IngestReport) -> str:
    if b"\x00" in raw[:4096]:
        raise ValueError("binary file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        report.replaced_bytes.append(path)
        log.warning("%s: not valid UTF-8, decoded with replacement characters", path)
        return raw.decode("utf-8", errors="replace")


# A line that opens a block of its own: a heading, a list item, a table row, a quote, a code
# fence or an indented code line.
_BLOCK = re.compile(r"^\s*(?:#|[-*+]\s|\d+[.)]\s|\||>|```|~~~)|^ {4}|^\t")


def join_wrapped_lines(text: str) -> str:
    """Paragraphs hard-wrapped across lines, joined into one line each.

    Sentences are split at line breaks (pipeline/prompt.py), so a paragraph wrapped mid-sentence
    would become fragments ("Bring a", "Children under 14 need a"). A line joins the one before
    it when both hold text and neither opens a block (``_BLOCK``); code fences are kept as they
    are. On documents wrapped at about 95 characters (data/ood) copy decoding's key facts went
    from 0.765 to 0.853 with their paragraphs joined."""
    lines: list[str] = []
    fenced = False
    for line in text.split("\n"):
        fence = line.lstrip().startswith(("```", "~~~"))
        previous = lines[-1] if lines else ""
        if (not fenced and not fence and line.strip() and previous.strip()
                and not _BLOCK.match(line) and not _BLOCK.match(previous)):
            lines[-1] = previous.rstrip() + " " + line.strip()
        else:
            lines.append(line)
        fenced ^= fence
    return "\n".join(lines)


def _markdown_title(text: str, fallback: str) -> str:
    for line in text.splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return fallback


def _read_html(text: str) -> tuple[str, str | None]:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(text, "html.parser")
    for tag in soup(["script", "style", "nav", "footer"]):
        tag.decompose()
    title = soup.title.get_text(strip=True) if soup.title else None
    return soup.get_text("\n", strip=True), title


def _read_pdf(path: Path) -> str:
    from pypdf import PdfReader

    return "\n\n".join((page.extract_text() or "") for page in PdfReader(str(path)).pages)


def _read_beir(text: str, rel: str) -> list[Document]:
    docs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            doc_id, body = str(record["_id"]), str(record["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"line {number}: not a BEIR record ({err})") from None
        docs.append(Document(doc_id, rel, str(record.get("title") or doc_id), body, "beir"))
    return docs


def read_file(path: Path, root: Path, report: IngestReport) -> list[Document]:
    rel = str(path.relative_to(root))
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        text, title = _read_pdf(path), path.stem
    else:
        text = _decode(path.read_bytes(), rel, report)
        if suffix == ".jsonl":
            return _read_beir(text, rel)
        title = path.stem
        if suffix in {".html", ".htm"}:
            text, html_title = _read_html(text)
            title = html_title or title
        elif suffix in {".md", ".markdown"}:
            title = _markdown_title(text, path.stem)
    kind = {".pdf": "pdf", ".html": "html", ".htm": "html", ".txt": "text"}.get(suffix, "markdown")
    if kind != "html":  # HTML's text comes one element a line, never wrapped
        text = join_wrapped_lines(text)
    return [Document(rel, rel, title, text, kind)]


def load_documents(folder: str | Path) -> tuple[list[Document], IngestReport]:
    """Every readable document under ``folder``; raises ``EmptyCorpus`` if there is none."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"documents folder '{root}' does not exist")
    report, documents = IngestReport(), []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(path.relative_to(root))
        if path.name.startswith(".") or path.suffix.lower() not in SUPPORTED:
            if not path.name.startswith("."):
                report.skipped.append(f"{rel}: unsupported type '{path.suffix}'")
                log.warning("skipping %s: unsupported type '%s'", rel, path.suffix)
            continue
        try:
            found = [d for d in read_file(path, root, report) if d.text.strip()]
            if not found:
                raise ValueError("empty")
        except Exception as err:  # one bad file must not stop the others
            report.skipped.append(f"{rel}: {err}")
            log.warning("skipping %s: %s", rel, err)
            continue
        documents.extend(found)
        report.read += 1
    log.info("ingest: %s", report.summary())
    if not documents:
        raise EmptyCorpus(f"no readable documents in '{root}' ({report.summary()})")
    return documents, report
