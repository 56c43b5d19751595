"""Copy decoding: the reply is one shown sentence, cited, or the refusal; a selector picks it.

A 135M model paraphrases badly: decoded freely it drops or invents the fact ("It takes 4 hours
[1]"), although the fact is in its passages for 98.9% of answerable questions. Copy decoding
restricts the reply to what the model was trained to write (pipeline/stages/dataset.py): a
sentence the prompt shows, followed by its passage's ``[n]``, or the refusal. It cannot
paraphrase past the fact, and it cites the passage it copied.

Which sentence, and whether to refuse, is decided from these features of each candidate:

- ``question_likelihood``: the mean log-probability, under the served variant, of the user's
  question given the sentence alone ("Passage: <sentence>\nQuestion: <question>", plain
  text). Query likelihood reranking, as in UPR (arXiv 2204.07496): a sentence that answers
  the question makes the question likely. All candidates go in one short batch.
- ``word_overlap``: the share of the question's content words the sentence holds.
- ``embedding_similarity``: cosine of question and sentence under the index's embedder.
- ``passage_rank``: the passage's place in the retrieval order (1 = best).

Two logistic regressions, fitted on the dev split (train records no trainer saw; never
eval), turn the features into decisions: one scores each candidate (does it hold the facts?),
one scores the question from its best candidates' features (are the passages silent?). The
refusal threshold makes the most right decisions on dev. Everything is written to
``copying.json`` beside the variant's adapter. On dev the scores were measured one by one
before this design was chosen (docs/architecture.md, "Copy decoding").
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.answerability import candidate_thresholds
from pipeline.data.normalize import contains_fact
from pipeline.prompt import (REFUSAL, cite, cited_numbers, content_stems, is_refusal, split_sentences,
                             strip_citations)

SETTINGS_FILE = "copying.json"
FEATURES = ("question_likelihood", "word_overlap", "embedding_similarity", "passage_rank")
QUESTION_FEATURES = ("best_question_likelihood", "best_word_overlap", "best_embedding_similarity")
# Plain text, no chat template: the template's default system prompt and turn markers would
# more than double the tokens of each short sequence, and this is the one model call a reply costs.
QUESTION_PROMPT = "Passage: {sentence}\nQuestion:"
_HEADING = re.compile(r"^\[(\d{1,2})\] \(.*\)$")


@dataclass
class Candidates:
    """Every reply copy decoding may give to one prompt, with its features."""

    question: str
    replies: list[str]  # "<sentence> [n]." in prompt order
    features: np.ndarray  # (len(replies), len(FEATURES))

    def question_features(self) -> np.ndarray:
        if not self.replies:
            return np.array([-20.0, 0.0, 0.0])
        return self.features[:, :len(QUESTION_FEATURES)].max(0)  # the best of the first features


def candidates(messages: list[dict]) -> tuple[str, list[str]]:
    """(question, replies) from a prompt built by pipeline.prompt.build_messages: each shown
    sentence cited to its passage, in prompt order. No passages: no replies."""
    text = messages[-1]["content"]
    if not text.startswith("Passages:\n") or "\n\nQuestion: " not in text:
        return text.strip(), []
    shown, question = text.rsplit("\n\nQuestion: ", 1)
    lines = shown.split("\n")
    replies = []
    for line, body in zip(lines, lines[1:]):
        match = _HEADING.match(line)
        if match:
            replies += [cite(s, int(match.group(1))) for s in split_sentences(body)]
    return question.strip(), replies


def word_overlap(question: str, sentence: str) -> float:
    wanted = content_stems(question)
    return len(wanted & content_stems(sentence)) / len(wanted) if wanted else 0.0


def question_likelihoods(model, tokenizer, question: str, sentences: list[str]) -> list[float]:
    """Mean log p(question tokens | sentence) per sentence, one batch."""
    from pipeline.scoring import answer_logprobs

    prompts = [QUESTION_PROMPT.format(sentence=s) for s in sentences]
    asked = " " + question.strip()
    totals = answer_logprobs(model, tokenizer, prompts, [asked] * len(sentences), batch_size=len(sentences))
    length = max(1, len(tokenizer(asked, add_special_tokens=False)["input_ids"]))
    return [t / length for t in totals]


def featurize(model, tokenizer, embedder, messages: list[dict]) -> Candidates:
    question, replies = candidates(messages)
    if not replies:
        return Candidates(question, [], np.zeros((0, len(FEATURES))))
    sentences = [strip_citations(r) for r in replies]
    vectors = embedder.encode([question] + sentences)
    columns = [question_likelihoods(model, tokenizer, question, sentences),
               [word_overlap(question, s) for s in sentences],
               (vectors[1:] @ vectors[0]).tolist(),
               [cited_numbers(r)[0] for r in replies]]
    return Candidates(question, replies, np.array(columns, dtype=np.float64).T)


def featurize_all(model, tokenizer, embedder, prompts: list[list[dict]], desc: str | None = "copy features"):
    import torch
    from tqdm.auto import tqdm

    with torch.inference_mode():
        return [featurize(model, tokenizer, embedder, p)
                for p in tqdm(prompts, desc=desc, unit="prompt", disable=desc is None)]


class Linear:
    """A standardised linear score, w . (x - mean) / scale + b, from a fitted sklearn pipeline."""

    def __init__(self, mean, scale, weights, bias):
        self.mean, self.scale = np.asarray(mean), np.asarray(scale)
        self.weights, self.bias = np.asarray(weights), float(bias)

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray) -> "Linear":
        """Logistic regression on standardised features; with one class only (a tiny dev
        split), a constant score that says that class."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        if len(set(np.asarray(y).tolist())) < 2:
            width = x.shape[1] if x.ndim == 2 else 1
            return cls(np.zeros(width), np.ones(width), np.zeros(width), 1.0 if len(y) and y[0] else -1.0)
        scaler = StandardScaler().fit(x)
        model = LogisticRegression(C=1.0, class_weight="balanced").fit(scaler.transform(x), y)
        return cls(scaler.mean_, scaler.scale_, model.coef_[0], model.intercept_[0])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (np.atleast_2d(x) - self.mean) / self.scale @ self.weights + self.bias

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "weights": self.weights.tolist(), "bias": self.bias}


