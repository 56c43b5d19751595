"""onnxruntime-genai as a second engine (pipeline/ort_genai.py), on the tiny hand-built model:
the conversion merges the LoRA variant, is cached by fingerprint, and decodes what fp32 does."""
from __future__ import annotations

import pytest

pytest.importorskip("onnxruntime_genai", reason="the onnx extra is not installed (pip install -e '.[onnx]')")

from pipeline import ort_genai  # noqa: E402

QUESTIONS = ["Who proposed Adam?", "What does dropout do?"]


@pytest.fixture(scope="module")
def ort_artifacts(tmp_path_factory):
    from conftest import engine_artifacts

    return engine_artifacts(tmp_path_factory.mktemp("ort") / "artifacts")


def test_fp32_conversion_of_a_merged_variant_decodes_like_transformers(ort_artifacts, tmp_path):
    from pipeline.bench.generation import greedy_ids
    from pipeline.engines import engine_answers
    from pipeline.generation import prompt_text
    from pipeline.prompt import REFUSAL
    from pipeline.numeric import load_variant

    artifacts = ort_artifacts
    folder = ort_genai.converted(artifacts, "sft", "fp32", tmp_path)
    assert folder.name == f"sft-{artifacts.meta('sft')['fingerprint']}-fp32"
    model, tokenizer = load_variant(artifacts, "sft")  # LoRA merged, fp32
    base, _ = load_variant(artifacts, "base")
    generator = ort_genai.OrtGenerator(folder)
    for question in QUESTIONS:
        conversation = [{"role": "user", "content": question}]
        ids = tokenizer(prompt_text(tokenizer, conversation), add_special_tokens=False)["input_ids"]
        tokens = list(generator.stream_ids(ids, 16, 16))
        assert tokens == greedy_ids(model, tokenizer, conversation, 16)
        assert tokens != greedy_ids(base, tokenizer, conversation, 16), "the adapter must have been merged"
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    assert engine_answers(generator, model, tokenizer, conversations, 8, refusal_threshold=-1e9) == [REFUSAL] * 2
    answers = engine_answers(generator, model, tokenizer, conversations, 8, refusal_threshold=1e9)
    assert answers == [tokenizer.decode(greedy_ids(model, tokenizer, c, 8), skip_special_tokens=True).strip()
                       for c in conversations]


def test_conversions_are_cached_and_precisions_checked(ort_artifacts, tmp_path, monkeypatch):
    import subprocess

    from pipeline.errors import UserError

    artifacts = ort_artifacts
    first = ort_genai.converted(artifacts, "base", "int4", tmp_path)
    generator = ort_genai.OrtGenerator(first)
    assert len(list(generator.stream_ids([5, 6, 7], 5, 5))) == 5  # min_new_tokens holds off the end

    def no_conversion(*args, **kwargs):
        raise AssertionError("a cached conversion must not run the builder again")

    monkeypatch.setattr(subprocess, "run", no_conversion)
    assert ort_genai.converted(artifacts, "base", "int4", tmp_path) == first
    with pytest.raises(UserError, match="unknown onnxruntime-genai precision"):
        ort_genai.converted(artifacts, "base", "int3", tmp_path)
    with pytest.raises(UserError, match="not built"):
        ort_genai.converted(artifacts, "ppo", "int4", tmp_path)
