"""The base stage on the real embedded SmolLM2 GGUF (slow: two ~20 s loads)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_saved_base_matches_gguf_and_answers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.config import load_config
    from pipeline.models import smollm2_gguf
    from pipeline.runner import run_pipeline

    cfg = load_config("tiny", [f"paths.artifacts={tmp_path}", f"paths.reports={tmp_path}/r"])
    run_pipeline(cfg, only="base")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "base")
    gguf = smollm2_gguf()
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32).eval()

    batch = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        torch.testing.assert_close(saved(**batch).logits, source(**batch).logits)
        out = saved.generate(**batch, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
