"""Stage `ppo`: RLHF with our own PPO (KL penalty, adaptive KL, LengthSampler) on the SFT model.

Reads:  `sft` (merged: the policy's starting point and, with the PPO adapter disabled, the
        reference), `reward` (scores each (prompt, response)), `dataset` (prompts.jsonl for
        rollouts; sft_val.jsonl prompts, never trained on, for the before/after comparison).
Writes: artifacts/ppo/adapter/ (LoRA), value_head.pt, history.jsonl, curves.png (also in
        reports/ppo_curves.png), meta.json with reward and KL by quarter and the held-out
        token F1 of the PPO and SFT policies' greedy answers against the dev targets (a judge
        PPO was not optimised against), and the refusal threshold chosen on the dev split.
Alone:  python -m pipeline run --only ppo [ppo.train.steps=40 ppo.train.kl_coef=0.1]

Value head, not a separate critic adapter: one forward pass then yields log-probabilities
and values, and forward passes are what a CPU spends its time on.
"""
from __future__ import annotations

import json
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.rl.trainer import PPOSettings
from pipeline.training import LoraSettings

PARENTS = ("sft", "reward", "dataset", "reader")


@dataclass
class Config:
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(dropout=0.0))
    train: PPOSettings = field(default_factory=PPOSettings)  # the PPO loop: ppo.train.steps=40
    held_out_prompts: int = 32  # sft_val prompts answered greedily by SFT and PPO, then scored
    max_new_tokens: int = 64  # answer length for that comparison


def inputs(cfg) -> list[Path]:
    return []


def quarter_means(values: list[float]) -> tuple[float, float]:
    quarter = max(1, len(values) // 4)
    return statistics.fmean(values[:quarter]), statistics.fmean(values[-quarter:])


def plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["reward_mean", "kl", "kl_coef", "entropy", "clip_fraction", "value_loss", "approx_kl",
            "response_length"]
    fig, axes = plt.subplots(2, 4, figsize=(13, 5.5))
    for ax, key in zip(axes.flat, keys):
        ax.plot([row["step"] for row in history], [row.get(key, float("nan")) for row in history])
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.suptitle("PPO: per-step statistics")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(config: Config, ctx) -> dict:
    import torch
    from accelerate import Accelerator
    from peft import get_peft_model

    from pipeline.generation import generate_batch
    from pipeline.rl.trainer import train
    from pipeline.scoring import reward_scores
    from pipeline.answerability import calibrate
    from pipeline.copying import calibrate_variant
    from pipeline.evaluation.metrics import token_f1
    from pipeline.training import (chain_of, load_causal_lm, load_reward_model, peft_config, read_rows,
                                   write_history)

    data = ctx.parent("dataset")
    chain = chain_of(ctx.artifacts, "sft")
    model, tokenizer = load_causal_lm(ctx.artifacts, chain)
    policy = get_peft_model(model, peft_config(config.lora))
    scorer, score_tokenizer = load_reward_model(ctx.artifacts)
    rows = [json.loads(line) for line in (data / "prompts.jsonl").read_text().splitlines() if line]
    prompts = [row["prompt"] for row in rows]

    def reward_fn(batch, texts):
        conversations = [p + [{"role": "assistant", "content": t}] for p, t in zip(batch, texts)]
        return reward_scores(scorer, score_tokenizer, conversations)

    settings = config.train
    settings.seed = ctx.config.seed
    history, value_head = train(policy, tokenizer, prompts, reward_fn, settings, Accelerator(cpu=not torch.cuda.is_available()))
    policy.save_pretrained(ctx.out_dir / "adapter")
    torch.save(value_head.state_dict(), ctx.out_dir / "value_head.pt")
    write_history(history, ctx.out_dir / "history.jsonl")
    plot(history, ctx.out_dir / "curves.png")
    shutil.copy(ctx.out_dir / "curves.png", ctx.reports_dir / "ppo_curves.png")

    decision = calibrate(policy, tokenizer, read_rows(data / "sft_val.jsonl"), ctx.out_dir)
    decision.update(calibrate_variant(policy, tokenizer, ctx.config, ctx.artifacts, ctx.out_dir))
    # Judged by token F1 against the dev targets, not by the reward model PPO optimised.
    dev = read_rows(data / "sft_val.jsonl")[: config.held_out_prompts]
    held_out = [row["prompt"] for row in dev]
    targets = [row["completion"][0]["content"] for row in dev]
    ppo_answers = generate_batch(policy, tokenizer, held_out, config.max_new_tokens, desc="PPO answers")
    with policy.disable_adapter():
        sft_answers = generate_batch(policy, tokenizer, held_out, config.max_new_tokens, desc="SFT answers")
    ppo_f1 = [token_f1(a, t) for a, t in zip(ppo_answers, targets)]
    sft_f1 = [token_f1(a, t) for a, t in zip(sft_answers, targets)]
    first_reward, last_reward = quarter_means([row["reward_mean"] for row in history])
    first_kl, last_kl = quarter_means([row["kl"] for row in history])
    return {
        "adapter_chain": chain + ["ppo"], "steps": len(history), "rollouts": len(history) * settings.batch_size,
        "reward_first_quarter": round(first_reward, 4), "reward_last_quarter": round(last_reward, 4),
        "kl_first_quarter": round(first_kl, 4), "kl_last_quarter": round(last_kl, 4),
        "kl_max": round(max(row["kl"] for row in history), 4), "target_kl": settings.target_kl,
        "final_kl_coef": round(history[-1]["kl_coef"], 5),
        "held_out_prompts": len(held_out),
        "held_out_f1_ppo": round(statistics.fmean(ppo_f1), 4) if ppo_f1 else None,
        "held_out_f1_sft": round(statistics.fmean(sft_f1), 4) if sft_f1 else None, **decision,
    }
