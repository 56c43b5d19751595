"""Thumbs up / down and better answers, stored in SQLite; exported as DPO preference pairs."""
from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    variant TEXT NOT NULL,
    prompt TEXT NOT NULL,          -- JSON: the exact chat messages the model answered
    answer TEXT NOT NULL,
    rating INTEGER NOT NULL,       -- +1 thumbs up, -1 thumbs down
    better_answer TEXT             -- optional correction written by the user
)"""


class FeedbackStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(SCHEMA)

    def _connect(self):
        return sqlite3.connect(self.path)

    def record(self, variant: str, prompt: list[dict], answer: str, rating: int,
               better_answer: str | None = None) -> int:
        if rating not in (1, -1):
            raise ValueError("rating must be +1 or -1")
        with self._connect() as db:
            cursor = db.execute(
                "INSERT INTO feedback (created, variant, prompt, answer, rating, better_answer) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), variant, json.dumps(prompt), answer, rating, (better_answer or "").strip() or None))
            return int(cursor.lastrowid)

    def rows(self) -> list[dict]:
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM feedback ORDER BY id")]


def export_pairs(store: FeedbackStore, out: Path) -> int:
    """Preference pairs in the dataset stage's format: a better answer beats the rated one;
    a thumbs-up answer beats a thumbs-down answer to the same prompt."""
    rows = store.rows()
    pairs = []
    for row in rows:
        if row["better_answer"] and row["better_answer"] != row["answer"]:
            pairs.append((row, row["better_answer"], row["answer"]))
    by_prompt: dict[str, dict[int, list[dict]]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt"], {}).setdefault(row["rating"], []).append(row)
    for groups in by_prompt.values():
        for good in groups.get(1, []):
            for bad in groups.get(-1, []):
                if good["answer"] != bad["answer"]:
                    pairs.append((good, good["answer"], bad["answer"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        for row, chosen, rejected in pairs:
            fh.write(json.dumps({"id": f"feedback-{row['id']}", "kind": "user_feedback",
                                 "prompt": json.loads(row["prompt"]),
                                 "chosen": [{"role": "assistant", "content": chosen}],
                                 "rejected": [{"role": "assistant", "content": rejected}]}) + "\n")
    return len(pairs)
