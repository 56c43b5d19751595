"""Stage `dataset`: SFT conversations, preference pairs and PPO prompts from the QA records.

Reads:  data/qa/train.jsonl (never eval.jsonl, which only the eval stage reads), the
        `index` artifact (the real retriever, with the service's `retrieval` settings) and
        the `base` artifact (for on-policy negatives: the base model's own failing answers).
Writes: artifacts/dataset/ with sft.jsonl (conversational prompt/completion, so TRL puts the
        loss on the answer only), prefs.jsonl (prompt/chosen/rejected), prompts.jsonl, and
        sft_val.jsonl, prefs_val.jsonl (a validation slice of train records that no
        trainer sees, for held-out loss and pairwise accuracy), and meta.json with counts.
Alone:  python -m pipeline run --only dataset

Every prompt is built by pipeline.prompt.build_messages, exactly as the service builds it.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.normalize import contains_fact
from pipeline.prompt import REFUSAL, build_messages, is_refusal, retrieval_query

PARENTS = ("base", "index")
CONFIG_SECTIONS = ("retrieval",)
REJECTION_KINDS = ("other_document_fact", "ignores_context", "false_refusal", "rambling",
                   "wrong_citation", "invented_answer", "on_policy")


@dataclass
class Config:
    max_records: int = 0  # use at most this many train records (0 = all); tiny uses a few
    validation_share: float = 0.1  # train records held back from every trainer, for val metrics
    insert_gold: bool = True  # put the gold passage in the prompt when retrieval missed it
    rejected_per_record: int = 2  # preference pairs built from each record
    refusal_drills: float = 0.15  # share of answerable records also shown without their document
    # Cap on refusals among the SFT rows (0 = no cap). Without it a third of the rows are
    # refusals, and a briefly trained model learns refusing as the safe default (measured:
    # 47% false refusals on held-out answerable questions). Capped rows still become pairs.
    max_refusal_share: float = 0.2
    on_policy_negatives: int = 32  # base-model answers to sample as rejected (0 = off; slow on CPU)
    on_policy_max_new_tokens: int = 48  # length cap for those answers


def inputs(cfg) -> list[Path]:
    return [cfg.paths.resolve("qa") / "train.jsonl"]


def _with_citation(answer: str, number: int) -> str:
    body = answer.rstrip()
    end = body[-1] if body and body[-1] in ".!?" else ""
    return f"{body[:-1] if end else body} [{number}]{end or '.'}"


def _holds_facts(text: str, facts: list[list[str]]) -> bool:
    return all(contains_fact(text, fact) for fact in facts)


def _gold_chunk(retriever, record):
    """The chunk of the record's document that holds the most of its facts."""
    candidates = [c for c in retriever.chunks if c.doc_id == record.doc]
    return max(candidates, key=lambda c: sum(contains_fact(c.text, f) for f in record.facts), default=None)


def ground(record, retriever, k: int, rng: random.Random, insert_gold: bool):
    """(passages, cited number or None, gold inserted?) for one record."""
    from pipeline.retrieval.retriever import Passage

    passages = retriever.search(retrieval_query(record.question, record.history), k=k)
    if not record.answerable:
        return passages, None, False
    hit = next((i for i, p in enumerate(passages, 1) if _holds_facts(p.text, record.facts)), None)
    inserted = False
    if hit is None and insert_gold:
        chunk = _gold_chunk(retriever, record)
        if chunk is not None and _holds_facts(chunk.text, record.facts):
            gold = Passage(chunk.chunk_id, chunk.doc_id, chunk.source, chunk.title, chunk.headers,
                           chunk.text, 0.0)
            passages = [p for p in passages if p.chunk_id != chunk.chunk_id][: k - 1]
            position = rng.randrange(len(passages) + 1)
            passages.insert(position, gold)
            hit, inserted = position + 1, True
    return passages, hit, inserted


def _rejections(record, passages, cited, others, rng: random.Random) -> list[tuple[str, str]]:
    """(kind, rejected answer) candidates that a grounded answer should beat."""
    stranger = rng.choice([o for o in others if o.doc != record.doc and o.answerable])
    if not record.answerable:
        return [("invented_answer", _with_citation(stranger.answer, 1)),
                ("ignores_context", stranger.answer)]
    options = [
        ("other_document_fact", _with_citation(stranger.answer, cited or 1)),
        ("ignores_context", stranger.answer),
        ("false_refusal", REFUSAL),
        ("rambling", " ".join([record.answer] * 3 + ["This is an important point to remember."] * 2)),
    ]
    wrong = [n for n, p in enumerate(passages, 1) if not _holds_facts(p.text, record.facts)]
    if cited and wrong:
        options.append(("wrong_citation", _with_citation(record.answer, rng.choice(wrong))))
    return options


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _in_validation(record_id: str, share: float) -> bool:
    return int(hashlib.sha1(record_id.encode()).hexdigest(), 16) % 1000 < share * 1000


