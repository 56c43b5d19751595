"""The PPO loop for RLHF: rollouts with a LengthSampler, KL-penalised rewards, GAE, clipped updates.

The policy is a PEFT model (LoRA on the SFT weights); the reference is the same model with
its adapter disabled, so no second copy of the weights is held. The critic is a linear value
head on the policy's last hidden state: one forward pass gives log-probabilities and values,
which matters on a CPU where forward passes dominate the cost.
"""
from __future__ import annotations

import logging
import random
import statistics
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.rl.ppo_math import (AdaptiveKLController, FixedKLController, LengthSampler,
                                  clipped_policy_loss, clipped_value_loss, entropy_from_logits,
                                  explained_variance, gae, kl_penalty, masked_mean,
                                  per_token_rewards, whiten)

log = logging.getLogger("pipeline.ppo")
RewardFn = Callable[[list[list[dict]], list[str]], list[float]]


@dataclass
class PPOSettings:
    steps: int = 24  # PPO iterations: each samples a batch of rollouts, then updates
    batch_size: int = 8  # prompts per rollout batch
    minibatch_size: int = 4  # rollouts per gradient step
    ppo_epochs: int = 2  # passes over each rollout batch
    learning_rate: float = 5e-5
    response_min: int = 16  # LengthSampler: response length drawn from [min, max) tokens
    response_max: int = 48
    temperature: float = 0.7  # sampling settings for rollouts
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    kl_estimator: str = "kl"  # per-token KL estimator: kl, abs or mse
    kl_coef: float = 0.05  # initial (or fixed) KL coefficient beta
    adaptive_kl: bool = True  # Ziegler et al. 2019 controller towards target_kl
    target_kl: float = 1.0  # target KL per response, in nats
    kl_horizon: int = 100  # controller horizon, in rollouts (short runs need a short one)
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    clip_range: float = 0.2  # policy ratio clip
    clip_range_value: float = 0.2  # value clip
    vf_coef: float = 0.1  # weight of the value loss
    max_grad_norm: float = 1.0
    early_stop_kl: float = 0.05  # stop a step's epochs when approx KL(old, new) per token exceeds it
    whiten_advantages: bool = True
    seed: int = 0


class Trajectory(NamedTuple):
    """One rollout batch. B = rollouts, P = prompt tokens (left-padded), T = response tokens."""

    input_ids: torch.Tensor  # (B, P + T) prompt then response token ids
    attention_mask: torch.Tensor  # (B, P + T) 1 on real tokens
    mask: torch.Tensor  # (B, T) 1 on real response tokens
    old_logprobs: torch.Tensor  # (B, T) policy log-probs at sampling time
    ref_logprobs: torch.Tensor  # (B, T) reference (adapter disabled) log-probs
    old_values: torch.Tensor  # (B, T) critic values at sampling time
    advantages: torch.Tensor  # (B, T)
    returns: torch.Tensor  # (B, T)


class ValueHead(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.linear.weight, std=1.0 / (hidden_size + 1))
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


