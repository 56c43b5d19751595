"""The served answer-or-refuse operating point, chosen from a variant's dev-split curve.

Each trained stage writes ``answerability.json``: the refusal-score threshold curve on the dev
split (train records no trainer saw) and, as ``refusal_threshold`` in its metrics, the point of
best balanced accuracy. Serving and eval use the point with the most correct decisions on the
dev split instead: answerable questions outnumber silent ones (about 3 to 1 in both splits),
and on the quick profile the balanced point refused 39% of answerable dev questions to abstain
on 71% of silent ones, where the most-correct point refuses 2% and abstains on 20%
(sft; docs/architecture.md). Never chosen on eval.
"""
from __future__ import annotations

import json


def most_correct(curve: list[dict], answerable: int, silent: int) -> dict:
    """The curve point with the most right decisions: answered answerable + refused silent."""
    return max(curve, key=lambda p: (1 - p["false_refusal"]) * answerable + p["abstention"] * silent)


def served_threshold(artifacts, variant: str) -> float | None:
    """The threshold eval and the engine use for ``variant`` (None: base, or no curve)."""
    if variant == "base" or artifacts.meta(variant) is None:
        return None
    path = artifacts.dir(variant) / "answerability.json"
    if not path.exists():
        return (artifacts.meta(variant) or {}).get("metrics", {}).get("refusal_threshold")
    record = json.loads(path.read_text())
    if not record.get("curve"):
        return None
    silent = record["dev_silent"]
    return most_correct(record["curve"], record["dev_rows"] - silent, silent)["threshold"]
