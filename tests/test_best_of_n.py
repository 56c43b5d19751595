"""Best-of-n: the reward model chooses among the copy selector's n best sentences."""
from __future__ import annotations

import numpy as np

from pipeline import scoring
from pipeline.best_of_n import best_of, reward_ranked
from pipeline.copying import FEATURES, Candidates, Linear, Selector
from pipeline.prompt import REFUSAL

REPLIES = ["a [1].", "b [1].", "c [2].", "d [2].", "e [3]."]
OVERLAP = [0.1, 0.9, 0.5, 0.7, 0.3]  # the selector ranks b, d, c, e, a
REWARD = {"a [1].": 5.0, "b [1].": 0.0, "c [2].": 2.0, "d [2].": 1.0, "e [3].": 3.0}


def _selector() -> Selector:
    overlap_only = Linear([0] * 4, [1] * 4, [0, 1, 0, 0], 0.0)
    return Selector(FEATURES[:4], overlap_only, Linear([0], [1], [-1], 0.0), threshold=0.0)


def _candidates(reader_best: float) -> Candidates:
    features = np.zeros((len(REPLIES), len(FEATURES)))
    features[:, 0] = reader_best
    features[:, 1] = OVERLAP
    return Candidates("q", REPLIES, features)


def test_the_reward_model_chooses_among_the_n_best_and_n_1_is_copy_decoding(monkeypatch):
    seen = []

    def rewards(model, tokenizer, conversations, batch_size=8):
        seen.append(conversations)
        return [REWARD[c[-1]["content"]] for c in conversations]

    monkeypatch.setattr(scoring, "reward_scores", rewards)
    selector, cands = _selector(), _candidates(reader_best=2.0)
    messages = [{"role": "user", "content": "q"}]
    scored = reward_ranked(selector, None, None, messages, cands, most=4)
    assert [REPLIES[i] for i, _ in scored] == ["b [1].", "d [2].", "c [2].", "e [3]."]
    assert seen[0][0] == messages + [{"role": "assistant", "content": "b [1]."}], "scored as the reply to the prompt"
    assert best_of(scored, REPLIES, 1) == selector.reply(cands) == "b [1]."
    assert best_of(scored, REPLIES, 2) == "d [2]."
    assert best_of(scored, REPLIES, 4) == "e [3].", "a [1]. has the highest reward but is ranked past 4"


def test_best_of_n_keeps_the_selectors_refusal_without_scoring(monkeypatch):
    monkeypatch.setattr(scoring, "reward_scores", lambda *a, **k: (_ for _ in ()).throw(AssertionError("scored")))
    selector, silent = _selector(), _candidates(reader_best=-2.0)
    assert selector.reply(silent) == REFUSAL
    assert best_of(reward_ranked(selector, None, None, [], silent, most=8), REPLIES, 8) == REFUSAL


def test_best_of_n_rows_are_compared_with_the_copy_row():
    from pipeline.evaluation.loop import Run
    from pipeline.evaluation.report import previous_rows, row_key

    assert row_key(Run("sft", "best-of-4", True)) == "sft best-of-4"
    assert previous_rows("sft best-of-4", {"sft copy": None, "sft best-of-4": None}) == ["sft copy"]
