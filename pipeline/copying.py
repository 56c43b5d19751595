"""Copy decoding: the reply is one shown sentence, cited, or the refusal; a selector picks it.

A 135M model paraphrases badly: decoded freely it drops or invents the fact ("It takes 4 hours
[1]"), although the fact is in its passages for 98.9% of answerable questions. Copy decoding
restricts the reply to what the model was trained to write (pipeline/stages/dataset.py): a
sentence the prompt shows, followed by its passage's ``[n]``, or the refusal. It cannot
paraphrase past the fact, and it cites the passage it copied.

Which sentence, and whether to refuse, is decided from these features of each candidate
(pipeline/candidates.py):

- ``reader_score``: the reader's logit for (question, sentence), a cross-encoder fine-tuned on
  the train split (pipeline/reader.py).
- ``word_overlap``: the share of the question's content words the sentence holds.
- ``embedding_similarity``: cosine of question and sentence under the index's embedder.
- ``passage_rank``: the passage's place in the retrieval order (1 = best).
- ``question_likelihood``: the mean log-probability, under the served variant, of the user's
  question given the sentence alone ("Passage: <sentence>\nQuestion: <question>", plain
  text). Query likelihood reranking, as in UPR (arXiv 2204.07496). It costs a forward pass
  of the variant over every candidate: about 0.8 s a question on 2 cores in fp32, 0.3 s in
  bf16, which it runs in where the CPU multiplies bf16 natively.
- ``unseen_names``: how many names in the question (a capitalised word past the first, a word
  with a digit, an identifier such as ``task_type``; plain numbers are not names) no shown
  passage mentions: "Keras", "VGG-16", "TREC-COVID". The same for every candidate of a
  question; it is a question feature, read by the silence score only.

Two scores, fitted on the dev split (train records no trainer saw; never eval) as the
service sees it (each question retrieved through the index and prompted as served), turn the
features into decisions. A logistic regression scores each candidate (does it hold the
facts?); a second one scores the question (are the passages silent?) from the reader's best
score over the candidates, and from the question's ``unseen_names`` where that helps: on the
quick profile's dev split the best score alone told silent questions apart at AUC 0.967,
against 0.956 for a regression that also read the best overlap and cosine, but it cannot tell
that the passages about dropout say nothing of Keras. The refusal threshold is the one with
the most right decisions on dev among those whose dev false-refusal rate stays within
``MAX_FALSE_REFUSAL`` (a refused answerable question is the failure users notice most).
Whether the candidate score reads the variant's own ``question_likelihood``, and whether the
silence score reads ``unseen_names``, is chosen on dev too, by leave-one-question-out right
decisions with and without each (a tie goes to the simpler: the variant's feature is the slow
one). Everything is written to ``copying.json`` beside the variant's adapter.

A sentence that leans on its neighbour is replied with it (``in_context``): "It helps the
optimiser escape sharp minima" is replied after the sentence that says what "it" is, and
"The cost of teacher forcing is a mismatch between training and inference" with the
sentence after it, "This mismatch is called exposure bias". Both stay one passage's shown
words, cited once. On the quick profile's dev split the rule joined 10 of the 59 answerable
questions' picks and made 1 more right, 0 fewer (49 to 50); on the 510 answerable train
questions outside dev (the reader's own, in-sample) 79 picks, 9 more right, 0 fewer.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.answerability import candidate_thresholds
from pipeline.candidates import candidates, right, word_overlap
from pipeline.prompt import REFUSAL, cite, cited_numbers, is_refusal, strip_citations

SETTINGS_FILE = "copying.json"
FEATURES = ("reader_score", "word_overlap", "embedding_similarity", "passage_rank", "question_likelihood",
            "unseen_names")
SENTENCE_FEATURES = FEATURES[:4]  # what the candidate score reads, without the variant's own feature
MODEL_FEATURE = "question_likelihood"
QUESTION_FEATURES = ("reader_score",)  # the best candidate's, by default
NAMES_FEATURE = "unseen_names"
MAX_FALSE_REFUSAL = 0.05  # the dev false-refusal rate the refusal threshold may cost
_NO_CANDIDATE = {"reader_score": -20.0, "question_likelihood": -20.0}  # best values with nothing shown
# Plain text, no chat template: the template's default system prompt and turn markers would
# more than double the tokens of each short sequence, and this is the one model call a reply costs.
QUESTION_PROMPT = "Passage: {sentence}\nQuestion:"
# A sentence opening with one of these refers back to the sentence before it.
REFERRING = re.compile(r"^(?:This|These|That|Those|It|Its|They|Their|Such|Both|Each)\b")
MAX_REPLY_WORDS = 50  # a reply joined with its neighbour stays this short, or the pick goes alone
_CITED = re.compile(r"\s*\[(\d{1,2})\]\s*([.!?]?)$")


@dataclass
class Candidates:
    """Every reply copy decoding may give to one prompt, with its features."""

    question: str
    replies: list[str]  # "<sentence> [n]." in prompt order
    features: np.ndarray  # (len(replies), len(FEATURES)); a feature not computed is 0

    def columns(self, names) -> np.ndarray:
        return self.features[:, [FEATURES.index(n) for n in names]]

    def best(self, names) -> np.ndarray:
        """Each named feature's highest value over the candidates."""
        if not self.replies:
            return np.array([_NO_CANDIDATE.get(n, 0.0) for n in names])
        return self.columns(names).max(0)


