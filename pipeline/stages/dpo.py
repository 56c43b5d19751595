"""Stage `dpo`: direct preference optimisation with TRL's DPOTrainer, from the SFT model.

Reads:  the `sft` artifact (merged into the weights: that model is both the starting point
        and the reference) and `dataset` (prefs.jsonl to train, prefs_val.jsonl held out).
Writes: artifacts/dpo/adapter/ (a new LoRA on top of SFT), history.jsonl, curves.png (also
        in reports/), meta.json with held-out preference accuracy and reward margins.
Alone:  python -m pipeline run --only dpo [dpo.beta=0.1 dpo.loss_type=ipo]
        python -m pipeline run --only dpo dpo.extra_prefs=data/feedback/prefs.jsonl  (chat feedback)

No second copy of the weights: the reference is the same model with the LoRA adapter
disabled. Loss (Rafailov et al. 2023): -log sigmoid(beta * (log-ratio chosen - log-ratio rejected)).
Only the answers' positions go through the 49k-word LM head (``answer_positions_head``), as in
the sft stage: TRL's fused head scores every position on a CPU.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.training import LoraSettings

PARENTS = ("sft", "dataset", "reader")


@dataclass
class Config:
    lora: LoraSettings = field(default_factory=LoraSettings)
    beta: float = 0.1  # strength of the pull towards the reference (the DPO paper's default)
    loss_type: str = "sigmoid"  # sigmoid = DPO; ipo, hinge, robust... as TRL names them
    learning_rate: float = 5e-5
    epochs: float = 1.0
    max_steps: int = 0  # stop after this many optimiser steps (0 = use epochs)
    batch_size: int = 2  # pairs per device per step
    grad_accum: int = 4
    max_length: int = 768
    bf16: bool | str = "auto"  # bf16 autocast: auto (if the CPU/GPU has it), true, false
    activation_checkpointing: bool = False  # recompute activations: less memory, ~30% slower
    eval_rows: int = 0  # cap on held-out pairs evaluated (0 = all)
    logging_steps: int = 5
    extra_prefs: str = ""  # more training pairs, e.g. chat feedback from `data export-feedback`


def inputs(cfg) -> list[Path]:
    return [Path(cfg.dpo.extra_prefs)] if cfg.dpo.extra_prefs else []


def answer_positions_head(model) -> None:
    """Make ``model(..., labels=, fused_lm_head=True)``, the call TRL's DPOTrainer scores with,
    project only the labelled positions through the LM head. TRL's own fused head does that only
    under Triton; on a CPU it computes the 49k-word softmax at all ~400 prompt positions of a
    pair for ~20 answer tokens. Same outputs (tests/test_alignment.py): per-position log-probs
    with their gradient, and, without gradient, the entropy, mean logit and top-1 hit TRL
    logs; zero where the label is -100."""
    import types

    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    fused = model.forward  # TRL's (add_fused_lm_head), kept for every other call

    def forward(self, *args, fused_lm_head=False, labels=None, num_items_in_batch=None, **kwargs):
        # MoE router losses and context parallelism's pre-shifted labels stay with TRL's head
        if not fused_lm_head or labels is None or kwargs.get("output_router_logits") or "shift_labels" in kwargs:
            return fused(*args, fused_lm_head=fused_lm_head, labels=labels, num_items_in_batch=num_items_in_batch,
                         **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        mask = targets != -100
        logits = self.get_output_embeddings()(hidden[mask]).float()
        log_softmax = logits.log_softmax(-1)
        picked = log_softmax.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            entropy = -(log_softmax.exp() * log_softmax).sum(-1)
            mean_logits = logits.mean(-1)
            top1 = logits.argmax(-1) == targets[mask]

        def spread(values):  # back to (batch, positions), zero where there is no label
            return torch.zeros(mask.shape, dtype=values.dtype, device=values.device).masked_scatter(mask, values)

        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-picked.sum() / count, log_probs=spread(picked), entropy=spread(entropy),
                                   mean_logits=spread(mean_logits), is_top1=spread(top1), label_mask=mask)

    model.forward = types.MethodType(forward, model)


def answer_positions_trainer():
    """TRL's DPOTrainer with ``answer_positions_head`` on the policy and any reference model
    (not with WPO weights, which read a field the head does not compute)."""
    from trl import DPOTrainer

    class AnswerPositionsDPOTrainer(DPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.use_weighting:
                return
            answer_positions_head(self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model)
            if self.ref_model is not None:
                answer_positions_head(self.ref_model)

    return AnswerPositionsDPOTrainer


def run(config: Config, ctx) -> dict:
    from datasets import load_dataset
    from trl import DPOConfig

    from pipeline.answerability import calibrate
    from pipeline.copying import calibrate_variant
    from pipeline.training import (chain_of, load_causal_lm, peft_config, read_rows, save_curves,
                                   trainer_arguments, write_history)

    data = ctx.parent("dataset")
    chain = chain_of(ctx.artifacts, "sft")
    model, tokenizer = load_causal_lm(ctx.artifacts, chain)

    def pairs(name: str):
        rows = load_dataset("json", data_files=str(data / name), split="train")
        return rows.remove_columns([c for c in ("id", "kind") if c in rows.column_names])

    train, held_out = pairs("prefs.jsonl"), pairs("prefs_val.jsonl")
    if config.extra_prefs:
        from datasets import concatenate_datasets

        extra = load_dataset("json", data_files=config.extra_prefs, split="train")
        extra = extra.remove_columns([c for c in ("id", "kind") if c in extra.column_names])
        train = concatenate_datasets([train, extra])
        ctx.log.info("added %d preference pairs from %s", len(extra), config.extra_prefs)
    if config.eval_rows:
        held_out = held_out.select(range(min(config.eval_rows, len(held_out))))
    args = DPOConfig(**trainer_arguments(config, ctx, beta=config.beta, loss_type=[config.loss_type],
                                         per_device_eval_batch_size=config.batch_size, warmup_steps=0.05))
    trainer = answer_positions_trainer()(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                                         processing_class=tokenizer, peft_config=peft_config(config.lora))
    result = trainer.train()
    scores = trainer.evaluate() if len(held_out) else {}
    if not len(held_out):
        ctx.log.warning("prefs_val.jsonl is empty: no held-out DPO metrics")
    trainer.model.save_pretrained(ctx.out_dir / "adapter")
    decision = calibrate(trainer.model, tokenizer, read_rows(data / "sft_val.jsonl"), ctx.out_dir)
    decision.update(calibrate_variant(trainer.model, tokenizer, ctx.config, ctx.artifacts, ctx.out_dir))
    shutil.rmtree(ctx.out_dir / "checkpoints", ignore_errors=True)
    history = trainer.state.log_history
    write_history(history, ctx.out_dir / "history.jsonl")
    save_curves(history, {"loss": "train loss", "rewards/accuracies": "preference accuracy",
                          "rewards/margins": "reward margin"}, ctx.out_dir / "curves.png", "DPO: training")
    shutil.copy(ctx.out_dir / "curves.png", ctx.reports_dir / "dpo_curves.png")

    def metric(name):
        value = scores.get(f"eval_{name}")
        return round(float(value), 4) if value is not None else None

    return {
        **decision, "adapter_chain": chain + ["dpo"], "train_pairs": len(train), "held_out_pairs": len(held_out),
        "steps": result.global_step, "train_loss": round(result.training_loss, 4),
        "held_out_loss": metric("loss"), "held_out_accuracy": metric("rewards/accuracies"),
        "held_out_margin": metric("rewards/margins"), "held_out_reward_chosen": metric("rewards/chosen"),
        "held_out_reward_rejected": metric("rewards/rejected"), "beta": config.beta,
        "loss_type": config.loss_type, "train_seconds": round(result.metrics.get("train_runtime", 0.0), 1),
    }