def run(config: Config, ctx) -> dict:
    from pipeline.data.records import load_split
    from pipeline.retrieval.retriever import Retriever

    cfg = ctx.config
    rng = random.Random(cfg.seed)
    records = load_split(cfg.paths.resolve("qa"), "train")
    if config.max_records:
        records = rng.sample(records, min(config.max_records, len(records)))
    retriever = Retriever(ctx.parent("index"), cfg.retrieval)
    k = cfg.retrieval.top_k
    sets = {name: [] for name in ("sft", "sft_val", "prefs", "prefs_val", "prompts")}
    kinds, stats = Counter(), Counter()
    for record in records:
        val = _in_validation(record.id, config.validation_share)
        passages, cited, inserted = ground(record, retriever, k, rng, config.insert_gold)
        stats["answerable"] += record.answerable
        stats["gold_inserted"] += inserted
        stats["gold_retrieved"] += bool(cited) and not inserted
        if record.answerable and cited is None:
            stats["dropped_no_gold_passage"] += 1
            continue
        prompt = build_messages(record.question, passages, record.history)
        chosen = _with_citation(record.answer, cited) if record.answerable else REFUSAL
        sets["sft_val" if val else "sft"].append(
            {"id": record.id, "prompt": prompt, "completion": [{"role": "assistant", "content": chosen}]})
        if record.answerable and not val and rng.random() < config.refusal_drills:
            kept = [p for p in passages if p.doc_id != record.doc]
            if kept and not any(_holds_facts(p.text, record.facts) for p in kept):
                drill = build_messages(record.question, kept, record.history)
                sets["sft"].append({"id": record.id + "-drill", "prompt": drill,
                                    "completion": [{"role": "assistant", "content": REFUSAL}]})
                stats["refusal_drills"] += 1
        options = _rejections(record, passages, cited, records, rng)
        for kind, rejected in rng.sample(options, min(config.rejected_per_record, len(options))):
            kinds[kind] += 1
            sets["prefs_val" if val else "prefs"].append({
                "id": record.id, "kind": kind, "prompt": prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]})
        if not val:
            sets["prompts"].append({"id": record.id, "prompt": prompt, "answerable": record.answerable,
                                    "facts": record.facts, "reference": chosen})
    stats["refusals_dropped"] = cap_refusals(sets["sft"], config.max_refusal_share, rng)
    if config.on_policy_negatives:
        facts_by_id = {r.id: r.facts for r in records}
        added = on_policy_pairs(ctx, sets["prefs"], facts_by_id, config, rng)
        kinds["on_policy"] += added
    for name, rows in sets.items():
        _write(ctx.out_dir / f"{name}.jsonl", rows)
    answerable = max(1, stats["answerable"])
    return {
        "records": len(records), **{f"{name}_rows": len(rows) for name, rows in sets.items()},
        "gold_retrieved_rate": round(stats["gold_retrieved"] / answerable, 3),
        "gold_inserted_rate": round(stats["gold_inserted"] / answerable, 3),
        "dropped_no_gold_passage": stats["dropped_no_gold_passage"],
        "refusal_drills": stats["refusal_drills"], "refusals_dropped": stats["refusals_dropped"],
        "sft_refusal_share": round(sum(_is_refusal_row(r) for r in sets["sft"]) / max(1, len(sets["sft"])), 3),
        "rejection_kinds": dict(kinds), "top_k": k,
    }


def _is_refusal_row(row: dict) -> bool:
    return row["completion"][0]["content"] == REFUSAL


def cap_refusals(rows: list[dict], share: float, rng: random.Random) -> int:
    """Drop random refusal rows (in place) until they are at most ``share`` of ``rows``."""
    if share <= 0:
        return 0
    refusals = [i for i, row in enumerate(rows) if _is_refusal_row(row)]
    others = len(rows) - len(refusals)
    keep = min(len(refusals), int(share * others / (1 - share)))
    drop = set(rng.sample(refusals, len(refusals) - keep))
    rows[:] = [row for i, row in enumerate(rows) if i not in drop]
    return len(drop)


def on_policy_pairs(ctx, prefs: list[dict], facts_by_id: dict, config: Config,
                    rng: random.Random) -> int:
    """Add pairs whose rejected side is the base model's own answer, where it fails the check."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.generation import generate_batch

    base = ctx.parent("base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    first_rows = list({row["id"]: row for row in reversed(prefs)}.values())
    rows = rng.sample(first_rows, min(config.on_policy_negatives, len(first_rows)))
    answers = generate_batch(model, tokenizer, [r["prompt"] for r in rows],
                             max_new_tokens=config.on_policy_max_new_tokens, desc="on-policy negatives")
    added = 0
    for row, answer in zip(rows, answers):
        facts = facts_by_id[row["id"]]
        correct = is_refusal(answer) if not facts else (
            not is_refusal(answer) and _holds_facts(answer, facts))
        if not correct and answer.strip():
            prefs.append(dict(row, kind="on_policy", rejected=[{"role": "assistant", "content": answer}]))
            added += 1
    ctx.log.info("on-policy negatives: %d of %d base answers failed the fact check", added, len(rows))
    return added
