"""Generation benchmarks: time to first token and decode tokens/s for a ~600-token RAG prompt,
each numeric path against plain transformers fp32 in the same run. The quality cost of a path
is measured by the eval stage (``eval.numeric_paths``), on every held-out question."""
from __future__ import annotations

import copy
import statistics
import time


def rag_prompt(retriever, tokenizer, target_tokens: int = 600) -> list[dict]:
    from pipeline.prompt import build_messages

    question = "How does the adaptive KL controller change the KL coefficient during PPO?"
    passages = retriever.search(question, k=12)
    for k in range(1, len(passages) + 1):
        messages = build_messages(question, passages[:k])
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        size = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if size >= target_tokens:
            break
    return messages


def numeric_paths(model):
    """name -> model, for each path measured; the first is the baseline."""
    from pipeline.numeric import to_numeric_path

    return {"fp32 (baseline)": model, "bf16 weights": to_numeric_path(copy.deepcopy(model), "bf16"),
            "int8 dynamic (linear layers)": to_numeric_path(copy.deepcopy(model), "int8"),
            "int8-decode (bf16 prompt, int8 tokens)": to_numeric_path(copy.deepcopy(model), "int8-decode")}


def time_generation(model, tokenizer, messages, new_tokens: int = 64, repeats: int = 3) -> dict:
    import torch

    batch = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)
    kwargs = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        model.generate(**batch, max_new_tokens=4, **kwargs)  # warm-up
        ttft, total = [], []
        for _ in range(repeats):
            started = time.perf_counter()
            model.generate(**batch, max_new_tokens=1, **kwargs)
            ttft.append(time.perf_counter() - started)
            started = time.perf_counter()
            model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
            total.append(time.perf_counter() - started)
    first, whole = statistics.median(ttft), statistics.median(total)
    return {"prompt_tokens": int(batch["input_ids"].shape[1]), "ttft_s": round(first, 3),
            "decode_tokens_per_s": round((new_tokens - 1) / max(1e-6, whole - first), 2)}


def answer_latency(retriever, model, tokenizer, selector, questions: list[str], new_tokens: int = 40) -> dict:
    """End to end, per question (retrieval, prompt, reply): free greedy decoding of
    ``new_tokens`` tokens (fp32) against copy decoding (pipeline/copying.py), p50/p95 seconds."""
    import torch

    from pipeline.bench.retrieval import _percentiles as percentiles
    from pipeline.copying import featurize
    from pipeline.prompt import build_messages

    free, copied = [], []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        for question in questions:
            started = time.perf_counter()
            messages = build_messages(question, retriever.search(question))
            batch = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True)
            model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=pad)
            free.append(time.perf_counter() - started)
            if selector is not None:
                started = time.perf_counter()
                messages = build_messages(question, retriever.search(question))
                selector.reply(featurize(model, tokenizer, retriever.embedder, messages))
                copied.append(time.perf_counter() - started)
    report = {"questions": len(questions), f"free_{new_tokens}_tokens": percentiles(free)}
    if copied:
        report["copy_decoding"] = percentiles(copied)
        report["copy_speedup_p50"] = round(report[f"free_{new_tokens}_tokens"]["p50_ms"]
                                           / report["copy_decoding"]["p50_ms"], 2)
    return report
