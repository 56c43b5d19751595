"""The reader (pipeline/reader.py) on a tiny hand-built BERT: it learns which sentence answers."""
from __future__ import annotations

import pytest

from pipeline.reader import Reader, ReaderSettings, labelled_pairs, reader_input, train

WORDS = ["what", "is", "the", "rate", "it", "was", "set", "to", "0.1", "paper", "used", "a", "large", "model",
         "answer", "about", "we", "tried", "many"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT, width 32, with a word-level vocabulary: a stand-in for MiniLM. Its weights
    are drawn at a trained model's scale: at BERT's 0.02 a random 2-layer [CLS] carries next to
    nothing of its input, and a LoRA adapter has nothing to amplify."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocabulary = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", ":"] + WORDS
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(vocabulary)})
    assert tokenizer.unk_token_id not in tokenizer("what is the rate?")["input_ids"]
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64,
                         initializer_range=0.2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_the_reader_learns_to_rank_the_answering_sentence_first(tiny_bert, tmp_path):
    question = "what is the rate?"
    answer, others = "it was set to 0.1.", ["the paper used a large model.", "we tried many."]
    pairs = [(question, answer, 1.0)] * 8 + [(question, s, 0.0) for s in others] * 8
    settings = ReaderSettings(epochs=12, batch_size=8, learning_rate=1e-2, warmup=0.0, max_length=32)
    metrics = train(pairs, tiny_bert, tmp_path, settings)
    assert metrics["train_pairs"] == 24 and metrics["train_positives"] == 8
    scores = Reader(tmp_path).scores(question, others[:1] + [answer] + others[1:])
    assert scores.argmax() == 1 and scores[1] > max(scores[0], scores[2]) + 1.0, scores
    assert len(Reader(tmp_path).scores(question, [])) == 0


def test_the_reader_reads_the_passage_heading(tiny_bert, tmp_path):
    """The same sentence answers under one heading and not under another."""
    question, sentence = "what is the rate?", "it was set to 0.1."
    pairs = [(question, reader_input("rate", sentence), 1.0)] * 8 + [(question, reader_input("model", sentence), 0.0)] * 8
    # one differing token among equal sentences: a gentler rate, more epochs than above
    train(pairs, tiny_bert, tmp_path, ReaderSettings(epochs=30, batch_size=8, learning_rate=3e-3, warmup=0.0,
                                                     max_length=32))
    under_rate, under_model = Reader(tmp_path).scores(question, [sentence, sentence], ["rate", "model"])
    assert under_rate > under_model + 1.0, (under_rate, under_model)


def test_training_without_both_kinds_of_sentence_is_refused(tiny_bert, tmp_path):
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="0 positives"):
        train([("what is it?", "we tried many.", 0.0)] * 3, tiny_bert, tmp_path, ReaderSettings())


def test_an_unbuilt_reader_names_the_stage_to_run(tmp_path):
    from pipeline.artifacts import MissingArtifact

    with pytest.raises(MissingArtifact, match="--only reader"):
        Reader(tmp_path)


class Record:
    def __init__(self, question, facts):
        self.question, self.facts, self.history = question, facts, []
        self.answerable = bool(facts)


class FixedRetriever:
    def __init__(self, passages):
        self.passages = passages

    def search(self, query):
        return self.passages


def test_pairs_label_the_sentence_holding_every_fact_and_nothing_for_a_silent_question():
    class P:
        def __init__(self, title, text):
            self.title, self.headers, self.text = title, "", text

    passages = [P("Rates", "The rate was set to 0.1. The paper used a large model.")]
    pairs = labelled_pairs([Record("What rate was set?", [["0.1"]]), Record("Who wrote it?", [])],
                           FixedRetriever(passages))
    # the sentence as copy decoding shows it to the reader: after its passage's heading, cited,
    # then the citation taken off
    assert pairs == [("What rate was set?", "Rates: The rate was set to 0.1 .", 1.0),
                     ("What rate was set?", "Rates: The paper used a large model .", 0.0),
                     ("Who wrote it?", "Rates: The rate was set to 0.1 .", 0.0),
                     ("Who wrote it?", "Rates: The paper used a large model .", 0.0)]


def test_reader_holdout_halves_leave_out_dev_and_do_not_overlap():
    """Recipes are compared on train questions only: two disjoint halves, the dev split in
    neither, the same halves for the same seed."""
    from types import SimpleNamespace

    from pipeline.data.records import in_dev_split
    from pipeline.reader_holdout import halves

    records = [SimpleNamespace(id=f"q-{i}") for i in range(200)]
    fit, scored = halves(records, 0.1, seed=0)
    dev = {r.id for r in records if in_dev_split(r.id, 0.1)}
    assert dev and not dev & {r.id for r in fit + scored}
    assert len(fit) + len(scored) == 200 - len(dev) and abs(len(fit) - len(scored)) <= 1
    assert not {r.id for r in fit} & {r.id for r in scored}
    assert [r.id for r in halves(records, 0.1, seed=0)[0]] == [r.id for r in fit]
    assert [r.id for r in halves(records, 0.1, seed=1)[0]] != [r.id for r in fit]
