"""QA records: the schema, loading with line-level errors, and ``data check``.

A record (one JSON object a line in data/qa/train.jsonl or eval.jsonl)::

    id        unique string
    question  the user's question
    answer    reference answer, or null when the documents hold no answer
    doc       source document (relative to the docs folder), or null when unanswerable
    facts     list of facts; each fact a list of alternative spellings; [] when unanswerable
    history   optional [[question, answer], ...]: earlier turns a follow-up depends on
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.data.normalize import contains_fact, normalize
from pipeline.errors import UserError

SPLITS = ("train", "eval")


class DataError(UserError):
    """One or more problems in the data files; the message lists them as file:line: problem."""


@dataclass
class QARecord:
    id: str
    question: str
    answer: str | None
    doc: str | None
    facts: list[list[str]]
    history: list[tuple[str, str]] = field(default_factory=list)

    @property
    def answerable(self) -> bool:
        return self.answer is not None


def _parse(line: str) -> QARecord:
    raw = json.loads(line)
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in ("id", "question", "answer", "doc", "facts") if k not in raw]
    if missing:
        raise ValueError(f"missing field(s): {', '.join(missing)}")
    unknown = set(raw) - {"id", "question", "answer", "doc", "facts", "history"}
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
    if not isinstance(raw["id"], str) or not raw["id"]:
        raise ValueError("'id' must be a non-empty string")
    if not isinstance(raw["question"], str) or not raw["question"].strip():
        raise ValueError("'question' must be a non-empty string")
    if raw["answer"] is not None and not isinstance(raw["answer"], str):
        raise ValueError("'answer' must be a string or null")
    facts = raw["facts"]
    if not isinstance(facts, list) or not all(
            isinstance(f, list) and f and all(isinstance(a, str) and a for a in f) for f in facts):
        raise ValueError("'facts' must be a list of non-empty lists of strings")
    history = raw.get("history", [])
    if not isinstance(history, list) or not all(
            isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in history):
        raise ValueError("'history' must be a list of [question, answer] pairs")
    if raw["answer"] is None and (facts or raw["doc"] is not None):
        raise ValueError("an unanswerable record (answer null) must have no facts and doc null")
    if raw["answer"] is not None and (not facts or not raw["doc"]):
        raise ValueError("an answerable record needs 'doc' and at least one fact")
    return QARecord(raw["id"], raw["question"], raw["answer"], raw["doc"], facts,
                    [tuple(t) for t in history])


def read_records(path: Path) -> tuple[list[QARecord], list[str]]:
    """Records that parse, and one 'file:line: problem' string per line that does not."""
    records, problems = [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(_parse(line))
        except json.JSONDecodeError as err:
            problems.append(f"{path}:{number}: not valid JSON ({err.msg})")
        except ValueError as err:
            problems.append(f"{path}:{number}: {err}")
    return records, problems


def in_dev_split(record_id: str, share: float) -> bool:
    """Whether a train record belongs to the dev split (held back from every trainer; settings
    are chosen on it). A hash of the id, so the split never depends on file order."""
    import hashlib

    return int(hashlib.sha1(record_id.encode()).hexdigest(), 16) % 1000 < share * 1000


def split_dev(records: list["QARecord"], share: float) -> tuple[list["QARecord"], list["QARecord"]]:
    """(dev split, the rest) of the train records, by ``in_dev_split``."""
    dev = [r for r in records if in_dev_split(r.id, share)]
    return dev, [r for r in records if not in_dev_split(r.id, share)]


def sample_records(records: list["QARecord"], most: int, rng) -> list["QARecord"]:
    """At most ``most`` of ``records`` drawn by ``rng`` (all when ``most`` is 0): the dataset
    stage's sample (``dataset.max_records``; the tiny profile uses a few)."""
    return rng.sample(records, min(most, len(records))) if most else records


def load_split(qa_dir: Path, split: str) -> list[QARecord]:
    """All records of a split; raises ``DataError`` listing every bad line."""
    path = Path(qa_dir) / f"{split}.jsonl"
    if not path.exists():
        raise DataError(f"{path} does not exist")
    records, problems = read_records(path)
    if problems:
        raise DataError("\n".join(problems))
    return records


def check(qa_dir: Path, docs_dir: Path) -> dict:
    """Validate both splits against the schema and the documents; return the counts."""
    problems, splits = [], {}
    for split in SPLITS:
        path = Path(qa_dir) / f"{split}.jsonl"
        if not path.exists():
            problems.append(f"{path}: missing")
            continue
        records, bad = read_records(path)
        problems += bad
        splits[split] = records
        seen: dict[str, int] = {}
        doc_text: dict[str, str] = {}
        for record in records:
            where = f"{path}: id {record.id}"
            seen[record.id] = seen.get(record.id, 0) + 1
            if not record.answerable:
                continue
            for fact in record.facts:
                if not contains_fact(record.answer, fact):
                    problems.append(f"{where}: the answer does not contain the fact {fact}")
            doc = Path(docs_dir) / record.doc
            if record.doc not in doc_text:
                doc_text[record.doc] = doc.read_text(encoding="utf-8") if doc.exists() else ""
            if not doc_text[record.doc]:
                problems.append(f"{where}: document '{record.doc}' not found in {docs_dir}")
            elif any(not contains_fact(doc_text[record.doc], fact) for fact in record.facts):
                problems.append(f"{where}: a fact is not in '{record.doc}'")
        problems += [f"{path}: duplicate id '{i}' ({n} times)" for i, n in seen.items() if n > 1]
    if len(splits) == 2:
        train_ids = {r.id for r in splits["train"]}
        problems += [f"id '{r.id}' is in both train and eval" for r in splits["eval"] if r.id in train_ids]
        train_questions = {normalize(r.question) for r in splits["train"]}
        problems += [f"eval question '{r.question}' ({r.id}) also appears in train"
                     for r in splits["eval"] if normalize(r.question) in train_questions]
    if problems:
        raise DataError(f"{len(problems)} problem(s):\n" + "\n".join(problems))
    return counts(splits)


def counts(splits: dict[str, list[QARecord]]) -> dict:
    report = {}
    train_docs = {r.doc for r in splits.get("train", []) if r.doc}
    for split, records in splits.items():
        unanswerable = sum(not r.answerable for r in records)
        report[split] = {
            "records": len(records), "unanswerable": unanswerable,
            "unanswerable_share": round(unanswerable / max(1, len(records)), 3),
            "follow_ups": sum(bool(r.history) for r in records),
            "documents": len({r.doc for r in records if r.doc}),
        }
    if "eval" in splits:
        report["eval"]["documents_unseen_in_train"] = sorted(
            {r.doc for r in splits["eval"] if r.doc and r.doc not in train_docs})
    return report
