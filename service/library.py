"""The service's document library: uploads (size-limited, sanitised names) indexed incrementally.

Uploads live in ``<work>/uploads/``. The served index is rebuilt in ``<work>/index/`` from the
original documents plus the uploads; embeddings are reused by chunk id from the previous build
(the first time, from the index being served), so an upload costs only its own chunks.

A rebuild runs in the caller's thread (a web request's), except for the embedder (the service's
query embedder, shared): it runs as model calls (pipeline/model_calls.py), a few chunks at a
time, so the chat's own model calls take turns with an upload's batches instead of waiting for
all of them.
"""
from __future__ import annotations

import re
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np

from pipeline import model_calls
from pipeline.errors import UserError
from pipeline.retrieval.ingest import SUPPORTED, IngestReport, read_file

MAX_UPLOAD_BYTES = 10 * 2**20
# Chunks embedded per model call during a rebuild: a chat's model call waits for at most one
# such batch (about 0.15 s for 8 chunks of 160 tokens on 2 cores; README, "The chat service").
REBUILD_BATCH = 8
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(filename: str) -> str:
    """A plain file name: no folders, no leading dots, only [A-Za-z0-9._-], a supported type."""
    name = _UNSAFE.sub("_", Path(filename.replace("\\", "/")).name).lstrip("._")
    if not name or Path(name).suffix.lower() not in SUPPORTED:
        raise UserError(f"'{filename}': unsupported file; upload one of {', '.join(sorted(SUPPORTED))}")
    return name


class Library:
    """Uploads and the index rebuilt from them. One change at a time (a lock): two rebuilds
    never share the staging folder. A same-name upload is refused, never silently replaced."""

    def __init__(self, docs_dir: Path | None, served_index: Path, work_dir: Path, index_settings,
                 max_bytes: int = MAX_UPLOAD_BYTES, embedder=None):
        """``embedder``: a loaded pipeline.retrieval.embedder.Embedder to share (the service's
        query embedder); one is loaded on the first rebuild when it is None or another model."""
        self.docs_dir = Path(docs_dir) if docs_dir else None
        self.served_index = Path(served_index)
        self.uploads = Path(work_dir) / "uploads"
        self.index_dir = Path(work_dir) / "index"
        self.settings = index_settings
        self.max_bytes = max_bytes
        self.uploads.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._embedder = embedder
        from pipeline.artifacts import Artifacts

        Artifacts(self.index_dir.parent).recover(self.index_dir.name)  # a rebuild killed mid-swap

    def documents(self) -> list[dict]:
        return [{"name": p.name, "kilobytes": round(p.stat().st_size / 1024, 1)}
                for p in sorted(self.uploads.iterdir()) if p.is_file()]

    def add_path(self, path: Path, filename: str | None = None) -> Path:
        """Add an uploaded file from disk; its size is checked before it is read."""
        size = Path(path).stat().st_size
        if size > self.max_bytes:
            raise UserError(f"'{filename or Path(path).name}' is {size / 2**20:.1f} MB; "
                            f"the limit is {self.max_bytes / 2**20:.0f} MB")
        return self.add(filename or Path(path).name, Path(path).read_bytes())

    def add(self, filename: str, data: bytes) -> Path:
        name = safe_name(filename)
        if len(data) > self.max_bytes:
            raise UserError(f"'{name}' is {len(data) / 2**20:.1f} MB; the limit is {self.max_bytes / 2**20:.0f} MB")
        target = (self.uploads / name).resolve()
        if target.parent != self.uploads.resolve():
            raise UserError(f"'{filename}' would be written outside the documents folder")
        with self._lock:
            if target.exists():
                raise UserError(f"'{name}' is already uploaded; remove it first to replace it")
            target.write_bytes(data)
            return self._index_new(target, name)

    def _index_new(self, target: Path, name: str) -> Path:
        try:
            readable = [d for d in read_file(target, self.uploads, IngestReport()) if d.text.strip()]
        except Exception as err:  # pypdf, bs4 and json raise their own types
            readable, reason = [], str(err)
        else:
            reason = "it holds no text"
        if not readable:
            target.unlink()  # an unreadable upload must not stay in the library
            raise UserError(f"'{name}' cannot be indexed: {reason}")
        try:
            return self._rebuild()
        except BaseException:
            target.unlink(missing_ok=True)  # the last good index keeps serving, without it
            raise

    def remove(self, name: str) -> Path:
        target = (self.uploads / safe_name(name)).resolve()
        with self._lock:
            if target.parent != self.uploads.resolve() or not target.exists():
                raise UserError(f"no uploaded document named '{name}'")
            target.unlink()
            return self._rebuild()

    def rebuild(self) -> Path:
        with self._lock:
            return self._rebuild()

    def _rebuild(self) -> Path:
        """Index documents + uploads into ``index_dir`` (atomically) and return it."""
        from pipeline.artifacts import Artifacts
        from pipeline.retrieval.embedder import Embedder
        from pipeline.retrieval.store import build_index

        previous = self.index_dir if (self.index_dir / "manifest.json").exists() else self.served_index
        with tempfile.TemporaryDirectory(prefix="alignrag-library-") as view:
            view = Path(view)
            if self.docs_dir:
                for path in self.docs_dir.rglob("*"):
                    if path.is_file():
                        link = view / path.relative_to(self.docs_dir)
                        link.parent.mkdir(parents=True, exist_ok=True)
                        link.symlink_to(path.resolve())
            if any(self.uploads.iterdir()):
                (view / "uploads").symlink_to(self.uploads.resolve(), target_is_directory=True)
            if self._embedder is None or self._embedder.name != self.settings.embedder:
                self._embedder = model_calls.run(Embedder, self.settings.embedder, self.settings.batch_size)
            embedder = BatchedModelCalls(self._embedder, min(REBUILD_BATCH, self.settings.batch_size))
            with Artifacts(self.index_dir.parent).publish(self.index_dir.name) as staging:
                build_index(_follow(view), staging, self.settings, embedder, previous)
        return self.index_dir


class BatchedModelCalls:
    """An embedder (pipeline/retrieval/embedder.py) whose ``encode`` runs one batch per model
    call, and a copy of its tokenizer for chunking in the caller's thread: a fast tokenizer
    keeps its padding settings in shared state, so chunking with the embedder's own tokenizer
    while the serving thread embeds a query broke that query's batch ("Unable to create
    tensor", seen in the load test)."""

    def __init__(self, embedder, batch_size: int):
        import copy

        self._embedder = embedder
        self.tokenizer = copy.deepcopy(embedder.tokenizer)
        self.batch_size = max(1, int(batch_size))

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        from tqdm.auto import tqdm

        starts = range(0, len(texts), self.batch_size)
        parts = [model_calls.run(self._embedder.encode, texts[i:i + self.batch_size])
                 for i in tqdm(starts, desc="embedding", unit="batch", disable=not progress or not texts)]
        return np.concatenate(parts) if parts else self._embedder.encode([])


def _follow(view: Path) -> Path:
    """``rglob`` does not descend into symlinked folders: materialise the uploads link."""
    link = view / "uploads"
    if link.is_symlink():
        target = link.resolve()
        link.unlink()
        shutil.copytree(target, link)
    return view
