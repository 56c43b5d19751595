"""The artifacts API: where stages publish output, and how freshness is decided.

``artifacts/<stage>/`` holds a stage's files plus ``meta.json`` (config, fingerprint,
metrics, timings, library versions). Output is built in a temporary sibling folder and
renamed into place only when the stage succeeds, so a failed or interrupted run never
replaces a good artifact with a half-written one.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

from pipeline.errors import UserError

TRACKED_LIBRARIES = ("torch", "transformers", "peft", "trl", "faiss-cpu", "sentence-transformers")


class MissingArtifact(UserError):
    """A stage needs a parent that has not been built."""


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def inputs_digest(paths: list[Path]) -> dict[str, str]:
    """Content hash of every file under ``paths`` (files or folders), keyed by a name relative
    to the repository (or, outside it, to the input's own folder): never an absolute path."""
    from pipeline.freshness import relative_name

    digests = {}
    for root in paths:
        root = Path(root)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for path in files:
            name = relative_name(path)
            if root.is_dir() and name == path.name:  # outside the repository: folder/relative path
                name = f"{root.name}/{path.relative_to(root).as_posix()}"
            digests[name] = file_digest(path) if path.exists() else "missing"
    return digests


def fingerprint(stage: str, parts: dict) -> str:
    """One short hash of a stage's name and its fingerprint parts (pipeline.freshness)."""
    payload = json.dumps({"stage": stage, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


class Artifacts:
    """One folder per stage under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def dir(self, stage: str) -> Path:
        return self.root / stage

    def meta(self, stage: str) -> dict | None:
        path = self.dir(stage) / "meta.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None

    def require(self, stage: str) -> Path:
        """The folder of a built stage, or a clear error saying how to build it."""
        if self.meta(stage) is None:
            raise MissingArtifact(
                f"the '{stage}' artifact is missing in {self.root}; "
                f"build it with: python -m pipeline run --only {stage}"
            )
        return self.dir(stage)

    def recover(self, stage: str) -> None:
        """Undo a swap that a kill interrupted: the old folder moved aside, the new one not yet
        in place. The last good artifact goes back; a half-built staging folder is dropped."""
        final, retired = self.dir(stage), self.root / f".{stage}.old"
        if not final.exists() and retired.exists():
            retired.rename(final)
        shutil.rmtree(self.root / f".{stage}.building", ignore_errors=True)

    @contextmanager
    def publish(self, stage: str):
        """Yield a fresh temporary folder; on success it replaces ``<root>/<stage>``."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.recover(stage)
        staging = self.root / f".{stage}.building"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        final, retired = self.dir(stage), self.root / f".{stage}.old"
        if retired.exists():
            shutil.rmtree(retired)
        if final.exists():
            final.rename(retired)
        staging.rename(final)
        shutil.rmtree(retired, ignore_errors=True)

    @staticmethod
    def write_meta(folder: Path, meta: dict) -> None:
        meta = dict(meta, libraries=library_versions(), written_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        (folder / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
