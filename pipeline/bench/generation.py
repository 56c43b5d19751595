"""Generation benchmarks: time to first token and decode tokens/s for a ~600-token RAG prompt,
each numeric path against plain transformers fp32 in the same run. The quality cost of a path
is measured by the eval stage (``eval.numeric_paths``), on every held-out question."""
from __future__ import annotations

import copy
import statistics
import time

from pipeline import model_calls


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

    from pipeline.numeric import to_numeric_path

    int8_decode = to_numeric_path(copy.deepcopy(model), "int8-decode")
    # the precision its layers chose for the prompt on this CPU (pipeline/int8_decode.py)
    prefill = next(m.prefill_dtype for m in int8_decode.modules() if hasattr(m, "prefill_dtype"))
    prompt = "bf16" if prefill == torch.bfloat16 else "fp32"
    return {"fp32 (baseline)": model, "bf16 weights": to_numeric_path(copy.deepcopy(model), "bf16"),
            "int8 dynamic (linear layers)": to_numeric_path(copy.deepcopy(model), "int8"),
            f"int8-decode ({prompt} prompt, int8 tokens)": int8_decode}


def _timed_reply(model, tokenizer, messages, new_tokens: int, prefix=None,
                 lookup_tokens: int = 0) -> tuple[float, float, str]:
    """(seconds to the first token, seconds to the last, the reply) for one fixed-length greedy
    reply, through the served generation path (pipeline/generation.py); with ``prefix`` (a
    ``PromptPrefix``), the system turn's cache is reused as the service reuses it; with
    ``lookup_tokens``, prompt lookup decoding."""
    from pipeline.generation import stream_batch

    started, first, reply = time.perf_counter(), None, ""
    for _, text in stream_batch(model, tokenizer, [messages], max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                prefix=prefix, lookup_tokens=lookup_tokens):
        if text is not None:
            reply = text
            if first is None:
                first = time.perf_counter() - started
    return first, time.perf_counter() - started, reply


def time_generation(model, tokenizer, messages, new_tokens: int = 64, repeats: int = 3,
                    lookup_tokens: int = 0) -> dict:
    """Time to first token reading the whole prompt, and with the system turn's cache (as
    served); decode tokens/s from the served runs (with ``lookup_tokens``, prompt lookup)."""
    import torch

    from pipeline.generation import PromptPrefix

    prefix = PromptPrefix.system_turn(model, tokenizer)
    with torch.inference_mode():
        _timed_reply(model, tokenizer, messages, 4, prefix)  # warm-up; computes the system turn's cache
        whole = [_timed_reply(model, tokenizer, messages, 4)[0] for _ in range(repeats)]
        runs = [_timed_reply(model, tokenizer, messages, new_tokens, prefix, lookup_tokens) for _ in range(repeats)]
    first = statistics.median(r[0] for r in runs)
    decode = statistics.median((new_tokens - 1) / max(1e-6, total - ttft) for ttft, total, _ in runs)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return {"prompt_tokens": len(tokenizer(prompt, add_special_tokens=False)["input_ids"]),
            "ttft_s": round(statistics.median(whole), 3), "ttft_system_cached_s": round(first, 3),
            "decode_tokens_per_s": round(decode, 2), "tokens_as_fp32": "-"}