_NAME = re.compile(r"[A-Za-z0-9][\w.\-]*\w|[A-Za-z0-9]")
_NUMBER = re.compile(r"^[\d.\-x×/]+$")


def question_names(question: str) -> list[str]:
    """The names a question asks about: words past the first that are capitalised, hold a
    digit or look like identifiers (``task_type``, ``nDCG``); plain numbers are not names."""
    words = _NAME.findall(question)
    return [w for w in words[1:] if not _NUMBER.match(w)
            and (w[0].isupper() or any(ch.isdigit() for ch in w) or "_" in w or re.search(r"[a-z][A-Z]", w))]


def mentions(text: str, name: str) -> bool:
    """Whether ``text`` mentions ``name``: case-insensitively, as a whole word or its plural, its
    singular too ("ResNets"); a hyphenated name without digits also by its capitalised part
    ("BERT-style", "KL-penalised"). Lower-case ``text`` is expected."""
    lowered = name.lower()
    forms = {lowered, lowered[:-1] if lowered.endswith("s") and len(lowered) > 3 else lowered}
    if "-" in name and not any(ch.isdigit() for ch in name):
        forms |= {part.lower() for part in name.split("-") if len(part) > 1 and part[0].isupper()}
    return any(re.search(r"(?<![a-z0-9])" + re.escape(form) + r"(?:e?s)?(?![a-z0-9])", text) for form in forms)


def unseen_names(question: str, shown: str) -> int:
    """How many of the question's names (``question_names``) the shown text never mentions."""
    lowered = shown.lower()
    return sum(not mentions(lowered, name) for name in question_names(question))


def _sentence(reply: str) -> tuple[str, int]:
    """A candidate reply's sentence and passage number: "It is fast [2]." -> ("It is fast.", 2)."""
    match = _CITED.search(reply)
    return reply[:match.start()] + match.group(2), int(match.group(1))


