"""Stage `dataset`: SFT conversations, preference pairs and PPO prompts from the QA records.

Reads:  data/qa/train.jsonl (never eval.jsonl, which only the eval stage reads), the
        `index` artifact (the real retriever, with the service's `retrieval` settings) and
        the `base` artifact (for on-policy negatives: the base model's own failing answers).
Writes: artifacts/dataset/ with sft.jsonl (conversational prompt/completion, so TRL puts the
        loss on the answer only), prefs.jsonl (prompt/chosen/rejected/kind), prompts.jsonl,
        and sft_val.jsonl, prefs_val.jsonl (the dev split: train records that no trainer
        sees, for held-out loss, pairwise accuracy and the refusal threshold), and meta.json
        with counts.
Alone:  python -m pipeline run --only dataset

What the targets teach (docs/architecture.md, "Answering with a 135M model"):
- Copy, then cite. An answer is the sentence(s) of the gold passage, as the prompt shows it,
  that hold the record's facts, with the passage's [n]: words the model can copy.
- Refuse only when the passages are silent. Refusal rows keep all k passages: unanswerable
  questions keep what the retriever found (near misses by construction), and "drills" take
  an answerable question and swap its gold passages for the next-best passages from other
  documents (RAFT, arXiv 2403.10131; hard negatives, arXiv 2403.01461).
- Pairs of three kinds, balanced: evidence over a failing answer (copied from a wrong
  passage, another document's fact, the model's own paraphrase), evidence over a refusal on
  answerable questions, and a refusal over any answer when the passages are silent.

Every prompt is built by pipeline.prompt.build_messages, exactly as the service builds it.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pipeline.data.normalize import contains_fact
from pipeline.prompt import (REFUSAL, build_messages, cite, is_refusal, retrieval_query, shown_text,
                             split_sentences)

PARENTS = ("base", "index")
CONFIG_SECTIONS = ("retrieval",)
ANSWER_KINDS = ("wrong_passage", "other_document_fact", "on_policy")  # evidence beats these
REFUSAL_KINDS = ("false_refusal",)  # evidence beats a refusal on answerable questions
ABSTAIN_KINDS = ("invented_answer",)  # a refusal beats these when the passages are silent


@dataclass
class Config:
    max_records: int = 0  # use at most this many train records (0 = all); tiny uses a few
    validation_share: float = 0.1  # train records held back from every trainer: the dev split
    insert_gold: bool = True  # put the gold passage in the prompt when retrieval missed it
    refusal_drills: float = 0.2  # share of answerable records also shown with hard negatives only
    negative_pool: int = 12  # passages retrieved to find hard negatives for a drill
    max_refusal_share: float = 0.3  # cap on refusal rows in sft.jsonl (0 = no cap)
    max_evidence_sentences: int = 2  # an evidence answer copies at most this many sentences
    on_policy_negatives: int = 32  # base-model answers to sample as rejected (0 = off; slow on CPU)
    on_policy_max_new_tokens: int = 48  # length cap for those answers


def inputs(cfg) -> list[Path]:
    return [cfg.paths.resolve("qa") / "train.jsonl"]


def _holds_facts(text: str, facts: list[list[str]]) -> bool:
    return all(contains_fact(text, fact) for fact in facts)


def evidence_answer(shown: str, facts: list[list[str]], max_sentences: int = 2) -> str | None:
    """The fewest sentences of ``shown`` (at most ``max_sentences``, in document order) that
    together hold every fact; the shortest such choice. None when no such choice exists."""
    sentences = split_sentences(shown)
    holding = [{i for i, fact in enumerate(facts) if contains_fact(s, fact)} for s in sentences]
    everything = set(range(len(facts)))
    singles = [i for i, got in enumerate(holding) if got == everything]
    if singles:
        return min((sentences[i] for i in singles), key=len)
    if max_sentences < 2:
        return None
    pairs = [(i, j) for i in range(len(sentences)) for j in range(i + 1, len(sentences))
             if holding[i] | holding[j] == everything]
    if not pairs:
        return None
    i, j = min(pairs, key=lambda p: len(sentences[p[0]]) + len(sentences[p[1]]))
    return f"{sentences[i]} {sentences[j]}"


def _gold_chunk(retriever, record):
    """The chunk of the record's document that holds the most of its facts."""
    candidates = [c for c in retriever.chunks if c.doc_id == record.doc]
    return max(candidates, key=lambda c: sum(contains_fact(c.text, f) for f in record.facts), default=None)