def time_engine(generator, tokenizer, messages, reference: list[int], new_tokens: int = 64,
                repeats: int = 3) -> dict:
    """``time_generation`` for another engine's generator (``stream_ids``: onnxruntime-genai,
    pipeline/ort_genai.py; CTranslate2 and llama.cpp, pipeline/engines.py), with how many of
    its greedy tokens agree with the reference's before the first difference."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def once(tokens: int) -> tuple[float, float, list[int]]:
        started, first, out = time.perf_counter(), None, []
        for token in generator.stream_ids(ids, tokens, tokens):
            out.append(token)
            first = first or time.perf_counter() - started
        return first, time.perf_counter() - started, out

    once(4)  # warm-up
    runs = [once(new_tokens) for _ in range(repeats)]
    first = statistics.median(r[0] for r in runs)
    decode = statistics.median((new_tokens - 1) / max(1e-6, whole - ttft) for ttft, whole, _ in runs)
    return {"prompt_tokens": len(ids), "ttft_s": round(first, 3), "ttft_system_cached_s": "-",
            "decode_tokens_per_s": round(decode, 2), "tokens_as_fp32": agreement(runs[0][2][:new_tokens], reference)}


def agreement(tokens: list[int], reference: list[int]) -> str:
    """How many leading tokens equal the reference's, "n/len(reference)"."""
    same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
    return f"{same}/{len(reference)}"


def greedy_ids(model, tokenizer, messages, new_tokens: int = 64, lookup_tokens: int = 0) -> list[int]:
    """The reference path's greedy tokens, to compare other engines with (and prompt lookup)."""
    import torch

    from pipeline.generation import Row, decode_all, prompt_text

    row = Row(tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"], lambda text: None,
              new_tokens, min_new_tokens=new_tokens)
    with torch.inference_mode():
        decode_all(model, tokenizer, [row], lookup_tokens=lookup_tokens)
    return row.generated


def answer_latency(retriever, paths: dict, tokenizer, selector, questions: list[str], new_tokens: int = 40,
                   reader=None, engines: dict | None = None, lookup_tokens: int = 0, batched=()) -> dict:
    """End to end, per question (retrieval, prompt, reply), p50/p95 seconds: free greedy decoding
    of ``new_tokens`` tokens on each numeric path in ``paths`` (name -> model; the system turn's
    cache reused, as served) and on each other engine in ``engines`` (name -> generator with
    ``stream_ids``, reading the whole prompt), with its time to first token on these real
    prompts (and reading each whole prompt, for comparison), against copy decoding
    (pipeline/copying.py, with ``reader``) on the first path's model. With ``lookup_tokens``,
    each path is timed with prompt lookup decoding too, and its replies compared with the same
    path's without it. Each path named in ``batched`` is timed once more as the service runs it:
    through its batcher (pipeline/batching.py: worker threads, the service's decode threads and
    workers), one question at a time, with this thread serving the model calls
    (pipeline/model_calls.py); and once with no thread serving them, the workers making every
    model call themselves."""
    import torch

    from pipeline.bench.retrieval import _percentiles as percentiles
    from pipeline.generation import PromptPrefix, prompt_text
    from pipeline.prompt import build_messages

    report = {"questions": len(questions), "free": {}}
    def guessed(name: str) -> str:
        return f"{name} + prompt lookup ({lookup_tokens})"

    runs = [run for name, model in paths.items()
            for run in [(name, model, 0)] + ([(guessed(name), model, lookup_tokens)] if lookup_tokens else [])]
    replies = {}
    with torch.inference_mode():
        for name, model, lookup in runs:
            prefix, totals, firsts, whole = PromptPrefix.system_turn(model, tokenizer), [], [], []
            _timed_reply(model, tokenizer, build_messages(questions[0], retriever.search(questions[0])), 2, prefix)
            replies[name] = []
            for question in questions:
                started = time.perf_counter()
                messages = build_messages(question, retriever.search(question))
                before_reply = time.perf_counter() - started
                first, _, reply = _timed_reply(model, tokenizer, messages, new_tokens, prefix, lookup)
                totals.append(time.perf_counter() - started)
                replies[name].append(reply)
                firsts.append(before_reply + first)  # retrieval and the prompt count too
                whole.append(before_reply + _timed_reply(model, tokenizer, messages, 1)[0])  # no cached system turn
            report["free"][name] = {**percentiles(totals), "ttft_p50_ms": round(1000 * statistics.median(firsts), 1),
                                    "ttft_whole_prompt_p50_ms": round(1000 * statistics.median(whole), 1)}
    for name in batched:
        row = f"{guessed(name) if lookup_tokens else name}, service's batcher"
        report["free"][row] = _batched_latency(retriever, paths[name], tokenizer, questions, new_tokens,
                                               lookup_tokens)
        report["free"][f"{row}, model calls in its workers"] = _batched_latency(
            retriever, paths[name], tokenizer, questions, new_tokens, lookup_tokens, model_thread=False)
    if lookup_tokens:  # each path's replies with prompt lookup against its own without
        report["lookup_replies_as_without"] = {
            name: f"{sum(a == b for a, b in zip(replies[name], replies[guessed(name)]))}/{len(questions)}"
            for name in paths}
    with torch.inference_mode():
        for name, generator in (engines or {}).items():
            totals, firsts = [], []
            for question in questions:
                started, first = time.perf_counter(), None
                ids = tokenizer(prompt_text(tokenizer, build_messages(question, retriever.search(question))),
                                add_special_tokens=False)["input_ids"]
                for _ in generator.stream_ids(ids, new_tokens, new_tokens):
                    first = first or time.perf_counter() - started
                totals.append(time.perf_counter() - started)
                firsts.append(first)
            ttft = round(1000 * statistics.median(firsts), 1)
            report["free"][name] = {**percentiles(totals), "ttft_p50_ms": ttft, "ttft_whole_prompt_p50_ms": ttft}
        if selector is not None:
            model, copied = next(iter(paths.values())), []
            for question in questions:
                started = time.perf_counter()
                messages = build_messages(question, retriever.search(question))
                selector.answer(model, tokenizer, retriever.embedder, reader, messages)
                copied.append(time.perf_counter() - started)
            report["copy_decoding"] = percentiles(copied)
    report["new_tokens"] = new_tokens
    return report