def in_context(replies: list[str], i: int) -> str:
    """Reply ``i`` with the shown sentence it leans on: the one before it in its passage when
    it opens with a referring word ("It", "This", ``REFERRING``), and the one after it when that
    one does ("This mismatch is called exposure bias."). The joined reply is cited once and
    stays within ``MAX_REPLY_WORDS``; past that, reply ``i`` goes alone."""
    sentence, number = _sentence(replies[i])
    group = [sentence]
    if i > 0 and REFERRING.match(sentence):
        before, passage = _sentence(replies[i - 1])
        if passage == number:
            group.insert(0, before)
    if i + 1 < len(replies):
        after, passage = _sentence(replies[i + 1])
        if passage == number and REFERRING.match(after):
            group.append(after)
    joined = " ".join(group)
    return replies[i] if len(group) == 1 or len(joined.split()) > MAX_REPLY_WORDS else cite(joined, number)


def question_likelihoods(model, tokenizer, question: str, sentences: list[str]) -> list[float]:
    """Mean log p(question tokens | sentence) per sentence, one packed pass; an fp32 model in bf16
    where the CPU multiplies bf16 natively (pipeline.scoring.scoring_precision)."""
    from pipeline.scoring import packed_answer_logprobs, scoring_precision

    prompts = [QUESTION_PROMPT.format(sentence=s) for s in sentences]
    asked = " " + question.strip()
    with scoring_precision(model):
        totals = packed_answer_logprobs(model, tokenizer, prompts, [asked] * len(sentences))
    length = max(1, len(tokenizer(asked, add_special_tokens=False)["input_ids"]))
    return [t / length for t in totals]


def featurize(model, tokenizer, embedder, reader, messages: list[dict], with_model: bool = True) -> Candidates:
    """The candidates of one prompt and their features. A selector that does not read a
    feature need not pay for it: ``reader`` None leaves ``reader_score`` at 0, ``with_model``
    False the variant's ``question_likelihood``."""
    question, replies, headings = candidates(messages)
    if not replies:
        return Candidates(question, [], np.zeros((0, len(FEATURES))))
    sentences = [strip_citations(r) for r in replies]
    vectors = embedder.encode([question] + sentences)
    columns = [reader.scores(question, sentences, headings) if reader is not None else [0.0] * len(replies),
               [word_overlap(question, s) for s in sentences],
               (vectors[1:] @ vectors[0]).tolist(),
               [cited_numbers(r)[0] for r in replies],
               question_likelihoods(model, tokenizer, question, sentences) if with_model else [0.0] * len(replies),
               [unseen_names(question, " ".join(headings + sentences))] * len(replies)]
    return Candidates(question, replies, np.array(columns, dtype=np.float64).T)


