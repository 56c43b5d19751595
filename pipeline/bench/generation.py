"""Generation benchmarks: time to first token and decode tokens/s for a ~600-token RAG prompt,
each numeric path against plain transformers fp32 in the same run; key-fact accuracy of the
fastest path against fp32 on held-out questions (the quality cost)."""
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
    import torch

    paths = {"fp32 (baseline)": model}
    paths["bf16 weights"] = copy.deepcopy(model).to(torch.bfloat16)
    paths["int8 dynamic (linear layers)"] = torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    return paths


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


def quality(model, tokenizer, records, retriever, max_new_tokens: int = 64) -> float:
    from pipeline.evaluation.metrics import aggregate, score_answer
    from pipeline.generation import generate_batch
    from pipeline.prompt import build_messages, retrieval_query

    passages = [retriever.search(retrieval_query(r.question, r.history)) for r in records]
    prompts = [build_messages(r.question, p, r.history) for r, p in zip(records, passages)]
    answers = generate_batch(model, tokenizer, prompts, max_new_tokens, desc="bench quality")
    return aggregate([score_answer(a, r, p) for a, r, p in zip(answers, records, passages)])["key_fact_accuracy"]
