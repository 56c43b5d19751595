"""Stage `reader`: the cross-encoder that copy decoding scores sentences with (pipeline/reader.py).

Reads:  data/qa/train.jsonl (the records outside the dataset stage's dev split, never
        eval.jsonl) and the `index` artifact (retrieval as served; its embedder is the
        starting point).
Writes: artifacts/reader/adapter/ (its LoRA adapter and one-logit head), reader.json (the
        model under it) and meta.json: training figures and, on the dev split's questions
        retrieved as served, how often the reader's best sentence holds the facts (beside word
        overlap's best sentence) and how well its best score tells silent questions from
        answerable ones (AUC).
Alone:  python -m pipeline run --only reader
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.reader import ReaderSettings

PARENTS = ("index",)
CONFIG_SECTIONS = ("retrieval", "dataset")  # the dataset stage's dev split is left out here too


@dataclass
class Config(ReaderSettings):
    max_questions: int = 0  # train questions used (0 = all outside the dev split)


def inputs(cfg) -> list[Path]:
    return [cfg.paths.resolve("qa") / "train.jsonl"]


def dev_report(reader, records, retriever) -> dict:
    """Best-sentence accuracy (reader and word overlap) and silence AUC on ``records``."""
    from sklearn.metrics import roc_auc_score

    from pipeline.candidates import right, word_overlap
    from pipeline.prompt import strip_citations
    from pipeline.reader import served_candidates

    reader_right = overlap_right = answerable = 0
    best, silent = [], []
    for record in records:
        question, replies, headings = served_candidates(record, retriever)
        sentences = [strip_citations(r) for r in replies]
        scores = reader.scores(question, sentences, headings)
        best.append(float(scores.max()) if len(scores) else -20.0)
        silent.append(not record.answerable)
        if record.answerable and replies:
            answerable += 1
            reader_right += right(replies[int(np.argmax(scores))], record.facts)
            overlap_right += right(replies[int(np.argmax([word_overlap(question, s) for s in sentences]))],
                                   record.facts)
    both = 0 < sum(silent) < len(silent)
    return {"dev_questions": len(records), "dev_answerable": answerable,
            "dev_reader_best_sentence_right": reader_right, "dev_overlap_best_sentence_right": overlap_right,
            "dev_silence_auc": round(roc_auc_score(silent, [-b for b in best]), 4) if both else None}


def run(config: Config, ctx) -> dict:
    from pipeline.data.records import load_split, split_dev
    from pipeline.reader import Reader, labelled_pairs, train
    from pipeline.retrieval.retriever import Retriever

    cfg = ctx.config
    dev, used = split_dev(load_split(cfg.paths.resolve("qa"), "train"), cfg.dataset.validation_share)
    if config.max_questions:
        used = random.Random(cfg.seed).sample(used, min(config.max_questions, len(used)))
    retriever = Retriever(ctx.parent("index"), cfg.retrieval)
    manifest = json.loads((ctx.parent("index") / "manifest.json").read_text())
    ctx.log.info("reader: labelling the shown sentences of %d train questions", len(used))
    metrics = train(labelled_pairs(used, retriever), manifest["embedder"], ctx.out_dir, config)
    ctx.log.info("reader: scoring the %d dev questions", len(dev))
    return {"train_questions": len(used), **metrics, **dev_report(Reader(ctx.out_dir), dev, retriever)}
