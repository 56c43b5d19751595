"""PPO math worked out by hand, and a learning test on a tiny model with a synthetic reward."""
from __future__ import annotations

import random
import statistics

import pytest
import torch

from pipeline.rl.ppo_math import (AdaptiveKLController, FixedKLController, LengthSampler,
                                  clipped_policy_loss, clipped_value_loss, gae, kl_penalty,
                                  masked_mean, per_token_rewards, whiten)


def test_kl_estimators():
    logprobs, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    assert kl_penalty(logprobs, ref, "kl").tolist() == [[0.5, -1.0]]
    assert kl_penalty(logprobs, ref, "abs").tolist() == [[0.5, 1.0]]
    assert kl_penalty(logprobs, ref, "mse").tolist() == [[0.125, 0.5]]
    with pytest.raises(ValueError, match="kl estimator"):
        kl_penalty(logprobs, ref, "full")


def test_gae_three_steps_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    # gamma 1, lambda 0.9: deltas 0.1, 0.1, 0.3; A2 = 0.3, A1 = 0.1 + 0.9*0.3, A0 = 0.1 + 0.9*0.37
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.9)
    torch.testing.assert_close(advantages, torch.tensor([[0.433, 0.37, 0.3]]))
    torch.testing.assert_close(returns, torch.tensor([[0.933, 0.97, 1.0]]))
    # gamma 0.5, lambda 1: deltas -0.2, -0.25, 0.3; A1 = -0.25 + 0.5*0.3, A0 = -0.2 + 0.5*(-0.1)
    advantages, _ = gae(rewards, values, mask, gamma=0.5, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[-0.25, -0.1, 0.3]]))
    # padding after the last real token contributes nothing
    padded, _ = gae(torch.tensor([[0.0, 1.0, 5.0]]), values, torch.tensor([[1.0, 1.0, 0.0]]), 1.0, 1.0)
    torch.testing.assert_close(padded, torch.tensor([[0.5, 0.4, 0.0]]))


def test_rewards_put_the_score_on_the_last_real_token():
    rewards = per_token_rewards(torch.tensor([2.0]), torch.tensor([[0.1, 0.2, 0.3]]),
                                torch.tensor([[1.0, 1.0, 0.0]]), kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 1.9, 0.0]]))


def test_clipped_policy_loss_by_hand():
    old, new = torch.zeros(1, 1), torch.log(torch.tensor([[1.5]]))
    mask = torch.ones(1, 1)
    loss, clip_fraction, approx_kl = clipped_policy_loss(new, old, torch.ones(1, 1), mask, clip=0.2)
    assert loss.item() == pytest.approx(-1.2) and clip_fraction == 1.0  # ratio capped at 1.2
    assert approx_kl == pytest.approx(0.5 * torch.log(torch.tensor(1.5)).item() ** 2)
    loss, clip_fraction, _ = clipped_policy_loss(new, old, -torch.ones(1, 1), mask, clip=0.2)
    assert loss.item() == pytest.approx(1.5) and clip_fraction == 0.0  # pessimistic side kept


def test_clipped_value_loss_by_hand():
    mask = torch.ones(1, 1)
    # V moved from 1 to 2, target 0: unclipped error 4, clipped (1.2) 1.44 -> max 4 -> 0.5 * 4
    assert clipped_value_loss(torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.zeros(1, 1), mask,
                              0.2).item() == pytest.approx(2.0)
    # V moved to the target 0.5 from 1: unclipped 0, clipped (0.8) 0.09 -> 0.045
    assert clipped_value_loss(torch.tensor([[0.5]]), torch.tensor([[1.0]]), torch.tensor([[0.5]]),
                              mask, 0.2).item() == pytest.approx(0.045)


def test_adaptive_kl_controller_update():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    controller.update(current_kl=9.0, n_steps=256)  # error clipped to +0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    controller.update(current_kl=5.4, n_steps=100)  # error -0.1
    assert controller.value == pytest.approx(0.1 * (1 - 0.1 * 100 / 10_000))
    fixed = FixedKLController(0.3)
    fixed.update(100.0, 64)
    assert fixed.value == 0.3


def test_length_sampler_and_whitening():
    sampler = LengthSampler(4, 8, random.Random(0))
    draws = [sampler() for _ in range(400)]
    assert set(draws) == {4, 5, 6, 7}
    with pytest.raises(ValueError, match="low < high"):
        LengthSampler(5, 5, random.Random(0))
    values, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    white = whiten(values, mask)
    assert masked_mean(white, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert white[0, 3].item() == 0.0


def _tiny_policy(seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from conftest import build_tiny_llama, build_tokenizer

    tokenizer = build_tokenizer()
    config = build_tiny_llama(len(tokenizer)).config
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "lm_head"])
    return get_peft_model(model, lora), tokenizer


