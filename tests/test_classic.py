"""Each teaching module really learns (held-out thresholds, fixed seeds) and shows its concept."""
from __future__ import annotations

import pytest
import torch

from pipeline.classic import cnn, deep, logistic, rnn, seq2seq, shallow, skipgram, softmax, tinygpt


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("classic")


def test_logistic_learns_and_mse_saturates(out):
    metrics = logistic.run(quick=True, out_dir=out)
    assert metrics["test_accuracy"] > 0.93
    ce, mse = logistic.score_gradients(z=-6.0, y=1.0)  # confidently wrong: p = 0.0025, y = 1
    assert abs(ce) > 100 * abs(mse)
    assert (out / "logistic_loss_surfaces.png").exists()


def test_softmax_regression_and_its_properties(out):
    assert softmax.run(quick=True, out_dir=out)["test_accuracy"] > 0.9
    logits = torch.tensor([[1000.0, 1001.0, 999.0]])
    probs = softmax.softmax(logits)
    assert torch.isfinite(probs).all() and probs.sum().item() == pytest.approx(1.0)
    assert torch.allclose(softmax.softmax(logits + 5.0), probs)
    assert probs.argmax().item() == logits.argmax().item() == 1


def test_width_sweep_shows_under_and_overfitting(out):
    metrics = shallow.run(quick=True, out_dir=out)
    assert metrics["best_val_acc"] > 0.85
    assert metrics["width1_train_acc"] < metrics["best_val_acc"] - 0.1  # one unit underfits
    assert metrics["widest_gap"] > 0  # the widest net fits train better than validation


def test_deep_network_comparisons(out):
    m = deep.run(quick=True, out_dir=out)
    assert m["sigmoid_first_over_last_grad"] < 0.01 * m["relu_first_over_last_grad"]  # vanishing
    assert m["he_init_last_std"] > 5 * m["default_init_last_std"]
    assert m["adam_val_loss"] < m["sgd_val_loss"] and m["momentum_val_loss"] < m["sgd_val_loss"]
    assert m["dropout_gap"] < m["no_dropout_gap"]


def test_cnn_learns_and_transfer_keeps_frozen_features(out):
    m = cnn.run(quick=True, out_dir=out)
    assert m["test_accuracy"] > 0.9 and m["transfer_accuracy_5_to_9"] > 0.8
    assert m["frozen_features_unchanged"] is True


def test_gated_cells_remember(out):
    m = rnn.run(quick=True, out_dir=out)
    assert m["lstm_accuracy"] > 0.9 and m["gru_accuracy"] > 0.9


def test_skipgram_loss_falls_and_neighbours_exclude_the_word(out):
    m = skipgram.run(quick=True, out_dir=out)
    assert m["last_loss"] < 0.8 * m["first_loss"]
    assert "adam" not in m["neighbours_of_adam"].split(", ") and m["neighbours_of_adam"]


def test_seq2seq_reverses_strings(out):
    m = seq2seq.run(quick=True, out_dir=out)
    assert m["exact_match"] > 0.8 and m["bleu"] > 0.8


def test_tiny_gpt_beats_unigram_and_is_causal(out):
    m = tinygpt.run(quick=True, out_dir=out)
    assert m["held_out_perplexity"] < 0.7 * m["unigram_perplexity"]
    torch.manual_seed(0)
    model = tinygpt.TinyGPT(vocab=20, context=16).eval()
    x = torch.randint(0, 20, (1, 16))
    changed = x.clone()
    changed[0, 10] = (x[0, 10] + 1) % 20
    with torch.no_grad():
        assert torch.allclose(model(x)[0, :10], model(changed)[0, :10], atol=1e-6)
        assert not torch.allclose(model(x)[0, 10:], model(changed)[0, 10:])
