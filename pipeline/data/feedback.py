"""Thumbs up / down and better answers, stored in SQLite; exported as DPO preference pairs.

Anyone who can reach the chat can type a "better answer", so every row is stored as
``pending``; only rows a person approved (``data export-feedback --approve ...``) become
preference pairs.
"""
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
    better_answer TEXT,            -- optional correction written by the user
    review TEXT NOT NULL DEFAULT 'pending'  -- pending, approved or rejected
)"""
REVIEWS = ("pending", "approved", "rejected")


class FeedbackStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute(SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(feedback)")}
            if "review" not in columns:  # a database from before reviews: its rows start pending
                db.execute("ALTER TABLE feedback ADD COLUMN review TEXT NOT NULL DEFAULT 'pending'")

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

    def rows(self, review: str | None = None) -> list[dict]:
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            if review is None:
                return [dict(r) for r in db.execute("SELECT * FROM feedback ORDER BY id")]
            return [dict(r) for r in db.execute("SELECT * FROM feedback WHERE review = ? ORDER BY id", (review,))]

    def set_review(self, ids: list[int], review: str) -> int:
        """Mark rows approved / rejected / pending; returns how many rows exist among ``ids``."""
        if review not in REVIEWS:
            raise ValueError(f"review must be one of {REVIEWS}")
        with self._connect() as db:
            return sum(db.execute("UPDATE feedback SET review = ? WHERE id = ?", (review, i)).rowcount for i in ids)


def export_pairs(store: FeedbackStore, out: Path) -> int:
    """Preference pairs in the dataset stage's format, from approved rows only: a better
    answer beats the rated one; a thumbs-up answer beats a thumbs-down answer to the same prompt."""
    rows = store.rows("approved")
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
