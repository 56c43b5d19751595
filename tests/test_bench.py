"""The generation benchmarks (pipeline/bench/generation.py) on a tiny hand-built model: what they
count is what was generated."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import build_tiny_llama, build_tokenizer


class NoPassages:
    """A retriever stand-in for unit tests: every question gets no passages."""

    def search(self, question):
        return []


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer()
    return build_tiny_llama(len(tokenizer)), tokenizer


def test_time_generation_counts_a_fixed_length_reply(tiny):
    from pipeline.bench.generation import time_generation

    model, tokenizer = tiny
    row = time_generation(model, tokenizer, [{"role": "user", "content": "Who proposed Adam?"}], new_tokens=8,
                          repeats=1)
    assert row["prompt_tokens"] > 10 and row["ttft_s"] > 0 and row["decode_tokens_per_s"] > 0


@pytest.mark.parametrize("native_bf16, prompt", [(True, "bf16"), (False, "fp32")])
def test_the_int8_decode_row_names_the_prompt_precision_of_this_cpu(tiny, monkeypatch, native_bf16, prompt):
    """int8-decode reads the prompt in bf16 only where the CPU multiplies bf16 natively; the
    bench row says which, so a report from an AVX2-only CPU does not claim a bf16 prompt."""
    import torch

    from pipeline import int8_decode
    from pipeline.bench.generation import numeric_paths

    monkeypatch.setattr(int8_decode, "has_native_bf16", lambda: native_bf16)  # where the layers decide
    paths = numeric_paths(tiny[0])
    row, = [name for name in paths if name.startswith("int8-decode")]
    assert row == f"int8-decode ({prompt} prompt, int8 tokens)"
    linear = next(m for m in paths[row].modules() if hasattr(m, "prefill_dtype"))
    assert linear.prefill_dtype == (torch.bfloat16 if native_bf16 else torch.float32)


def test_concurrent_clients_write_every_token_and_share_decode_steps(tiny):
    from pipeline.bench.generation import concurrency

    model, tokenizer = tiny
    rows = concurrency(NoPassages(), model, tokenizer, ["Who proposed Adam?", "What is dropout?"], clients=(1, 3),
                       requests_each=2, new_tokens=40)
    one, three = rows
    assert (one["requests"], one["tokens"]) == (2, 80) and (three["requests"], three["tokens"]) == (6, 240)
    assert one["largest_batch"] == 1 and one["tokens_per_step"] == 1.0
    assert three["largest_batch"] >= 2 and three["tokens_per_step"] > 1.0, three
    assert one["aggregate_x_one_client"] == 1.0 and three["latency_p95_s"] >= three["latency_p50_s"]
    guessing, = concurrency(NoPassages(), model, tokenizer, ["Who proposed Adam?"], clients=(1,), requests_each=2,
                            new_tokens=40, lookup_tokens=8)
    assert guessing["tokens"] == 80 and guessing["lookup"] == 8
    assert guessing["tokens_per_step"] > 1.0, "a lone request's steps write several tokens with prompt lookup"


def test_answer_latency_times_each_numeric_path_from_the_question(tiny):
    from pipeline.bench.generation import answer_latency

    model, tokenizer = tiny
    report = answer_latency(NoPassages(), {"fp32": model, "again": model}, tokenizer, None,
                            ["Who proposed Adam?", "What is dropout?"], new_tokens=6)
    assert report["questions"] == 2 and list(report["free"]) == ["fp32", "again"]
    for timing in report["free"].values():
        assert 0 < timing["ttft_p50_ms"] <= timing["p50_ms"]
    assert "copy_decoding" not in report
    guessed = answer_latency(NoPassages(), {"fp32": model}, tokenizer, None, ["Who proposed Adam?"], new_tokens=12,
                             lookup_tokens=4)
    assert list(guessed["free"]) == ["fp32", "fp32 + prompt lookup (4)"]
    assert guessed["lookup_replies_as_without"] == {"fp32": "1/1"}


def test_answer_latency_times_the_served_path_through_the_batcher(tiny):
    """A path named in ``batched`` gets two rows timed through the service's batcher (its worker
    threads), each question alone: one with the bench's thread serving the model calls, as the
    service's main thread does, one with the workers reading prompts; the first token comes
    before the whole reply."""
    import threading

    from pipeline.bench.generation import answer_latency
    from pipeline.generation import DecodeBatch

    model, tokenizer = tiny
    joined_on, join = [], DecodeBatch.join

    def recorded(self, row):
        joined_on.append(threading.current_thread())
        return join(self, row)

    DecodeBatch.join = recorded
    try:
        report = answer_latency(NoPassages(), {"fp32": model}, tokenizer, None, ["Who proposed Adam?", "BM25?"],
                                new_tokens=12, lookup_tokens=4, batched=["fp32"])
    finally:
        DecodeBatch.join = join
    served = "fp32 + prompt lookup (4), service's batcher"
    assert list(report["free"]) == ["fp32", "fp32 + prompt lookup (4)", served,
                                    f"{served}, model calls in its workers"]
    for row in (report["free"][served], report["free"][f"{served}, model calls in its workers"]):
        assert 0 < row["ttft_p50_ms"] < row["p50_ms"] <= row["p95_ms"]
    here = threading.current_thread()
    batched = joined_on[-6:]  # the main-thread rows read their prompts before
    assert batched[:3] == [here] * 3, "served: the bench's thread read the warm-up's and both prompts"
    assert here not in batched[3:], "then the workers read them"


def test_answer_latency_times_other_engines_on_the_served_prompt(tiny):
    """An engine (pipeline/engines.py) is handed the whole served prompt as ids and asked for a
    fixed-length reply; its row sits beside the numeric paths'."""
    import time

    from pipeline.bench.generation import answer_latency
    from pipeline.generation import prompt_text
    from pipeline.prompt import build_messages

    model, tokenizer = tiny
    seen = []

    class Engine:
        def stream_ids(self, prompt_ids, max_new_tokens, min_new_tokens=0):
            seen.append((prompt_ids, max_new_tokens, min_new_tokens))
            for token in range(max_new_tokens):
                time.sleep(0.01)  # a token takes time: the first arrives well before the last
                yield token

    questions = ["Who proposed Adam?", "What is dropout?"]
    report = answer_latency(NoPassages(), {"fp32": model}, tokenizer, None, questions, new_tokens=6,
                            engines={"other": Engine()})
    assert list(report["free"]) == ["fp32", "other"]
    assert 10 <= report["free"]["other"]["ttft_p50_ms"] < report["free"]["other"]["p50_ms"] - 40
    served = [tokenizer(prompt_text(tokenizer, build_messages(q, [])), add_special_tokens=False)["input_ids"]
              for q in questions]
    assert seen == [(ids, 6, 6) for ids in served]


def test_status_mb_sees_memory_the_process_takes():
    """The serving-memory probe reads a process's resident memory: 200 MB touched shows.

    It runs in a fresh interpreter, as the bench's probe does: in pytest's long-lived process the
    allocator can hand back memory that earlier tests freed but kept resident, and then nothing
    new shows (CI saw exactly that).
    """
    import json
    import subprocess
    import sys

    script = (
        "import json, numpy as np\n"
        "from pipeline.bench.memory import status_mb\n"
        "before = status_mb()\n"
        "block = np.ones(200 * 2**20, dtype=np.uint8)  # written, so resident\n"
        "after = status_mb()\n"
        "print(json.dumps([before, after, int(block.sum()) == block.size]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    before, after, touched = json.loads(done.stdout.strip().splitlines()[-1])
    assert touched
    assert 180 < after["rss_mb"] - before["rss_mb"] < 260, (before, after)
    assert after["peak_mb"] >= after["rss_mb"]