def _vowel_share(batch, texts):
    return [sum(ch in "aeiou" for ch in text) / max(1, len(text)) for text in texts]


def _run(kl_coef: float):
    from pipeline.rl.trainer import PPOSettings, train

    policy, tokenizer = _tiny_policy()
    prompts = [[{"role": "user", "content": q}] for q in ("hi", "tell me", "what is it", "go")]
    settings = PPOSettings(steps=24, batch_size=8, minibatch_size=4, ppo_epochs=2, learning_rate=2e-2,
                           response_min=8, response_max=16, temperature=1.0, kl_coef=kl_coef,
                           adaptive_kl=False, early_stop_kl=10.0, seed=0)
    history, _ = train(policy, tokenizer, prompts, _vowel_share, settings)
    quarter = len(history) // 4
    rewards = [row["reward_mean"] for row in history]
    return (statistics.fmean(rewards[:quarter]), statistics.fmean(rewards[-quarter:]),
            [row["kl"] for row in history], policy)


def test_ppo_raises_a_synthetic_reward_and_a_large_kl_coef_holds_the_policy():
    first, last, kls, policy = _run(kl_coef=0.01)
    assert last > 3 * first and last > 0.3, (first, last)
    assert max(kls) < 60, "KL must stay bounded"
    base_weights = {n: p for n, p in policy.named_parameters() if "lora" not in n}
    assert all(not p.requires_grad for p in base_weights.values()), "only the adapter trains"

    held_first, held_last, held_kls, _ = _run(kl_coef=5.0)
    assert statistics.fmean(held_kls[-6:]) < 2.0 < statistics.fmean(kls[-6:])
    assert held_last - held_first < last - first


def test_logprobs_use_the_sampling_temperature():
    """The rollout distribution is softmax(logits / T): PPO must score tokens under it."""
    from pipeline.rl.trainer import ValueHead, forward

    policy, _ = _tiny_policy()
    ids = torch.randint(4, 90, (1, 12))
    mask = torch.ones_like(ids)
    head = ValueHead(policy.config.hidden_size)
    with torch.no_grad():
        logits = policy(input_ids=ids).logits[:, 5:-1].float()
        at_half, _, _ = forward(policy, head, ids, mask, prompt_len=6, temperature=0.5)
        plain, _, _ = forward(policy, head, ids, mask, prompt_len=6)
    expected = torch.log_softmax(logits / 0.5, -1).gather(-1, ids[:, 6:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(at_half, expected)
    assert not torch.allclose(at_half, plain)


def test_ppo_runs_unchanged_under_several_processes(tmp_path):
    """Two CPU processes under torchrun (the launcher `accelerate launch --multi_gpu` uses), DDP
    over gloo: each draws its own rollouts, and the replicas stay identical after every step."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               str(Path(__file__).parent / "ppo_ddp_check.py"), str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["processes"] for r in ranks] == [2, 2]
    assert ranks[0]["sampled"] != ranks[1]["sampled"], "each process must draw its own rollouts"
    assert ranks[0]["moved"] > 0
    assert ranks[0]["weights"] == ranks[1]["weights"], "DDP must keep the replicas identical"
    assert ranks[0]["kl_coef"] == ranks[1]["kl_coef"], "the KL controller must agree across processes"


def test_rollouts_come_from_the_decode_loop_with_each_rows_length():
    """PPO's sampling runs on pipeline.generation's loop: with top-k 1 a sample is the greedy
    reply, cut at the row's LengthSampler draw; the tensors line up with the texts."""
    from conftest import build_tiny_llama, build_tokenizer
    from pipeline.generation import prompt_text
    from pipeline.rl.trainer import PPOSettings, sample

    tokenizer = build_tokenizer()
    model = build_tiny_llama(len(tokenizer), initializer_range=0.5)
    prompts = [[{"role": "user", "content": q}] for q in ("hi", "tell me more about it", "go")]
    lengths = [5, 9, 3]
    settings = PPOSettings(temperature=1.0, top_k=1, top_p=1.0, repetition_penalty=1.0)
    input_ids, attention, mask, prompt_len, texts = sample(model, tokenizer, prompts, lengths, settings)
    for i, (prompt, length) in enumerate(zip(prompts, lengths)):
        ids = tokenizer(prompt_text(tokenizer, prompt), return_tensors="pt", add_special_tokens=False)["input_ids"]
        greedy = model.generate(ids, max_new_tokens=length, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected = greedy[0, ids.shape[1]:]
        taken = int(mask[i].sum())
        assert taken <= length
        assert input_ids[i, prompt_len:prompt_len + taken].tolist() == expected[:taken].tolist()
        assert input_ids[i, prompt_len - ids.shape[1]:prompt_len].tolist() == ids[0].tolist()
        assert int(attention[i].sum()) == ids.shape[1] + taken
        assert texts[i] == tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert len(set(texts)) > 1