def ground(record, retriever, k: int, rng: random.Random, insert_gold: bool):
    """(passages, cited number or None, gold inserted?) for one record. "Holds the facts" is
    judged on the text the prompt shows (pipeline.prompt.shown_text), not the whole chunk."""
    from pipeline.retrieval.retriever import Passage

    passages = retriever.search(retrieval_query(record.question, record.history), k=k)
    if not record.answerable:
        return passages, None, False

    def holds(passage) -> bool:
        return _holds_facts(shown_text(passage, record.question), record.facts)

    hit = next((i for i, p in enumerate(passages, 1) if holds(p)), None)
    inserted = False
    if hit is None and insert_gold:
        chunk = _gold_chunk(retriever, record)
        if chunk is not None:
            gold = Passage(chunk.chunk_id, chunk.doc_id, chunk.source, chunk.title, chunk.headers,
                           chunk.text, 0.0)
            if holds(gold):
                passages = [p for p in passages if p.chunk_id != chunk.chunk_id][: k - 1]
                position = rng.randrange(len(passages) + 1)
                passages.insert(position, gold)
                hit, inserted = position + 1, True
    return passages, hit, inserted


def hard_negatives(record, retriever, k: int, pool: int) -> list | None:
    """``k`` passages for a refusal drill: the best-ranked passages of other documents for the
    record's own question, none holding its facts (near misses). None when too few exist."""
    found = retriever.search(retrieval_query(record.question, record.history), k=pool)
    kept = [p for p in found if p.doc_id != record.doc and not _holds_facts(p.text, record.facts)]
    return kept[:k] if len(kept) >= k else None


def copied_wrong_sentence(question: str, passages: list, avoid_facts: list[list[str]],
                          rng: random.Random) -> str | None:
    """A plausible wrong answer: a sentence copied from a shown passage that lacks the facts,
    cited to that passage. For unanswerable prompts (no facts), any shown sentence."""
    options = []
    for number, passage in enumerate(passages, 1):
        for sentence in split_sentences(shown_text(passage, question)):
            if len(sentence.split()) >= 4 and not (avoid_facts and _holds_facts(sentence, avoid_facts)):
                options.append(cite(sentence, number))
    return rng.choice(options) if options else None


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _pair(record_id: str, kind: str, prompt: list, chosen: str, rejected: str) -> dict:
    return {"id": record_id, "kind": kind, "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def examples_for(record, retriever, k: int, rng: random.Random, config: Config, others: list,
                 stats: Counter) -> list[dict]:
    """(prompt, target, pairs) examples for one record: its own, plus a drill when drawn."""
    passages, cited, inserted = ground(record, retriever, k, rng, config.insert_gold)
    stats["gold_inserted"] += inserted
    stats["gold_retrieved"] += bool(cited) and not inserted
    examples = []
    prompt = build_messages(record.question, passages, record.history)
    if record.answerable:
        evidence = None
        if cited is not None:
            evidence = evidence_answer(shown_text(passages[cited - 1], record.question), record.facts,
                                       config.max_evidence_sentences)
        if evidence is None:
            stats["dropped_no_evidence"] += 1
            return []
        target = cite(evidence, cited)
        stranger = rng.choice([o for o in others if o.doc != record.doc and o.answerable])
        rejected = [("other_document_fact", cite(stranger.answer, cited)), ("false_refusal", REFUSAL)]
        wrong = copied_wrong_sentence(record.question, passages, record.facts, rng)
        if wrong:
            rejected.append(("wrong_passage", wrong))
        examples.append({"prompt": prompt, "target": target, "rejected": rejected, "answerable": True})
        if rng.random() < config.refusal_drills:
            negatives = hard_negatives(record, retriever, k, config.negative_pool)
            if negatives:
                drill = build_messages(record.question, negatives, record.history)
                invented = copied_wrong_sentence(record.question, negatives, [], rng) or target
                examples.append({"prompt": drill, "target": REFUSAL, "drill": True, "answerable": False,
                                 "rejected": [("invented_answer", invented)]})
                stats["refusal_drills"] += 1
    else:
        invented = copied_wrong_sentence(record.question, passages, [], rng)
        stranger = rng.choice([o for o in others if o.answerable])
        examples.append({"prompt": prompt, "target": REFUSAL, "answerable": False,
                         "rejected": [("invented_answer", invented or cite(stranger.answer, 1))]})
    return examples