def forward(model, value_head, input_ids, attention_mask, prompt_len: int, with_values: bool = True,
            temperature: float = 1.0):
    """(log-probs of the response tokens, values, entropies), each (B, T).

    Logits are divided by the sampling temperature, so the log-probabilities are those of the
    distribution the rollouts were drawn from; otherwise PPO's importance ratios and the policy
    gradient refer to a different policy, and entropy collapses.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    # Only the positions that predict a response token go through the 49k-word LM head, not
    # the ~600 prompt positions before them.
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=with_values, logits_to_keep=input_ids.shape[1] - prompt_len + 1)
    logits = out.logits[:, :-1].float() / temperature
    targets = input_ids[:, prompt_len:]
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    values = value_head(out.hidden_states[-1][:, prompt_len - 1:-1]) if with_values else None
    return logprobs, values, entropy_from_logits(logits.detach())


def sample(model, tokenizer, prompts: list[list[dict]], lengths: list[int], settings: PPOSettings):
    """Sample a response to each prompt, at most ``lengths[i]`` tokens (the LengthSampler's
    draw), through the project's decode loop (pipeline/generation.py); returns (input_ids,
    attention_mask, response mask, prompt_len, texts): prompts left-padded to one length,
    responses after them, the end-of-turn token kept in the mask where a response stopped."""
    from pipeline.generation import Row, decode_all, prompt_text

    rows = [Row(tokenizer(prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"], lambda text: None,
                length, settings.temperature, settings.top_p, settings.repetition_penalty, top_k=settings.top_k)
            for p, length in zip(prompts, lengths)]
    with torch.no_grad():
        decode_all(model, tokenizer, rows, batch_size=len(rows))
    end = tokenizer.eos_token_id
    pad = end if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    responses = [row.generated + ([end] if row.stopped else []) for row in rows]
    prompt_len, width = max(len(r.prompt_ids) for r in rows), max(1, max(map(len, responses)))
    input_ids = torch.full((len(rows), prompt_len + width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    mask = torch.zeros(len(rows), width)
    for i, (row, response) in enumerate(zip(rows, responses)):
        start = prompt_len - len(row.prompt_ids)
        input_ids[i, start:prompt_len] = torch.tensor(row.prompt_ids)
        input_ids[i, prompt_len:prompt_len + len(response)] = torch.tensor(response, dtype=torch.long)
        attention_mask[i, start:prompt_len + len(response)] = 1
        mask[i, :len(response)] = 1.0
    decoded = [tokenizer.decode(row.generated, skip_special_tokens=True).strip() for row in rows]
    device = model.device
    return input_ids.to(device), attention_mask.to(device), mask.to(device), prompt_len, decoded


def make_trajectory(model, value_head, input_ids, attention_mask, mask, prompt_len, scores,
                    kl_coef: float, settings: PPOSettings):
    with torch.no_grad():
        t = settings.temperature
        old_logprobs, old_values, entropy = forward(model, value_head, input_ids, attention_mask, prompt_len,
                                                    temperature=t)
        with model.disable_adapter():
            ref_logprobs, _, _ = forward(model, value_head, input_ids, attention_mask, prompt_len, False, t)
    kl = kl_penalty(old_logprobs, ref_logprobs, settings.kl_estimator) * mask
    rewards = per_token_rewards(torch.tensor(scores, dtype=torch.float, device=kl.device), kl, mask, kl_coef)
    advantages, returns = gae(rewards, old_values, mask, settings.gamma, settings.lam)
    if settings.whiten_advantages:
        advantages = whiten(advantages, mask)
    trajectory = Trajectory(input_ids, attention_mask, mask, old_logprobs, ref_logprobs,
                            old_values * mask, advantages, returns)
    stats = {"kl": float((kl.sum(1)).mean()), "entropy": float(masked_mean(entropy, mask))}
    return trajectory, stats


def update(model, value_head, optimizer, trajectory: Trajectory, prompt_len: int, settings: PPOSettings,
           rng: random.Random, backward=None, mean_across=None) -> dict:
    """Several epochs of clipped PPO updates over minibatches; early stop when KL runs away.

    Under several processes ``model`` and ``value_head`` are the DDP-wrapped modules (so the
    backward pass averages gradients) and ``mean_across`` averages a number over processes,
    so every process takes the same early-stop decision.
    """
    backward = backward or (lambda loss: loss.backward())
    mean_across = mean_across or (lambda value: value)
    params = [p for p in model.parameters() if p.requires_grad] + list(value_head.parameters())
    n = trajectory.input_ids.shape[0]
    logs = {"policy_loss": [], "value_loss": [], "clip_fraction": [], "approx_kl": []}
    stopped_early = False
    for _ in range(settings.ppo_epochs):
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, n, settings.minibatch_size):
            idx = torch.tensor(order[start:start + settings.minibatch_size], device=trajectory.input_ids.device)
            part = Trajectory(*(t[idx] for t in trajectory))
            logprobs, values, _ = forward(model, value_head, part.input_ids, part.attention_mask, prompt_len,
                                          temperature=settings.temperature)
            policy_loss, clip_fraction, approx_kl = clipped_policy_loss(
                logprobs, part.old_logprobs, part.advantages, part.mask, settings.clip_range)
            value_loss = clipped_value_loss(values, part.old_values, part.returns, part.mask,
                                            settings.clip_range_value)
            optimizer.zero_grad()
            backward(policy_loss + settings.vf_coef * value_loss)
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            for key, value in (("policy_loss", policy_loss.item()), ("value_loss", value_loss.item()),
                               ("clip_fraction", clip_fraction), ("approx_kl", approx_kl)):
                logs[key].append(value)
            if mean_across(approx_kl) > settings.early_stop_kl:
                stopped_early = True
                break
        if stopped_early:
            break
    summary = {key: statistics.fmean(values) for key, values in logs.items() if values}
    summary["stopped_early"] = stopped_early
    return summary


def train(model, tokenizer, prompts: list[list[dict]], reward_fn: RewardFn, settings: PPOSettings,
          accelerator=None) -> tuple[list[dict], ValueHead]:
    """Run PPO; returns (per-step log, value head). ``model`` must be a PEFT model.

    With an ``accelerator`` over several processes (``accelerate launch``), each process
    samples its own rollouts (its own seed), gradients are averaged by DDP, and the KL that
    drives the controller is the mean over processes, so every process keeps the same kl_coef.
    """
    rank = accelerator.process_index if accelerator is not None else 0
    rng = random.Random(settings.seed + rank)
    torch.manual_seed(settings.seed + rank)
    model.eval()  # no dropout: rollout and update log-probs must agree
    value_head = ValueHead(model.config.hidden_size).to(model.device)
    params = [p for p in model.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate)
    policy, head = model, value_head  # unwrapped: generate, adapter switching, no-grad passes
    backward = None

    def mean_across(value: float) -> float:  # one process: the value itself
        return value

    if accelerator is not None:
        model, value_head, optimizer = accelerator.prepare(model, value_head, optimizer)
        backward = accelerator.backward

        def mean_across(value: float) -> float:
            return float(accelerator.reduce(torch.tensor(float(value), device=accelerator.device), reduction="mean"))
    controller = (AdaptiveKLController(settings.kl_coef, settings.target_kl, settings.kl_horizon)
                  if settings.adaptive_kl else FixedKLController(settings.kl_coef))
    lengths = LengthSampler(settings.response_min, settings.response_max, rng)
    history = []
    for step in tqdm(range(settings.steps), desc="PPO", unit="step"):
        batch = [prompts[rng.randrange(len(prompts))] for _ in range(settings.batch_size)]
        input_ids, attention_mask, mask, prompt_len, texts = sample(
            policy, tokenizer, batch, [lengths() for _ in batch], settings)
        scores = reward_fn(batch, texts)
        trajectory, stats = make_trajectory(policy, head, input_ids, attention_mask, mask,
                                            prompt_len, scores, controller.value, settings)
        kl_coef = controller.value
        stats.update(update(model, value_head, optimizer, trajectory, prompt_len, settings, rng, backward,
                            mean_across))
        stats["kl"] = mean_across(stats["kl"])
        controller.update(stats["kl"], settings.batch_size)
        with torch.no_grad():
            _, values, _ = forward(policy, head, input_ids, attention_mask, prompt_len,
                                   temperature=settings.temperature)
        row = {"step": step, "reward_mean": statistics.fmean(scores),
               "reward_std": statistics.pstdev(scores), "kl_coef": kl_coef,
               "response_length": float(mask.sum(1).mean()),
               "explained_variance": explained_variance(values, trajectory.returns, mask), **stats}
        history.append(row)
        log.info("step %d: reward %.3f +- %.3f, kl %.3f (coef %.4f), entropy %.2f, clip %.2f",
                 step, row["reward_mean"], row["reward_std"], row["kl"], kl_coef, row["entropy"],
                 row.get("clip_fraction", 0.0))
    return history, head