@dataclass
class Selector:
    sentence: Linear  # high: this candidate holds the facts
    silence: Linear  # high: no candidate answers the question
    threshold: float  # refuse when silence(...) > threshold

    def silence_score(self, c: Candidates) -> float:
        return float(self.silence(c.question_features())[0])

    def reply(self, c: Candidates) -> str:
        if not c.replies or self.silence_score(c) > self.threshold:
            return REFUSAL
        return _best_sentence(self.sentence, c)

    def to_dict(self) -> dict:
        return {"features": list(FEATURES), "question_features": list(QUESTION_FEATURES),
                "sentence": self.sentence.to_dict(), "silence": self.silence.to_dict(),
                "threshold": self.threshold}

    @classmethod
    def from_dict(cls, raw: dict) -> "Selector":
        return cls(Linear(**raw["sentence"]), Linear(**raw["silence"]), float(raw["threshold"]))


def _best_sentence(sentence: Linear, c: Candidates) -> str:
    """The candidate ``sentence`` scores highest (the refusal when there is none)."""
    return c.replies[int(np.argmax(sentence(c.features)))] if c.replies else REFUSAL


def right(reply: str, facts: list[list[str]] | None) -> bool:
    """Refusing a silent prompt (``facts`` None), or copying a sentence that holds every fact."""
    if facts is None:
        return is_refusal(reply)
    return not is_refusal(reply) and all(contains_fact(strip_citations(reply), f) for f in facts)


