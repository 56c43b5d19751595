"""`python -m pipeline reader-holdout`: how a reader recipe reads train questions it never saw.

The train questions outside the dev split are shuffled (seeded) and halved; a reader is
trained on the first half with the `reader` config section (overrides included: `python -m
pipeline reader-holdout reader.epochs=2`) and scored on the second with the stage's own
figures (best sentence right, silence AUC). Train split only, never dev or eval: this is where
reader recipes are compared. The reader it trains goes to a temporary folder; the built
`reader` stage is not touched.
"""
from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path


def halves(records: list, share: float, seed: int) -> tuple[list, list]:
    """(trained on, scored on): the records outside the dev split, shuffled by ``seed``, halved."""
    from pipeline.data.records import split_dev

    _, rest = split_dev(records, share)
    rest = list(rest)
    random.Random(seed).shuffle(rest)
    return rest[: len(rest) // 2], rest[len(rest) // 2:]


def holdout(cfg) -> dict:
    from pipeline.artifacts import Artifacts
    from pipeline.data.records import load_split
    from pipeline.reader import Reader, labelled_pairs, train
    from pipeline.retrieval.retriever import Retriever
    from pipeline.stages.reader import dev_report

    index = Artifacts(cfg.paths.resolve("artifacts")).require("index")
    fit, scored = halves(load_split(cfg.paths.resolve("qa"), "train"), cfg.dataset.validation_share, cfg.seed)
    retriever = Retriever(index, cfg.retrieval)
    embedder = json.loads((index / "manifest.json").read_text())["embedder"]
    with tempfile.TemporaryDirectory(prefix="reader-holdout-") as folder:
        trained = train(labelled_pairs(fit, retriever), embedder, Path(folder), cfg.reader)
        report = dev_report(Reader(Path(folder)), scored, retriever)
    return {"trained_on": len(fit), **trained,
            **{key.replace("dev_", "held_out_", 1): value for key, value in report.items()}}
