"""Shared fixtures: tiny hand-built models and tokenizers, nothing downloaded."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>"
    "{% endgeneration %}{% else %}{{ message['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


def build_tokenizer():
    """A character-level fast tokenizer with a ChatML template (the layout SmolLM2 uses)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>",
        bos_token="<|im_start|>", unk_token="<unk>",
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_llama(vocab_size: int, seed: int = 0, initializer_range: float = 0.02):
    """A 2-layer Llama, width 32: the shape of SmolLM2, small enough for unit tests. A wide
    ``initializer_range`` makes its greedy tokens depend strongly on the prompt."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        initializer_range=initializer_range,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    model = build_tiny_llama(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir):
    """A tiny-profile config whose artifacts and reports live in a temp folder."""
    from pipeline.config import load_config

    def make(*overrides):
        return load_config("tiny", [
            f"paths.artifacts={tmp_path / 'artifacts'}", f"paths.reports={tmp_path / 'reports'}",
            f"base.model={tiny_model_dir}", *overrides,
        ])

    return make


def read_meta(folder: Path) -> dict:
    return json.loads((folder / "meta.json").read_text())


SMALL_DOCS = {
    "adam.md": "# Adam\n\n## Defaults\n\nAdam uses beta1 = 0.9 and beta2 = 0.999.\n\n"
               "## Authors\n\nAdam was proposed by Diederik Kingma and Jimmy Ba in 2014.\n",
    "dropout.md": "# Dropout\n\nDropout zeroes each unit with probability p; the paper used p = 0.5.\n",
}


def write_lora_variant(artifacts: Path, name: str, chain: list[str], seed: int = 1) -> None:
    """A hand-made LoRA 'variant' artifact on the tiny base, with non-zero adapter weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.artifacts import Artifacts

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(artifacts / "base")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    folder = artifacts / name
    peft_model.save_pretrained(folder / "adapter")
    Artifacts.write_meta(folder, {"stage": name, "fingerprint": f"hand-{name}",
                                  "metrics": {"adapter_chain": chain}})


def engine_artifacts(root: Path):
    """Artifacts for the engine tests: a tiny base whose attention heads are 16 wide
    (onnxruntime's attention needs a multiple of 16) and a LoRA 'sft' variant on it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.artifacts import Artifacts

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        initializer_range=0.5,  # large random weights: replies that differ from prompt to prompt
        pad_token_id=0, bos_token_id=1, eos_token_id=2))
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    Artifacts.write_meta(root / "base", {"stage": "base", "fingerprint": "hand-base", "metrics": {}})
    write_lora_variant(root, "sft", ["sft"])
    return Artifacts(root)


@pytest.fixture(scope="session")
def served_artifacts(tmp_path_factory, tiny_model_dir) -> Path:
    """artifacts/ with a tiny base, an index of two small docs and an 'sft' LoRA variant."""
    from pipeline.config import load_config
    from pipeline.runner import run_pipeline

    root = tmp_path_factory.mktemp("served")
    docs = root / "docs"
    docs.mkdir()
    for name, text in SMALL_DOCS.items():
        (docs / name).write_text(text)
    cfg = load_config("tiny", [f"paths.artifacts={root / 'artifacts'}", f"paths.reports={root / 'reports'}",
                               f"paths.docs={docs}", f"base.model={tiny_model_dir}"])
    run_pipeline(cfg, only="base")
    run_pipeline(cfg, only="index")
    write_lora_variant(root / "artifacts", "sft", ["sft"])
    return root / "artifacts"