def _greedy_settings(new_tokens: int):
    """Batcher settings for a greedy free-decoding reply of up to ``new_tokens`` tokens."""
    from types import SimpleNamespace

    return SimpleNamespace(temperature=0.0, top_p=0.9, repetition_penalty=1.0, max_new_tokens=new_tokens,
                           deadline_seconds=600.0)


def _ask(batcher, retriever, question: str, settings) -> tuple[float, float, str]:
    """One question through ``batcher`` (retrieval, prompt, reply): (seconds, seconds to the
    first text, the reply)."""
    from pipeline.prompt import build_messages

    started, first, text = time.perf_counter(), None, ""
    messages = model_calls.run(lambda: build_messages(question, retriever.search(question)))  # as Engine.prepare
    for text in batcher.stream(messages, settings):
        first = first or time.perf_counter() - started
    return time.perf_counter() - started, first, text


def _batched_latency(retriever, model, tokenizer, questions: list[str], new_tokens: int, lookup_tokens: int,
                     model_thread: bool = True) -> dict:
    """p50/p95 seconds and first-token p50 of each question answered alone through a fresh
    service batcher (one untimed warm-up question first), asked from another thread while this
    one serves the model calls, as the service runs (pipeline/model_calls.py); with
    ``model_thread`` False, the batcher's workers make every model call themselves."""
    from pipeline.batching import Batcher
    from pipeline.bench.retrieval import _percentiles as percentiles

    settings = _greedy_settings(new_tokens)
    batcher = Batcher(model, tokenizer, lookup_tokens=lookup_tokens)  # the service's workers
    batcher.min_new_tokens = new_tokens

    def ask_all():
        _ask(batcher, retriever, questions[0], settings)  # warm-up
        return [_ask(batcher, retriever, question, settings) for question in questions]

    try:
        timed = model_calls.serve_while(ask_all) if model_thread else ask_all()
    finally:
        batcher.close(wait=30)
    totals, firsts = [t[0] for t in timed], [t[1] for t in timed]
    ttft = round(1000 * statistics.median(firsts), 1)
    return {**percentiles(totals), "ttft_p50_ms": ttft, "ttft_whole_prompt_p50_ms": ttft}


