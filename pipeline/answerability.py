"""Choosing the answer-or-refuse threshold on the dev split, and its operating curve.

A trained variant refuses when the refusal's mean token log-probability given the prompt
(pipeline.generation.refusal_scores) is above a threshold. The threshold is chosen on the
dev split (``sft_val.jsonl``: train records no trainer saw), never on eval. The one that
maximises balanced accuracy, (abstention on silent prompts + answering on answerable ones) / 2,
the earliest of equals, is recorded in the stage's metrics; eval and the engine serve the
point with the most correct decisions (``most_correct``). The whole curve is recorded.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.prompt import REFUSAL


def candidate_thresholds(scores: list[float]) -> list[float]:
    """Every midpoint between the sorted distinct scores, plus one below and one above them all:
    each distinct way to split the scores into refuse (above) and answer."""
    ordered = sorted(set(scores))
    return [ordered[0] - 1.0] + [(a + b) / 2 for a, b in zip(ordered, ordered[1:])] + [ordered[-1] + 1.0]


def operating_curve(scores: list[float], should_refuse: list[bool]) -> list[dict]:
    """For each candidate threshold: abstention (refused / should refuse) and false refusal
    (refused / should answer)."""
    if not scores:
        return []
    silent = sum(should_refuse) or 1
    answerable = (len(should_refuse) - sum(should_refuse)) or 1
    curve = []
    for cut in candidate_thresholds(scores):
        refused = [s > cut for s in scores]
        curve.append({"threshold": round(cut, 5),
                      "abstention": round(sum(r and q for r, q in zip(refused, should_refuse)) / silent, 4),
                      "false_refusal": round(sum(r and not q for r, q in zip(refused, should_refuse)) / answerable, 4)})
    return curve


def best_threshold(curve: list[dict]) -> dict:
    """The curve point with the highest balanced accuracy."""
    return max(curve, key=lambda p: p["abstention"] + 1 - p["false_refusal"])


def calibrate(model, tokenizer, dev_rows: list[dict], out_dir: Path, batch_size: int = 8) -> dict:
    """Score the dev prompts, choose the threshold, write ``answerability.json``; return metrics."""
    from pipeline.generation import refusal_scores

    if not dev_rows:
        return {"refusal_threshold": None}
    prompts = [row["prompt"] for row in dev_rows]
    should_refuse = [row["completion"][0]["content"] == REFUSAL for row in dev_rows]
    scores = refusal_scores(model.eval(), tokenizer, prompts, batch_size, desc="dev refusal scores")
    curve = operating_curve(scores, should_refuse)
    best = best_threshold(curve)
    (Path(out_dir) / "answerability.json").write_text(json.dumps(
        {"chosen": best, "dev_rows": len(dev_rows), "dev_silent": sum(should_refuse), "curve": curve},
        indent=1))
    return {"refusal_threshold": best["threshold"], "dev_abstention": best["abstention"],
            "dev_false_refusal": best["false_refusal"], "dev_rows": len(dev_rows)}


def most_correct(curve: list[dict], answerable: int, silent: int) -> dict:
    """The curve point with the most right decisions: answered answerable + refused silent.

    This is the served point. Answerable questions outnumber silent ones (about 3 to 1 in both
    splits); on the quick profile the balanced point for sft refused 39% of answerable dev
    questions to abstain on 71% of silent ones, where this point refuses 2% and abstains on 20%."""
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