def fit(cands: list[Candidates], facts: list[list[list[str]] | None]) -> tuple[Selector, dict]:
    """Fit both scores on dev and choose the threshold with the most right decisions there."""
    rows = [(c, f) for c, f in zip(cands, facts) if f is not None and c.replies]
    x = np.concatenate([c.features for c, _ in rows]) if rows else np.zeros((0, len(FEATURES)))
    y = np.concatenate([[right(r, f) for r in c.replies] for c, f in rows]) if rows else np.zeros(0, bool)
    sentence = Linear.fit(x, y)
    silence = Linear.fit(np.array([c.question_features() for c in cands]), np.array([f is None for f in facts]))
    scores = [float(silence(c.question_features())[0]) for c in cands]
    picks = [_best_sentence(sentence, c) for c in cands]
    curve = []
    for cut in candidate_thresholds(scores):
        replies = [REFUSAL if s > cut else p for s, p in zip(scores, picks)]
        answerable = [(r, f) for r, f in zip(replies, facts) if f is not None]
        silent = [r for r, f in zip(replies, facts) if f is None]
        curve.append({"threshold": round(cut, 5), "right": sum(right(r, f) for r, f in zip(replies, facts)),
                      "answered_right": sum(right(r, f) for r, f in answerable),
                      "abstention": round(sum(map(is_refusal, silent)) / max(1, len(silent)), 4),
                      "false_refusal": round(sum(is_refusal(r) for r, _ in answerable) / max(1, len(answerable)), 4)})
    best = max(curve, key=lambda p: (p["right"], -abs(p["threshold"])))
    report = {"chosen": best, "dev_rows": len(cands), "dev_silent": sum(f is None for f in facts),
              "sentence_right_if_answering": sum(right(p, f) for p, f in zip(picks, facts) if f is not None),
              "curve": curve}
    return Selector(sentence, silence, best["threshold"]), report


def dev_facts(dev_rows: list[dict], train_records) -> list[list[list[str]] | None]:
    """Facts of each dev row from its train record; None where the target is the refusal."""
    by_id = {r.id: r for r in train_records}
    facts = []
    for row in dev_rows:
        target = row["completion"][0]["content"]
        record = by_id.get(row["id"])
        if target == REFUSAL:
            facts.append(None)
        else:
            facts.append(record.facts if record is not None and record.facts else [[strip_citations(target)]])
    return facts


def calibrate(model, tokenizer, embedder, dev_rows: list[dict], train_records, out_dir: Path) -> dict:
    """Featurise the dev prompts, fit the selector, write ``copying.json``; return metrics."""
    if not dev_rows:
        return {}
    cands = featurize_all(model.eval(), tokenizer, embedder, [r["prompt"] for r in dev_rows], "dev copy features")
    selector, report = fit(cands, dev_facts(dev_rows, train_records))
    (Path(out_dir) / SETTINGS_FILE).write_text(json.dumps({"selector": selector.to_dict(), **report}, indent=1))
    chosen = report["chosen"]
    return {"copy_dev_right": round(chosen["right"] / len(dev_rows), 4),
            "copy_dev_abstention": chosen["abstention"], "copy_dev_false_refusal": chosen["false_refusal"]}


def calibrate_variant(model, tokenizer, artifacts, qa_dir: Path, out_dir: Path) -> dict:
    """``calibrate`` for a trained variant: the dev split of the dataset stage, the facts of
    data/qa/train.jsonl and the index's embedder (what the service will use)."""
    from pipeline.data.records import load_split
    from pipeline.retrieval.embedder import Embedder
    from pipeline.training import read_rows

    manifest = json.loads((artifacts.require("index") / "manifest.json").read_text())
    dev = read_rows(artifacts.require("dataset") / "sft_val.jsonl")
    return calibrate(model, tokenizer, Embedder(manifest["embedder"]), dev, load_split(qa_dir, "train"), out_dir)


def calibrate_built(cfg, variant: str) -> dict:
    """(Re)fit the selector of a variant that is already built (``python -m pipeline calibrate``)."""
    from pipeline.artifacts import Artifacts
    from pipeline.training import load_variant

    artifacts = Artifacts(cfg.paths.resolve("artifacts"))
    model, tokenizer = load_variant(artifacts, variant)
    return calibrate_variant(model, tokenizer, artifacts, cfg.paths.resolve("qa"), artifacts.dir(variant))


def load_selector(variant_dir: Path) -> Selector | None:
    """The variant's fitted selector, or None when it has none (it then decodes freely)."""
    path = Path(variant_dir) / SETTINGS_FILE
    return Selector.from_dict(json.loads(path.read_text())["selector"]) if path.exists() else None


def copy_answers(model, tokenizer, embedder, selector: Selector, prompts: list[list[dict]],
                 desc: str | None = "copy decoding") -> list[str]:
    return [selector.reply(c) for c in featurize_all(model, tokenizer, embedder, prompts, desc)]
