"""Stage `reward`: a reward model (LoRA + score head on the SFT model) with TRL's RewardTrainer.

Reads:  the `sft` artifact (its adapter is merged into the body first) and `dataset`
        (prefs.jsonl to train, prefs_val.jsonl held out).
Writes: artifacts/reward/adapter/ (LoRA + score head), history.jsonl, curves.png and
        margins.png (also in reports/), meta.json with held-out pairwise accuracy, the
        margin distribution and accuracy per rejection kind.
Alone:  python -m pipeline run --only reward

Bradley-Terry loss: -log sigmoid(r(chosen) - r(rejected)) (Bradley and Terry, 1952).
"""
from __future__ import annotations

import shutil
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.training import LoraSettings

PARENTS = ("sft", "dataset")


@dataclass
class Config:
    lora: LoraSettings = field(default_factory=LoraSettings)
    learning_rate: float = 1e-4
    epochs: float = 1.0  # passes over prefs.jsonl (ignored when max_steps > 0)
    max_steps: int = 0  # stop after this many optimiser steps (0 = use epochs)
    batch_size: int = 4  # pairs per device per step
    grad_accum: int = 2
    max_length: int = 768  # tokens per (prompt + answer)
    bf16: bool | str = "auto"  # bf16 autocast: auto (if the CPU/GPU has it), true, false
    activation_checkpointing: bool = False  # recompute activations: less memory, ~30% slower
    eval_rows: int = 0  # cap on held-out pairs scored (0 = all)
    logging_steps: int = 5


def inputs(cfg) -> list[Path]:
    return []


def held_out_report(model, tokenizer, rows: list[dict]) -> dict:
    """Pairwise accuracy, margin statistics and accuracy per rejection kind."""
    from pipeline.scoring import reward_scores

    chosen = reward_scores(model, tokenizer, [r["prompt"] + r["chosen"] for r in rows])
    rejected = reward_scores(model, tokenizer, [r["prompt"] + r["rejected"] for r in rows])
    margins = [c - r for c, r in zip(chosen, rejected)]
    by_kind = defaultdict(list)
    for row, margin in zip(rows, margins):
        by_kind[row["kind"]].append(margin > 0)
    return {
        "held_out_pairs": len(rows),
        "held_out_accuracy": round(sum(m > 0 for m in margins) / len(margins), 4) if margins else None,
        "margin_mean": round(statistics.fmean(margins), 4) if margins else None,
        "margin_median": round(statistics.median(margins), 4) if margins else None,
        "margin_min": round(min(margins), 4) if margins else None,
        "accuracy_by_kind": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_kind.items())},
        "margins": [round(m, 4) for m in margins],
    }


def plot_margins(margins: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.hist(margins, bins=30, color="tab:blue", alpha=0.8)
    ax.axvline(0, color="black", linewidth=1)
    ax.set_xlabel("r(chosen) - r(rejected) on held-out pairs")
    ax.set_ylabel("pairs")
    ax.set_title("Reward model: score margins")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(config: Config, ctx) -> dict:
    import json

    from datasets import load_dataset
    from trl import RewardConfig, RewardTrainer

    from pipeline.training import (chain_of, load_causal_lm, peft_config, reward_model_from,
                                   save_curves, trainer_arguments, write_history)

    data = ctx.parent("dataset")
    causal, tokenizer = load_causal_lm(ctx.artifacts, chain_of(ctx.artifacts, "sft"))
    scorer = reward_model_from(causal)
    train = load_dataset("json", data_files=str(data / "prefs.jsonl"), split="train")
    train = train.remove_columns([c for c in ("id", "kind") if c in train.column_names])
    held_out = [json.loads(line) for line in (data / "prefs_val.jsonl").read_text().splitlines() if line]
    if config.eval_rows:
        held_out = held_out[: config.eval_rows]
    args = RewardConfig(**trainer_arguments(config, ctx, warmup_steps=0.05))
    trainer = RewardTrainer(model=scorer, args=args, train_dataset=train, processing_class=tokenizer,
                            peft_config=peft_config(config.lora, "SEQ_CLS", modules_to_save=["score"]))
    result = trainer.train()
    trainer.model.save_pretrained(ctx.out_dir / "adapter")
    shutil.rmtree(ctx.out_dir / "checkpoints", ignore_errors=True)
    model = trainer.model.eval()
    report = held_out_report(model, tokenizer, held_out)
    history = trainer.state.log_history
    write_history(history, ctx.out_dir / "history.jsonl")
    save_curves(history, {"loss": "train loss", "accuracy": "train accuracy"},
                ctx.out_dir / "curves.png", "Reward model: training")
    plot_margins(report.pop("margins"), ctx.out_dir / "margins.png")
    for name in ("curves", "margins"):
        shutil.copy(ctx.out_dir / f"{name}.png", ctx.reports_dir / f"reward_{name}.png")
    return {"reward_chain": chain_of(ctx.artifacts, "sft"), "train_pairs": len(train),
            "steps": result.global_step, "train_loss": round(result.training_loss, 4), **report,
            "train_seconds": round(result.metrics.get("train_runtime", 0.0), 1)}
