"""The stage runner: decide what is stale, run it, publish it, report status.

A stage is up to date when the fingerprint in its ``meta.json`` equals the one computed
now from its config section, its input files, its parents' fingerprints and its code.
"""
from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError
from pipeline.artifacts import Artifacts, MissingArtifact, fingerprint, inputs_digest
from pipeline.freshness import code_digests, fingerprint_parts, stale_reasons
from pipeline.stages import REGISTRY

log = logging.getLogger("pipeline")


class UnknownStage(UserError):
    pass


@dataclass
class StageContext:
    """What a stage's ``run`` gets besides its own config."""

    name: str
    out_dir: Path  # temporary folder; becomes artifacts/<name>/ on success
    artifacts: Artifacts  # read parents through this
    config: object  # the whole PipelineConfig, for stages that read a sibling section
    reports_dir: Path
    log: logging.Logger

    def parent(self, stage: str) -> Path:
        return self.artifacts.require(stage)


def check_stage(name: str) -> None:
    if name not in REGISTRY:
        raise UnknownStage(f"unknown stage '{name}'; stages are: {', '.join(REGISTRY)}")


def _config_for(cfg, name: str) -> dict:
    module = REGISTRY[name]
    sections = {name: dataclasses.asdict(getattr(cfg, name))}
    for extra in getattr(module, "CONFIG_SECTIONS", ()):
        sections[extra] = dataclasses.asdict(getattr(cfg, extra))
    return {"seed": cfg.seed, **sections}


def current_parts(cfg, name: str, artifacts: Artifacts) -> dict | None:
    """The fingerprint parts ``name`` would have if built now; None while a parent is missing."""
    module = REGISTRY[name]
    parents = {}
    for parent in module.PARENTS:
        meta = artifacts.meta(parent)
        if meta is None:
            return None
        parents[parent] = meta["fingerprint"]
    for parent in getattr(module, "OPTIONAL_PARENTS", ()):  # used when built (eval's variants)
        meta = artifacts.meta(parent)
        parents[parent] = meta["fingerprint"] if meta else "not built"
    return fingerprint_parts(_config_for(cfg, name), inputs_digest(module.inputs(cfg)), parents,
                             code_digests(module.__name__))


def current_fingerprint(cfg, name: str, artifacts: Artifacts) -> str | None:
    parts = current_parts(cfg, name, artifacts)
    return None if parts is None else fingerprint(name, parts)


def explain(cfg, name: str, artifacts: Artifacts) -> tuple[str, list[str]]:
    """(state, reasons): "built", "stale" or "missing", and why a stage is not built.

    A stage is stale when its own fingerprint changed or when any parent is not built."""
    meta = artifacts.meta(name)
    if meta is None:
        return "missing", []
    module = REGISTRY[name]
    reasons = []
    for parent in module.PARENTS:
        parent_state, _ = explain(cfg, parent, artifacts)
        if parent_state != "built":
            reasons.append(f"parent {parent} is {parent_state}")
    parts = current_parts(cfg, name, artifacts)
    if parts is not None and meta.get("fingerprint") != fingerprint(name, parts):
        reasons += stale_reasons(meta.get("fingerprint_parts"), parts) or ["fingerprint changed"]
    return ("stale" if reasons else "built"), reasons


def state(cfg, name: str, artifacts: Artifacts) -> str:
    return explain(cfg, name, artifacts)[0]


def plan(only: str | None = None, start: str | None = None) -> list[str]:
    """Stages to consider, in order. Staleness is checked as each one runs."""
    names = list(REGISTRY)
    if only:
        check_stage(only)
        return [only]
    if start:
        check_stage(start)
        return names[names.index(start):]
    return names


def process_rank() -> int:
    """This process's rank under `accelerate launch` / torchrun (0 when run plainly)."""
    import os

    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np
        import torch

        np.random.seed(seed)
        torch.manual_seed(seed)
    except ImportError:
        pass


def run_stage(cfg, name: str, artifacts: Artifacts, force: bool = False) -> dict | None:
    """Build ``name`` if stale (or forced). Returns its metrics, or None when skipped."""
    module = REGISTRY[name]
    for parent in module.PARENTS:
        if artifacts.meta(parent) is None:
            raise MissingArtifact(
                f"stage '{name}' needs '{parent}', which is not built; "
                f"run: python -m pipeline run --only {parent}  (or run the whole pipeline)"
            )
    parts = current_parts(cfg, name, artifacts)
    fp = fingerprint(name, parts)
    meta = artifacts.meta(name)
    if not force and meta is not None and meta.get("fingerprint") == fp:
        log.info("%-8s up to date (%s)", name, fp)
        return None
    log.info("%-8s building ...", name)
    if process_rank() != 0:  # under `accelerate launch`, only rank 0 publishes the artifact
        import tempfile

        with tempfile.TemporaryDirectory(prefix=f"{name}-rank{process_rank()}-") as scratch:
            ctx = StageContext(name, Path(scratch), artifacts, cfg, Path(scratch), log.getChild(name))
            _seed_everything(cfg.seed)
            return module.run(getattr(cfg, name), ctx) or {}
    reports_dir = cfg.paths.resolve("reports")
    reports_dir.mkdir(parents=True, exist_ok=True)
    with artifacts.publish(name) as out_dir:
        handler = logging.FileHandler(out_dir / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        started = time.time()
        try:
            _seed_everything(cfg.seed)
            ctx = StageContext(name, out_dir, artifacts, cfg, reports_dir, log.getChild(name))
            metrics = module.run(getattr(cfg, name), ctx) or {}
            seconds = round(time.time() - started, 2)
            artifacts.write_meta(out_dir, {
                "stage": name, "fingerprint": fp, "fingerprint_parts": parts, "profile": cfg.profile,
                "config": _config_for(cfg, name), "parents": list(module.PARENTS),
                "metrics": metrics, "seconds": seconds,
            })
            log.info("%-8s built in %.1fs: %s", name, seconds, _short(metrics))
        finally:
            logging.getLogger().removeHandler(handler)
            handler.close()
    return metrics


def run_pipeline(cfg, only=None, start=None, force=False) -> dict[str, dict | None]:
    artifacts = Artifacts(cfg.paths.resolve("artifacts"))
    results = {}
    for name in plan(only, start):
        forced = force or (start is not None)
        results[name] = run_stage(cfg, name, artifacts, force=forced)
    return results


def _short(metrics: dict, n: int = 3) -> str:
    items = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float))][:n]
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)


def status_table(cfg) -> str:
    """Stage, state, when built, seconds and key metrics; below, why each stale stage is stale."""
    artifacts = Artifacts(cfg.paths.resolve("artifacts"))
    rows = [("stage", "state", "built at", "seconds", "key metrics")]
    why = []
    for name in REGISTRY:
        meta = artifacts.meta(name) or {}
        stage_state, reasons = explain(cfg, name, artifacts)
        rows.append((name, stage_state, meta.get("written_at", "-"),
                     str(meta.get("seconds", "-")), _short(meta.get("metrics", {})) or "-"))
        if reasons:
            shown = reasons[:6] + ([f"... {len(reasons) - 6} more"] if len(reasons) > 6 else [])
            why.append(f"{name} is stale: " + "; ".join(shown))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    table = "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4] for row in rows
    )
    return table + ("\n\n" + "\n".join(why) if why else "")