def featurize_all(model, tokenizer, embedder, reader, prompts: list[list[dict]], with_model: bool = True,
                  desc: str | None = "copy features"):
    import torch
    from tqdm.auto import tqdm

    with torch.inference_mode():
        return [featurize(model, tokenizer, embedder, reader, p, with_model)
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
    features: tuple[str, ...]  # what the candidate score reads
    sentence: Linear  # high: this candidate holds the facts
    silence: Linear  # high: no candidate answers the question (reads QUESTION_FEATURES' best)
    threshold: float  # refuse when silence(...) > threshold
    question_features: tuple[str, ...] = QUESTION_FEATURES

    @property
    def reads_model(self) -> bool:
        return MODEL_FEATURE in self.features + self.question_features

    @property
    def reads_reader(self) -> bool:
        return "reader_score" in self.features + self.question_features

    def silence_score(self, c: Candidates) -> float:
        return float(self.silence(c.best(self.question_features))[0])

    def ranked(self, c: Candidates) -> list[int]:
        """Candidate indices, the sentence score's best first (ties in prompt order)."""
        return np.argsort(-self.sentence(c.columns(self.features)), kind="stable").tolist() if c.replies else []

    def pick(self, c: Candidates) -> str:
        """The candidate the sentence score ranks first, in context (``in_context``); the
        refusal when there is none."""
        return in_context(c.replies, self.ranked(c)[0]) if c.replies else REFUSAL

    def refuses(self, c: Candidates) -> bool:
        return not c.replies or self.silence_score(c) > self.threshold

    def reply(self, c: Candidates) -> str:
        return REFUSAL if self.refuses(c) else self.pick(c)

    def answer(self, model, tokenizer, embedder, reader, messages: list[dict]) -> str:
        """Copy-decode one prompt: featurise it (the variant only if read; ``reader`` may be
        None when not read) and reply."""
        return self.reply(featurize(model, tokenizer, embedder, reader, messages, self.reads_model))

    def to_dict(self) -> dict:
        return {"features": list(self.features), "question_features": list(self.question_features),
                "sentence": self.sentence.to_dict(), "silence": self.silence.to_dict(),
                "threshold": self.threshold}

    @classmethod
    def from_dict(cls, raw: dict) -> "Selector":
        unknown = set(raw["features"]) - set(FEATURES)
        if unknown:
            from pipeline.errors import UserError

            raise UserError(f"copying.json names features this version does not compute: {sorted(unknown)}; "
                            "refit it: python -m pipeline calibrate --variant <name>")
        return cls(tuple(raw["features"]), Linear(**raw["sentence"]), Linear(**raw["silence"]),
                   float(raw["threshold"]), tuple(raw["question_features"]))


def fit(cands: list[Candidates], facts: list[list[list[str]] | None],
        features: tuple[str, ...] = SENTENCE_FEATURES,
        question_features: tuple[str, ...] = QUESTION_FEATURES) -> tuple[Selector, dict]:
    """Fit both scores on dev (the candidate score on ``features``, the silence score on the
    best values of ``question_features``) and choose the threshold with the most right
    decisions there among those within ``MAX_FALSE_REFUSAL``."""
    rows = [(c, f) for c, f in zip(cands, facts) if f is not None and c.replies]
    x = np.concatenate([c.columns(features) for c, _ in rows]) if rows else np.zeros((0, len(features)))
    y = np.concatenate([[right(r, f) for r in c.replies] for c, f in rows]) if rows else np.zeros(0, bool)
    sentence = Linear.fit(x, y)
    silence = Linear.fit(np.array([c.best(question_features) for c in cands]), np.array([f is None for f in facts]))
    selector = Selector(tuple(features), sentence, silence, 0.0, tuple(question_features))
    scores = [selector.silence_score(c) for c in cands]
    picks = [selector.pick(c) for c in cands]
    curve = []
    for cut in candidate_thresholds(scores):
        replies = [REFUSAL if s > cut else p for s, p in zip(scores, picks)]
        answerable = [(r, f) for r, f in zip(replies, facts) if f is not None]
        silent = [r for r, f in zip(replies, facts) if f is None]
        curve.append({"threshold": round(cut, 5), "right": sum(right(r, f) for r, f in zip(replies, facts)),
                      "answered_right": sum(right(r, f) for r, f in answerable),
                      "abstention": round(sum(map(is_refusal, silent)) / max(1, len(silent)), 4),
                      "false_refusal": round(sum(is_refusal(r) for r, _ in answerable) / max(1, len(answerable)), 4)})
    allowed = [p for p in curve if p["false_refusal"] <= MAX_FALSE_REFUSAL] or curve
    best = max(allowed, key=lambda p: (p["right"], -p["false_refusal"], -abs(p["threshold"])))
    selector.threshold = best["threshold"]
    report = {"chosen": best, "dev_rows": len(cands), "dev_silent": sum(f is None for f in facts),
              "sentence_right_if_answering": sum(right(p, f) for p, f in zip(picks, facts) if f is not None),
              "curve": curve}
    return selector, report


def leave_one_out(cands: list[Candidates], facts, features: tuple[str, ...],
                  question_features: tuple[str, ...] = QUESTION_FEATURES) -> int:
    """Right decisions on dev when each question is decided by a selector fitted on the others."""
    return sum(right(fit(cands[:i] + cands[i + 1:], facts[:i] + facts[i + 1:], features, question_features)[0]
                     .reply(c), f)
               for i, (c, f) in enumerate(zip(cands, facts)))


def choose(cands: list[Candidates], facts) -> tuple[Selector, dict]:
    """The selector whose features make the most right decisions on dev, leave one question
    out: the candidate score with or without the variant's own feature, the silence score with
    or without the question's unseen names. A tie goes to the simpler one (without the
    variant's feature first: it is the slow one)."""
    options = [(SENTENCE_FEATURES, QUESTION_FEATURES), (SENTENCE_FEATURES, QUESTION_FEATURES + (NAMES_FEATURE,)),
               (SENTENCE_FEATURES + (MODEL_FEATURE,), QUESTION_FEATURES),
               (SENTENCE_FEATURES + (MODEL_FEATURE,), QUESTION_FEATURES + (NAMES_FEATURE,))]
    counts = [leave_one_out(cands, facts, *option) for option in options]
    best = options[counts.index(max(counts))]  # index() finds the first, the simpler, of a tie
    selector, report = fit(cands, facts, *best)
    report["leave_one_out_right"] = {
        f"{'with' if MODEL_FEATURE in f else 'without'} {MODEL_FEATURE}, "
        f"{'with' if NAMES_FEATURE in q else 'without'} {NAMES_FEATURE}": n for (f, q), n in zip(options, counts)}
    return selector, report


def calibrate(model, tokenizer, embedder, reader, prompts: list[list[dict]],
              facts: list[list[list[str]] | None], out_dir: Path) -> dict:
    """Featurise the dev prompts, choose and fit the selector, write ``copying.json``; return metrics.
    ``facts`` holds each prompt's facts, None where the documents are silent."""
    if not prompts:
        return {}
    cands = featurize_all(model.eval(), tokenizer, embedder, reader, prompts, desc="dev copy features")
    selector, report = choose(cands, facts)
    (Path(out_dir) / SETTINGS_FILE).write_text(json.dumps({"selector": selector.to_dict(), **report}, indent=1))
    chosen = report["chosen"]
    return {"copy_dev_right": round(chosen["right"] / len(prompts), 4),
            "copy_dev_abstention": chosen["abstention"], "copy_dev_false_refusal": chosen["false_refusal"],
            "copy_reads_model": selector.reads_model}


def served_dev(cfg, retriever) -> tuple[list[list[dict]], list[list[list[str]] | None]]:
    """The dev split of the train records the dataset stage drew (all of them unless
    ``dataset.max_records`` samples a few), prompted as the service prompts them (passages
    retrieved through ``retriever``), and their facts (None where the documents are silent)."""
    import random

    from pipeline.data.records import load_split, sample_records, split_dev
    from pipeline.reader import served_messages

    drawn = sample_records(load_split(cfg.paths.resolve("qa"), "train"), cfg.dataset.max_records,
                           random.Random(cfg.seed))
    dev, _ = split_dev(drawn, cfg.dataset.validation_share)
    return [served_messages(r, retriever) for r in dev], [r.facts if r.answerable else None for r in dev]


def calibrate_variant(model, tokenizer, cfg, artifacts, out_dir: Path) -> dict:
    """``calibrate`` for a trained variant on the served dev split, with the index's embedder
    and the reader (what the service will use)."""
    from pipeline.reader import Reader
    from pipeline.retrieval.retriever import Retriever

    retriever = Retriever(artifacts.require("index"), cfg.retrieval)
    prompts, facts = served_dev(cfg, retriever)
    return calibrate(model, tokenizer, retriever.embedder, Reader(artifacts.require("reader")), prompts, facts,
                     out_dir)


def load_selector(variant_dir: Path) -> Selector | None:
    """The variant's fitted selector, or None when it has none (it then decodes freely)."""
    path = Path(variant_dir) / SETTINGS_FILE
    return Selector.from_dict(json.loads(path.read_text())["selector"]) if path.exists() else None

