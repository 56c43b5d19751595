"""PPO math for RLHF as pure functions. Shapes: B = batch of responses, T = response tokens.

``mask`` is a (B, T) float tensor, 1 on real response tokens and 0 on padding after them.
References: Schulman et al. 2017 (PPO), Schulman et al. 2015 (GAE), Ziegler et al. 2019
(per-token KL penalty, adaptive KL controller), Schulman's note "Approximating KL Divergence".
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

KL_ESTIMATORS = ("kl", "abs", "mse")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where ``mask`` is 1; a scalar."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to unit variance (and zero mean) over the masked positions; (B, T)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(variance + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "kl") -> torch.Tensor:
    """Per-token KL estimate from sampled tokens; (B, T) -> (B, T).

    kl:  log p - log q        (k1: unbiased, can be negative per token)
    abs: |log p - log q|
    mse: 0.5 (log p - log q)^2 (k2: non-negative, lower variance, biased)
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "kl":
        return log_ratio
    if estimator == "abs":
        return log_ratio.abs()
    if estimator == "mse":
        return 0.5 * log_ratio.pow(2)
    raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, not '{estimator}'")


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float) -> torch.Tensor:
    """-kl_coef * KL at every response token, plus the reward-model score on the last one.

    scores: (B,); kl, mask: (B, T) -> (B, T)
    """
    rewards = -kl_coef * kl * mask
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation; (B, T) each -> (advantages, returns), (B, T) each.

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  R_t = A_t + V_t.
    Past the last real token, V and A are 0.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, clip: float = 0.2) -> tuple[torch.Tensor, float, float]:
    """PPO-clip loss; (B, T) each -> (scalar loss, clip fraction, approximate KL old->new).

    loss = mean(max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip))), ratio = exp(new - old).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask).item()
    approx_kl = masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask).item()
    return loss, clip_fraction, approx_kl


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, clip: float = 0.2) -> torch.Tensor:
    """0.5 * mean(max((V - R)^2, (clip(V, V_old +- clip) - R)^2)); (B, T) each -> scalar."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped_values - returns) ** 2), mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's next-token distribution; (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019: e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e * n / horizon."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


@dataclass
class LengthSampler:
    """Draws an integer uniformly from [low, high), as the classic TRL sentiment recipe did."""

    low: int
    high: int
    rng: random.Random

    def __post_init__(self):
        if self.high <= self.low:
            raise ValueError(f"LengthSampler needs low < high, got [{self.low}, {self.high})")

    def __call__(self) -> int:
        return self.rng.randrange(self.low, self.high)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R) over the masked positions: how well the critic tracks returns."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return float(1 - var_residual / var_returns) if var_returns > 0 else math.nan
