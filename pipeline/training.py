"""Helpers the training stages share: LoRA settings, loading the base with adapters merged, precision, curves."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LoraSettings:
    r: int = 16  # adapter rank: higher, more capacity and memory
    alpha: int = 32  # scaling numerator; the update is scaled by alpha / r
    # Dropout on the adapter input. Off: on a CPU its random masks cost 30% of an SFT step
    # (docs/results.md), and one pass over ~700 conversations hardly needs the regulariser.
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def peft_config(settings: LoraSettings, task_type: str = "CAUSAL_LM", modules_to_save=None):
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.target_modules), task_type=task_type,
                      modules_to_save=modules_to_save)


def bf16_available() -> bool:
    """bf16 autocast pays off on GPUs that support it and CPUs with native bf16 instructions."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(setting: bool | str) -> bool:
    """``true``/``false`` force it; ``auto`` uses bf16 where the hardware has it."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"bf16 must be auto, true or false, not '{setting}'")
    return bf16_available()


def load_causal_lm(artifacts, chain: list[str]):
    """(model, tokenizer): the base weights with each stage's LoRA adapter in ``chain`` merged."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = artifacts.require("base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if chain:
        from peft import PeftModel

        for stage in chain:
            model = PeftModel.from_pretrained(model, artifacts.require(stage) / "adapter").merge_and_unload()
    return model, tokenizer


def chain_of(artifacts, stage: str) -> list[str]:
    """The adapter chain a built stage recorded (e.g. ["sft", "dpo"])."""
    meta = artifacts.meta(stage) or {}
    return list(meta.get("metrics", {}).get("adapter_chain", []))


def reward_model_from(causal_lm, num_labels: int = 1):
    """A sequence-classification model whose body is ``causal_lm``'s (score head fresh)."""
    from transformers import AutoModelForSequenceClassification

    config = causal_lm.config
    config.num_labels = num_labels
    config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    scorer = AutoModelForSequenceClassification.from_config(config)
    scorer.model.load_state_dict(causal_lm.model.state_dict())
    return scorer


def load_reward_model(artifacts):
    """The reward stage's scorer: its base chain merged, then its LoRA + score head merged."""
    from peft import PeftModel

    reward_chain = (artifacts.meta("reward") or {}).get("metrics", {}).get("reward_chain", ["sft"])
    causal, tokenizer = load_causal_lm(artifacts, reward_chain)
    scorer = reward_model_from(causal)
    scorer = PeftModel.from_pretrained(scorer, artifacts.require("reward") / "adapter").merge_and_unload()
    return scorer.eval(), tokenizer


def trainer_arguments(config, ctx, **specific) -> dict:
    """Keyword arguments shared by the TRL configs of sft, reward and dpo, plus ``specific``.

    ``config`` is the stage's Config (learning_rate, epochs, max_steps, batch_size, grad_accum,
    max_length, bf16, logging_steps, activation_checkpointing). No evaluation or checkpoints
    during training: each stage scores its held-out slice itself, once, at the end.
    """
    import torch

    return dict(
        output_dir=str(ctx.out_dir / "checkpoints"), learning_rate=config.learning_rate,
        num_train_epochs=config.epochs, max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=config.grad_accum,
        max_length=config.max_length, bf16=use_bf16(config.bf16), logging_steps=config.logging_steps,
        lr_scheduler_type="cosine", eval_strategy="no", save_strategy="no", report_to=[],
        seed=ctx.config.seed, use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=config.activation_checkpointing, **specific)


def save_curves(log_history: list[dict], series: dict[str, str], path: Path, title: str) -> None:
    """Plot each logged key of ``series`` ({key: label}) against the step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for key, label in series.items():
        points = [(row["step"], row[key]) for row in log_history if key in row and "step" in row]
        if points:
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=label)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finite(value) -> float | None:
    return round(float(value), 5) if value is not None and math.isfinite(float(value)) else None


def write_history(log_history: list[dict], path: Path) -> None:
    path.write_text("\n".join(json.dumps(row) for row in log_history) + "\n")


def read_rows(path: Path) -> list[dict]:
    """The JSON rows of a .jsonl file the dataset stage wrote."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