def run(config: Config, ctx) -> dict:
    from pipeline.data.records import in_dev_split, load_split, sample_records
    from pipeline.retrieval.retriever import Retriever

    cfg = ctx.config
    rng = random.Random(cfg.seed)
    records = sample_records(load_split(cfg.paths.resolve("qa"), "train"), config.max_records, rng)
    retriever = Retriever(ctx.parent("index"), cfg.retrieval)
    k = cfg.retrieval.top_k
    sets = {name: [] for name in ("sft", "sft_val", "prefs", "prefs_val", "prompts")}
    kinds, stats = Counter(), Counter()
    for record in records:
        val = in_dev_split(record.id, config.validation_share)
        stats["answerable"] += record.answerable
        for example in examples_for(record, retriever, k, rng, config, records, stats):
            row_id = record.id + ("-drill" if example.get("drill") else "")
            target = example["target"]
            sets["sft_val" if val else "sft"].append(
                {"id": row_id, "prompt": example["prompt"],
                 "completion": [{"role": "assistant", "content": target}]})
            for kind, rejected in example["rejected"]:
                kinds[kind] += not val
                sets["prefs_val" if val else "prefs"].append(
                    _pair(row_id, kind, example["prompt"], target, rejected))
            if not val:
                sets["prompts"].append({"id": row_id, "prompt": example["prompt"],
                                        "answerable": example["answerable"],
                                        "facts": record.facts if example["answerable"] else [],
                                        "reference": target})
    stats["refusals_dropped"] = cap_refusals(sets["sft"], config.max_refusal_share, rng)
    if config.on_policy_negatives:
        facts_by_id = {row["id"]: row["facts"] for row in sets["prompts"]}
        added = on_policy_pairs(ctx, sets["prefs"], facts_by_id, config, rng)
        kinds["on_policy"] += added
    stats["pairs_dropped_to_balance"] = balance_pairs(sets["prefs"], rng)
    for name, rows in sets.items():
        _write(ctx.out_dir / f"{name}.jsonl", rows)
    answerable = max(1, stats["answerable"])
    return {
        "records": len(records), **{f"{name}_rows": len(rows) for name, rows in sets.items()},
        "gold_retrieved_rate": round(stats["gold_retrieved"] / answerable, 3),
        "gold_inserted_rate": round(stats["gold_inserted"] / answerable, 3),
        "dropped_no_evidence": stats["dropped_no_evidence"],
        "refusal_drills": stats["refusal_drills"], "refusals_dropped": stats["refusals_dropped"],
        "pairs_dropped_to_balance": stats["pairs_dropped_to_balance"],
        "sft_refusal_share": round(sum(_is_refusal_row(r) for r in sets["sft"]) / max(1, len(sets["sft"])), 3),
        "pair_kinds": dict(Counter(row["kind"] for row in sets["prefs"])), "top_k": k,
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


def balance_pairs(pairs: list[dict], rng: random.Random) -> int:
    """Drop random pairs (in place) so that "refuse over answer" pairs are no more numerous than
    "answer over refusal" pairs and vice versa: DPO must not buy abstention with false refusals
    (or the reverse). Pairs that teach copying over a wrong answer are all kept."""
    abstain = [i for i, p in enumerate(pairs) if p["kind"] in ABSTAIN_KINDS]
    answer = [i for i, p in enumerate(pairs) if p["kind"] in REFUSAL_KINDS]
    larger, smaller = (abstain, answer) if len(abstain) > len(answer) else (answer, abstain)
    drop = set(rng.sample(larger, len(larger) - len(smaller)))
    pairs[:] = [p for i, p in enumerate(pairs) if i not in drop]
    return len(drop)


def on_policy_pairs(ctx, prefs: list[dict], facts_by_id: dict, config: Config,
                    rng: random.Random) -> int:
    """Add pairs whose rejected side is the base model's own answer, where it fails the check."""
    from pipeline.generation import generate_batch
    from pipeline.training import load_causal_lm

    model, tokenizer = load_causal_lm(ctx.artifacts, [])
    first_rows = list({row["id"]: row for row in reversed(prefs)}.values())
    rows = rng.sample(first_rows, min(config.on_policy_negatives, len(first_rows)))
    answers = generate_batch(model.eval(), tokenizer, [r["prompt"] for r in rows],
                             max_new_tokens=config.on_policy_max_new_tokens, desc="on-policy negatives")
    added = 0
    for row, answer in zip(rows, answers):
        facts = facts_by_id.get(row["id"], [])
        correct = is_refusal(answer) if not facts else (
            not is_refusal(answer) and _holds_facts(answer, facts))
        if not correct and answer.strip():
            prefs.append(dict(row, kind="on_policy", rejected=[{"role": "assistant", "content": answer}]))
            added += 1
    ctx.log.info("on-policy negatives: %d of %d base answers failed the fact check", added, len(rows))
    return added
