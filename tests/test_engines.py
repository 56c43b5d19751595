"""CTranslate2 and llama.cpp as bench engines (pipeline/engines.py): the CTranslate2 conversion
merges the LoRA variant, is cached by fingerprint and decodes what fp32 does; llama.cpp reads
the wheel's GGUF as transformers reads the base built from it."""
from __future__ import annotations

import pytest

from pipeline import engines

QUESTIONS = ["Who proposed Adam?", "What does dropout do?"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from conftest import engine_artifacts

    return engine_artifacts(tmp_path_factory.mktemp("engines") / "artifacts")


def _prompt_ids(tokenizer, question: str) -> tuple[list[dict], list[int]]:
    from pipeline.generation import prompt_text

    conversation = [{"role": "user", "content": question}]
    return conversation, tokenizer(prompt_text(tokenizer, conversation), add_special_tokens=False)["input_ids"]


def test_ctranslate2_float32_decodes_the_merged_variant_like_transformers(artifacts, tmp_path, monkeypatch):
    pytest.importorskip("ctranslate2", reason="the ctranslate2 extra is not installed (make setup)")
    import ctranslate2.converters

    from pipeline.bench.generation import greedy_ids
    from pipeline.errors import UserError
    from pipeline.numeric import load_variant

    folder = engines.ct2_converted(artifacts, "sft", "float32", tmp_path)
    assert folder.name == f"sft-{artifacts.meta('sft')['fingerprint']}-float32"
    model, tokenizer = load_variant(artifacts, "sft")  # LoRA merged, fp32
    base, _ = load_variant(artifacts, "base")
    generator = engines.Ct2Generator(folder, tokenizer)
    for question in QUESTIONS:
        conversation, ids = _prompt_ids(tokenizer, question)
        tokens = list(generator.stream_ids(ids, 16, 16))
        assert tokens == greedy_ids(model, tokenizer, conversation, 16)
        assert tokens != greedy_ids(base, tokenizer, conversation, 16), "the adapter must have been merged"

    banned = tokens[:2]  # the last question's greedy opening, kept out of its reply
    kept_out = list(generator.stream_ids(ids, 16, 16, banned=[banned]))
    assert len(kept_out) == 16 and not any(kept_out[i:i + 2] == banned for i in range(15))

    def no_conversion(*args, **kwargs):
        raise AssertionError("a cached conversion must not convert again")

    monkeypatch.setattr(ctranslate2.converters.TransformersConverter, "convert", no_conversion)
    assert engines.ct2_converted(artifacts, "sft", "float32", tmp_path) == folder
    with pytest.raises(UserError, match="unknown CTranslate2 quantization"):
        engines.ct2_converted(artifacts, "sft", "int3", tmp_path)
    with pytest.raises(UserError, match="not built"):
        engines.ct2_converted(artifacts, "ppo", "int8", tmp_path)


@pytest.mark.slow
def test_llama_cpp_decodes_the_wheels_gguf_like_the_base_built_from_it():
    """The base stage dequantizes the same Q4_1 file; llama.cpp multiplies its Q4_1 weights
    with 8-bit activations, which can flip a near tie ("L'Étoile" against "The capital"), so
    each greedy token llama.cpp writes must be nearly transformers fp32's greedy choice after
    the same tokens (its logit within 1 of the best), not identical to its greedy reply."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make bench installs it)")
    import torch

    from pipeline.stages.base import load_source

    model, tokenizer = load_source("embedded")
    _, ids = _prompt_ids(tokenizer, "What is the capital of France?")
    tokens = list(engines.LlamaCppGenerator().stream_ids(ids, 8, 8))
    assert len(tokens) == 8
    with torch.inference_mode():
        logits = model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1: -1]
    chosen = logits[torch.arange(len(tokens)), torch.tensor(tokens)]
    assert (logits.max(-1).values - chosen).max() < 1.0, (tokens, logits.argmax(-1).tolist())
