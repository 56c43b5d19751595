"""Copy decoding: candidates come from the prompt, the selector learns from dev, replies copy."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import copying
from pipeline.candidates import candidates, right
from pipeline.copying import FEATURES, Candidates, Linear, Selector, choose, fit
from pipeline.prompt import REFUSAL, build_messages, strip_citations
from tests.conftest import build_tiny_llama, build_tokenizer


class P:
    def __init__(self, title, text):
        self.title, self.headers, self.text = title, "", text


PASSAGES = [P("Adam", "Adam uses beta1 = 0.9 and beta2 = 0.999. It was proposed in 2014."),
            P("Dropout", "Dropout zeroes units with probability p. The paper used p = 0.5.")]


def test_candidates_are_the_shown_sentences_cited_to_their_passage():
    question, replies, headings = candidates(build_messages("What value of p did the dropout paper use?", PASSAGES))
    assert question == "What value of p did the dropout paper use?"
    assert replies == ["Adam uses beta1 = 0.9 and beta2 = 0.999 [1].", "It was proposed in 2014 [1].",
                       "Dropout zeroes units with probability p [2].", "The paper used p = 0.5 [2]."]
    assert headings == ["Adam", "Adam", "Dropout", "Dropout"]
    assert candidates(build_messages("hello", []))[1] == []


def test_right_needs_every_fact_and_refuses_only_silence():
    assert right("The paper used p = 0.5 [2].", [["0.5"]])
    assert not right("It was proposed in 2014 [1].", [["0.5"]])
    assert not right(REFUSAL, [["0.5"]])
    assert right(REFUSAL, None) and not right("The paper used p = 0.5 [2].", None)


def _synthetic(seed: int, n: int = 40, informative: int = 1):
    """Questions whose right sentence has the highest ``informative`` feature; silent ones have
    low maxima of the question features."""
    rng = np.random.default_rng(seed)
    cands, facts = [], []
    for i in range(n):
        replies = [f"sentence {i} {j} [1]." for j in range(4)]
        feats = rng.normal(size=(4, len(FEATURES)))
        silent = i % 3 == 0
        if silent:
            feats[:, :3] -= 2.0
            facts.append(None)
        else:
            good = int(rng.integers(4))
            feats[good, informative] += 3.0
            facts.append([[f"{i} {good}"]])
        cands.append(Candidates(f"q{i}", replies, feats))
    return cands, facts


def test_fit_learns_which_sentence_and_when_to_refuse():
    cands, facts = _synthetic(0)
    selector, report = fit(cands, facts)
    assert report["chosen"]["right"] >= 0.9 * len(cands)
    assert selector.sentence.weights[1] == max(selector.sentence.weights), "the informative feature leads"
    held_out, held_facts = _synthetic(1)
    hits = sum(right(selector.reply(c), f) for c, f in zip(held_out, held_facts))
    assert hits >= 0.85 * len(held_out)
    # round trip through copying.json's form
    again = Selector.from_dict(selector.to_dict())
    assert [again.reply(c) for c in held_out] == [selector.reply(c) for c in held_out]


def test_the_dev_split_decides_whether_the_variant_is_read():
    """``choose`` keeps the variant's own feature only where it makes more right decisions,
    leave one question out; without it, copy decoding never runs the variant."""
    informative_model = _synthetic(3, informative=FEATURES.index("question_likelihood"))
    selector, report = choose(*informative_model)
    counts = report["leave_one_out_right"]
    assert (counts["with question_likelihood, without unseen_names"]
            > counts["without question_likelihood, without unseen_names"])
    assert selector.reads_model and selector.features == copying.SENTENCE_FEATURES + ("question_likelihood",)
    selector, report = choose(*_synthetic(3))  # the model's feature is noise here
    assert not selector.reads_model and "question_likelihood" not in selector.features


def _silent_by_names(seed: int, n: int = 45, names_tell: bool = True):
    """Questions whose best reader score says little about silence; with ``names_tell``, the
    silent ones name something no shown passage mentions."""
    rng = np.random.default_rng(seed)
    cands, facts = [], []
    for i in range(n):
        silent = i % 3 == 0
        feats = rng.normal(size=(2, len(FEATURES)))
        feats[0, 0] += 2.0  # the right sentence leads
        feats[:, FEATURES.index("unseen_names")] = (1.0 if silent else 0.0) if names_tell else float(rng.integers(2))
        cands.append(Candidates(f"q{i}", [f"right {i} [1].", f"wrong {i} [1]."], feats))
        facts.append(None if silent else [[f"right {i}"]])
    return cands, facts


def test_the_dev_split_decides_whether_silence_reads_unseen_names():
    selector, report = choose(*_silent_by_names(7))
    counts = report["leave_one_out_right"]
    assert (counts["without question_likelihood, with unseen_names"]
            > counts["without question_likelihood, without unseen_names"])
    assert selector.question_features == ("reader_score", "unseen_names")
    held_out, facts = _silent_by_names(8)
    assert sum(right(selector.reply(c), f) for c, f in zip(held_out, facts)) >= 0.9 * len(held_out)
    selector, _ = choose(*_silent_by_names(7, names_tell=False))
    assert selector.question_features == ("reader_score",), "noise is left out"


def test_unseen_names_are_the_question_names_no_shown_passage_mentions():
    from pipeline.copying import question_names, unseen_names

    assert question_names("What is the default dropout rate in Keras Dropout layers?") == ["Keras", "Dropout"]
    assert question_names("How many GPUs trained GPT-3 in 2020?") == ["GPUs", "GPT-3"]  # 2020: a number
    assert question_names("Which task_type and nDCG@10 value?") == ["task_type", "nDCG"]
    assert question_names("Who proposed it?") == []
    shown = "Dropout zeroes units. ResNet uses BERT and the KL penalty; GPUs are fast."
    assert unseen_names("What is the default dropout rate in Keras Dropout layers?", shown) == 1
    assert unseen_names("What momentum trained the classic ResNets?", shown) == 0  # the singular is shown
    assert unseen_names("Do BERT-style encoders mask? And KL-penalised rewards?", shown) == 0
    assert unseen_names("How many layers does VGG-16 have, like GPT-3?", shown) == 2
    assert unseen_names("What does Adam do?", "adamant people") == 1, "at a word start, not inside a word"


def test_selector_refuses_above_threshold_and_without_candidates():
    names = FEATURES[:4]
    linear = Linear([0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0], 0.0)
    silence = Linear([0], [1], [-1], 0.0)  # reads the best reader score
    selector = Selector(names, linear, silence, threshold=0.0)
    strong = Candidates("q", ["a [1].", "b [2]."], np.array([[1, 0.2, 1, 1, 0], [1, 0.9, 1, 2, 0]], float))
    weak = Candidates("q", ["a [1].", "b [2]."], np.array([[-1, 0.2, -1, 1, 0], [-1, 0.1, -1, 2, 0]], float))
    assert selector.reply(strong) == "b [2]."
    assert selector.reply(weak) == REFUSAL
    assert selector.reply(Candidates("q", [], np.zeros((0, len(FEATURES))))) == REFUSAL


class OverlapEmbedder:
    """Bag-of-characters vectors: enough to give the similarity feature a value."""

    def encode(self, texts):
        vectors = np.zeros((len(texts), 128), dtype=np.float32)
        for i, text in enumerate(texts):
            for ch in text.lower():
                vectors[i, ord(ch) % 128] += 1
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


class LengthReader:
    """A reader stand-in: scores a sentence by its length, so each column can be checked."""

    def __init__(self):
        self.headings = []

    def scores(self, question, sentences, headings):
        self.headings.append(headings)
        return np.array([float(len(s)) for s in sentences])


def test_featurize_scores_every_candidate_with_the_reader_and_the_model():
    import torch

    tokenizer = build_tokenizer()
    model = build_tiny_llama(len(tokenizer))
    messages = build_messages("Which value did the paper use for p?", PASSAGES)
    reader = LengthReader()
    c = copying.featurize(model, tokenizer, OverlapEmbedder(), reader, messages)
    assert reader.headings == [["Adam", "Adam", "Dropout", "Dropout"]], "the reader reads each passage's heading"
    assert c.features.shape == (4, len(FEATURES))
    column = {name: c.features[:, i] for i, name in enumerate(FEATURES)}
    assert list(column["reader_score"]) == [len(strip_citations(r)) for r in c.replies]
    assert len(set(column["reader_score"])) == 3
    assert list(column["unseen_names"]) == [0, 0, 0, 0]
    keras = copying.featurize(model, tokenizer, OverlapEmbedder(), LengthReader(),
                              build_messages("Which value did Keras use for p in Dropout?", PASSAGES), with_model=False)
    assert list(keras.features[:, FEATURES.index("unseen_names")]) == [1, 1, 1, 1], "Keras is shown nowhere"
    likelihood = column["question_likelihood"]
    assert np.all(likelihood < 0) and len(set(np.round(likelihood, 6))) == 4, "one score per sentence"
    # the batched score equals scoring one sentence alone
    alone = copying.question_likelihoods(model, tokenizer, c.question, ["The paper used p = 0.5."])
    assert alone[0] == pytest.approx(likelihood[3], abs=1e-3)
    assert list(column["passage_rank"]) == [1, 1, 2, 2]
    assert column["word_overlap"][3] > max(column["word_overlap"][:3]), "only the last sentence holds 'paper'"
    without = copying.featurize(model, tokenizer, OverlapEmbedder(), LengthReader(), messages, with_model=False)
    assert not without.features[:, FEATURES.index("question_likelihood")].any()
    np.testing.assert_allclose(without.features[:, :4], c.features[:, :4])
    overlap_only = Selector(FEATURES[:4], Linear([0] * 4, [1] * 4, [0, 1, 0, 0], 0),
                            Linear([0], [1], [0], -1), 0.0)
    with torch.no_grad():
        cands = copying.featurize_all(model, tokenizer, OverlapEmbedder(), LengthReader(), [messages])
    assert [overlap_only.reply(c) for c in cands] == ["The paper used p = 0.5 [2]."]


def test_packed_likelihoods_equal_the_padded_batch():
    """Rows laid end to end with restarting positions score as the padded batch does: each row
    attends only within itself (a row reading its neighbours would move these by whole nats)."""
    from pipeline.scoring import answer_logprobs, packed_answer_logprobs

    tokenizer = build_tokenizer()
    model = build_tiny_llama(len(tokenizer)).eval()
    prompts = ["Passage: The paper used p = 0.5.\nQuestion:", "Passage: Adam was proposed in 2014 by Kingma.\nQuestion:",
               "Passage: Dropout.\nQuestion:"]
    answers = [" Which value did the paper use?", " Who proposed Adam?", " What is dropout in a network?"]
    padded = answer_logprobs(model, tokenizer, prompts, answers, batch_size=3)
    packed = packed_answer_logprobs(model, tokenizer, prompts, answers)
    assert len(set(np.round(padded, 4))) == 3
    np.testing.assert_allclose(packed, padded, rtol=0, atol=1e-4)


def test_a_copying_file_naming_unknown_features_is_refused_with_the_fix():
    from pipeline.errors import UserError

    raw = Selector(("word_overlap",), Linear([0], [1], [1], 0), Linear([0], [1], [0], 0), 0.0).to_dict()
    raw["features"] = ["word_overlap", "sentence_colour"]
    with pytest.raises(UserError, match="sentence_colour.*calibrate"):
        Selector.from_dict(raw)


def test_the_threshold_keeps_dev_false_refusals_within_the_bound():
    """Where the most right decisions would refuse answerable questions past the bound, the
    threshold gives up right decisions to stay within it."""
    rng = np.random.default_rng(5)
    cands, facts = [], []
    for i in range(60):
        silent = i < 40
        # silent questions outnumber answerable ones and overlap with the weakest of them
        best = rng.normal(-1.0 if silent else 1.0, 1.0)
        feats = np.zeros((2, len(FEATURES)))
        feats[:, 0] = [best, best - 1.0]
        cands.append(Candidates(f"q{i}", [f"right {i} [1].", f"wrong {i} [1]."], feats))
        facts.append(None if silent else [[f"right {i}"]])
    curve = fit(cands, facts)[1]["curve"]
    most = max(p["right"] for p in curve)
    assert min(p["false_refusal"] for p in curve if p["right"] == most) > copying.MAX_FALSE_REFUSAL, \
        "the case must need the bound"
    selector, report = fit(cands, facts)
    assert report["chosen"]["false_refusal"] <= copying.MAX_FALSE_REFUSAL
    assert report["chosen"]["right"] == max(p["right"] for p in curve
                                            if p["false_refusal"] <= copying.MAX_FALSE_REFUSAL)
    refused = sum(selector.reply(c) == REFUSAL for c, f in zip(cands, facts) if f is not None)
    assert refused / 20 <= copying.MAX_FALSE_REFUSAL


def test_fit_on_a_dev_split_with_one_class_still_decides():
    cands, _ = _synthetic(2, n=4)
    selector, report = fit(cands, [None] * 4)  # every dev row silent: refuse everything
    assert all(selector.reply(c) == REFUSAL for c in cands)
    assert report["chosen"]["abstention"] == 1.0


def test_a_referring_sentence_is_replied_with_the_sentence_it_leans_on():
    replies = ["Greedy decoding picks the most probable token [1].", "It is fast but can commit early [1].",
               "Beam search keeps k prefixes [2].", "This mismatch is called exposure bias [2]."]
    # "It" leans on the sentence before it, in the same passage
    assert copying.in_context(replies, 1) == ("Greedy decoding picks the most probable token. "
                                              "It is fast but can commit early [1].")
    # the next sentence of the same passage opens with "This": it goes along
    assert copying.in_context(replies, 2) == "Beam search keeps k prefixes. This mismatch is called exposure bias [2]."
    assert copying.in_context(replies, 3) == copying.in_context(replies, 2)
    # a referring sentence whose neighbour is another passage's goes alone; so does a plain one
    assert copying.in_context(replies[1:], 0) == replies[1]
    assert copying.in_context(["Beam search keeps k prefixes [2].", "It is fast [1]."], 0) == "Beam search keeps k prefixes [2]."
    # never past MAX_REPLY_WORDS
    long = ["word " * copying.MAX_REPLY_WORDS + "end [1].", "It is short [1]."]
    assert copying.in_context(long, 1) == long[1]


def test_the_selector_replies_its_pick_in_context():
    replies = ["The cost of teacher forcing is a mismatch [1].", "This mismatch is called exposure bias [1]."]
    feats = np.zeros((2, len(FEATURES)))
    feats[0, 0] = 1.0
    selector = Selector(("reader_score",), Linear([0.0], [1.0], [1.0], 0.0), Linear([0.0], [1.0], [-1.0], 0.0),
                        threshold=0.0)
    reply = selector.reply(Candidates("What is the mismatch called?", replies, feats))
    assert reply == "The cost of teacher forcing is a mismatch. This mismatch is called exposure bias [1]."
    assert right(reply, [["exposure bias"]])