def concurrency(retriever, model, tokenizer, questions: list[str], clients=(1, 4, 8), requests_each: int = 2,
                new_tokens: int = 40, max_batch: int = 8, lookup_tokens: int = 0,
                decode_threads: int | None = None, workers: int = 1) -> list[dict]:
    """``clients`` threads, each asking ``requests_each`` questions one after another (retrieval,
    prompt, a fixed ``new_tokens``-token free-decoding reply) through the service's batcher
    (pipeline/batching.py). Per client count: p50/p95 latency, time to first token, and
    aggregate tokens/s (every token written / wall time) and decode tokens/s (tokens written by
    decode steps / time in decode steps: prompt reading left out). ``lookup_tokens`` is the
    batcher's prompt lookup (0 = off; rows decoding together share it, DecodeBatch);
    ``decode_threads`` its decode steps' intra-op threads (None: the service's default; 0: every
    thread, on this thread as it serves the model calls; 1: one, in each worker), ``workers``
    its decode workers (each its own batch).
    Each batcher answers one question before the clients start, untimed (the first request
    pays one-time costs: the system turn's cache, kernel set-up). This thread serves the model
    calls (retrieval, reading prompts, decode steps) while the clients ask, as the service's
    main thread does (pipeline/model_calls.py)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.batching import Batcher
    from pipeline.bench.retrieval import _percentiles as percentiles

    settings = _greedy_settings(new_tokens)
    rows = []
    for count in clients:
        batcher = Batcher(model, tokenizer, max_batch=max_batch, max_waiting=64, queue_timeout=600,
                          lookup_tokens=lookup_tokens, decode_threads=decode_threads, workers=workers)
        batcher.min_new_tokens = new_tokens  # fixed-length replies: every client writes the same
        model_calls.serve_while(lambda: _ask(batcher, retriever, questions[-1], settings))  # warm-up
        warm_steps, warm_seconds, warm_tokens = batcher.decode_counters()
        batcher.batch_sizes.clear()

        def client(index: int) -> list[tuple[float, float, int]]:
            timings = []
            for n in range(requests_each):
                seconds, first, text = _ask(batcher, retriever, questions[(index * requests_each + n) % len(questions)],
                                            settings)
                timings.append((seconds, first, len(tokenizer(text, add_special_tokens=False)["input_ids"])))
            return timings

        def all_clients():
            with ThreadPoolExecutor(count) as pool:
                return [t for per_client in pool.map(client, range(count)) for t in per_client]

        started = time.perf_counter()
        timings = model_calls.serve_while(all_clients)  # this thread runs the model calls, as the service's
        wall = time.perf_counter() - started
        batcher.close()
        steps, seconds, decoded = (now - warm for now, warm in zip(batcher.decode_counters(),
                                                                    (warm_steps, warm_seconds, warm_tokens)))
        rows.append({"clients": count, "lookup": lookup_tokens, "decode_threads": batcher.decode_threads,
                     "workers": workers,
                     "requests": len(timings),
                     "latency_p50_s": round(statistics.median(t[0] for t in timings), 2),
                     "latency_p95_s": round(percentiles([t[0] for t in timings])["p95_ms"] / 1000, 2),
                     "ttft_p50_s": round(statistics.median(t[1] for t in timings), 2),
                     "tokens": sum(t[2] for t in timings),
                     "aggregate_tokens_per_s": round(sum(t[2] for t in timings) / wall, 2),
                     "decode_tokens_per_s": round(decoded / max(1e-6, seconds), 2),
                     "tokens_per_step": round(decoded / max(1, steps), 2),
                     "largest_batch": max(batcher.batch_sizes)})
    for row in rows:
        row["aggregate_x_one_client"] = round(row["aggregate_tokens_per_s"] / rows[0]["aggregate_tokens_per_s"], 2)
        row["decode_x_one_client"] = round(row["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"], 2)
    return rows
