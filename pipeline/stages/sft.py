"""Stage `sft`: LoRA supervised fine-tuning with TRL's SFTTrainer.

Reads:  the `base` artifact and `dataset` (sft.jsonl for training, sft_val.jsonl held out).
Writes: artifacts/sft/adapter/ (PEFT LoRA adapter), history.jsonl, loss.png (also copied
        to reports/sft_loss.png), meta.json with train loss, held-out loss and perplexity
        before and after (the adapter starts at zero, so "before" is the base model).
Alone:  python -m pipeline run --only sft [sft.lora.r=8 sft.max_steps=100]

Loss is on the answer only: the data is conversational prompt/completion, rendered with the
model's own chat template. Only the answer's positions go through the 49k-word LM head
(``answer_loss``): TRL's fused head scores every position on a CPU, and a conversation is ~400
prompt tokens for ~20 answer tokens. Runs unchanged under `accelerate launch` (docs/scaling.md).
"""
from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.training import LoraSettings

PARENTS = ("base", "dataset", "reader")


@dataclass
class Config:
    lora: LoraSettings = field(default_factory=LoraSettings)
    learning_rate: float = 2e-4  # LoRA tolerates a higher rate than full fine-tuning
    epochs: float = 1.0  # passes over sft.jsonl (ignored when max_steps > 0)
    max_steps: int = 0  # stop after this many optimiser steps (0 = use epochs)
    batch_size: int = 4  # sequences per device per step
    grad_accum: int = 2  # micro-batches summed per optimiser step
    max_length: int = 768  # tokens; longer conversations are truncated from the left
    warmup_ratio: float = 0.05  # share of steps with a linearly rising learning rate
    bf16: bool | str = "auto"  # bf16 autocast: auto (if the CPU/GPU has it), true, false
    activation_checkpointing: bool = False  # recompute activations: less memory, ~30% slower
    group_by_length: bool = True  # batch similar lengths together: less padding on CPU
    eval_rows: int = 0  # cap on held-out rows evaluated (0 = all of sft_val.jsonl)
    logging_steps: int = 5


def inputs(cfg) -> list[Path]:
    return []


def answer_loss(model, inputs: dict, num_items_in_batch=None):
    """(loss, outputs): mean next-token cross-entropy over the labelled (answer) positions, with
    logits computed only at the columns where some row of the batch has a label. The same value
    as the model's own loss over every position (tests/test_alignment.py); on 2 cores a step of
    8 quick-profile conversations takes 9 s instead of 17 s (docs/results.md)."""
    import torch
    import torch.nn.functional as F

    targets = inputs["labels"][:, 1:]  # the token each position predicts
    keep = (targets != -100).any(0).nonzero().squeeze(1)
    model_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
    outputs = model(**model_inputs, use_cache=False, logits_to_keep=keep)
    targets = targets[:, keep]
    total = F.cross_entropy(outputs.logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100,
                            reduction="sum")
    count = (targets != -100).sum() if num_items_in_batch is None else num_items_in_batch
    return total / torch.as_tensor(count).clamp(min=1), outputs


def answer_loss_trainer():
    """TRL's SFTTrainer with ``answer_loss`` in place of its own."""
    from trl import SFTTrainer

    class AnswerLossTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = answer_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages what was a global sum
            return (loss, outputs) if return_outputs else loss

    return AnswerLossTrainer


def run(config: Config, ctx) -> dict:
    from datasets import load_dataset
    from trl import SFTConfig

    from pipeline.answerability import calibrate
    from pipeline.copying import calibrate_variant
    from pipeline.training import (load_causal_lm, peft_config, read_rows, save_curves, trainer_arguments,
                                   write_history)

    data = ctx.parent("dataset")
    model, tokenizer = load_causal_lm(ctx.artifacts, [])
    train = load_dataset("json", data_files=str(data / "sft.jsonl"), split="train")
    held_out = load_dataset("json", data_files=str(data / "sft_val.jsonl"), split="train")
    if config.eval_rows:
        held_out = held_out.select(range(min(config.eval_rows, len(held_out))))
    args = SFTConfig(**trainer_arguments(
        config, ctx, warmup_steps=config.warmup_ratio, per_device_eval_batch_size=config.batch_size,
        truncation_mode="keep_end", completion_only_loss=True, prediction_loss_only=True,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random"))
    trainer = answer_loss_trainer()(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                                        processing_class=tokenizer, peft_config=peft_config(config.lora))
    before = trainer.evaluate()["eval_loss"]  # LoRA's B starts at zero: this is the base model
    result = trainer.train()
    after = trainer.evaluate()["eval_loss"]
    trainer.model.save_pretrained(ctx.out_dir / "adapter")
    decision = calibrate(trainer.model, tokenizer, read_rows(data / "sft_val.jsonl"), ctx.out_dir)
    decision.update(calibrate_variant(trainer.model, tokenizer, ctx.config, ctx.artifacts, ctx.out_dir))
    tokenizer.save_pretrained(ctx.out_dir / "adapter")
    shutil.rmtree(ctx.out_dir / "checkpoints", ignore_errors=True)
    history = trainer.state.log_history
    write_history(history, ctx.out_dir / "history.jsonl")
    save_curves(history, {"loss": "train loss"}, ctx.out_dir / "loss.png", "SFT: training loss")
    shutil.copy(ctx.out_dir / "loss.png", ctx.reports_dir / "sft_loss.png")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {
        **decision, "adapter_chain": ["sft"], "train_rows": len(train), "held_out_rows": len(held_out),
        "steps": result.global_step, "train_loss": round(result.training_loss, 4),
        "held_out_loss_base": round(before, 4), "held_out_loss": round(after, 4),
        "held_out_perplexity_base": round(math.exp(before), 3),
        "held_out_perplexity": round(math.exp(after), 3),
        "trainable_parameters": trainable, "bf16": args.bf16,
        "train_seconds": round(result.metrics.get("train_runtime", 0.0), 1),
    }
