"""Batched free decoding on a tiny hand-built model: pipeline.generation.stream_batch and the
service's request batcher (pipeline/batching.py)."""
from __future__ import annotations

import pytest
from transformers import NoBadWordsLogitsProcessor

from conftest import build_tiny_llama, build_tokenizer
from pipeline.generation import generate_batch, stream_batch
from pipeline.batching import Batcher, ServerBusy
from service.engine import GenerationSettings

QUESTIONS = ["Who proposed Adam?", "What does dropout do to a network during training?", "BM25?"]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tokenizer()
    return build_tiny_llama(len(tokenizer)), tokenizer


def conversation(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def alone(tiny, question: str, tokens: int) -> str:
    """The reference: transformers' own greedy ``generate`` on this conversation alone."""
    from pipeline.generation import prompt_text

    model, tokenizer = tiny
    ids = tokenizer(prompt_text(tokenizer, conversation(question)), return_tensors="pt", add_special_tokens=False)
    output = model.generate(**ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def finals(updates) -> dict[int, str]:
    texts, ended = {}, set()
    for row, text in updates:
        assert row not in ended, "no update may follow a row's end"
        if text is None:
            ended.add(row)
        else:
            assert text.startswith(texts.get(row, "")), "a row's text only grows"
            texts[row] = text
    assert ended == set(range(len(QUESTIONS))), "every row ends"
    return texts


def test_stream_batch_matches_one_at_a_time_with_each_rows_cap(tiny):
    model, tokenizer = tiny
    caps = [12, 5, 9]
    texts = finals(stream_batch(model, tokenizer, [conversation(q) for q in QUESTIONS], max_new_tokens=caps))
    for row, (question, cap) in enumerate(zip(QUESTIONS, caps)):
        assert texts[row].strip() == alone(tiny, question, cap)
        assert len(tokenizer(texts[row], add_special_tokens=False)["input_ids"]) <= cap


def test_generate_batch_refills_its_batch_and_answers_as_generate_does():
    """Five conversations through batches of two: each answer is transformers' greedy answer
    to that conversation alone, whatever rows it shared its steps with."""
    tokenizer = build_tokenizer()
    sharp = (build_tiny_llama(len(tokenizer), initializer_range=0.5), tokenizer)
    questions = QUESTIONS + ["Why warm up the learning rate?", "What is LoRA's rank?"]
    answers = generate_batch(*sharp, [conversation(q) for q in questions], max_new_tokens=7, batch_size=2, desc=None)
    assert answers == [alone(sharp, q, 7) for q in questions]
    assert len(set(answers)) > 1, "the check needs answers that differ"


def test_generate_batch_refuses_exactly_the_rows_scored_above_the_threshold():
    from pipeline.generation import refusal_scores
    from pipeline.prompt import REFUSAL

    tokenizer = build_tokenizer()
    sharp = build_tiny_llama(len(tokenizer), initializer_range=0.5)
    conversations = [conversation(q) for q in QUESTIONS + ["Why warm up the learning rate?"]]
    scores = refusal_scores(sharp, tokenizer, conversations, desc=None)
    threshold = sorted(scores)[1] + 1e-3  # between the second and third score: two refuse
    answers = generate_batch(sharp, tokenizer, conversations, max_new_tokens=6, batch_size=2, desc=None,
                             refusal_threshold=threshold)
    assert [a == REFUSAL for a in answers] == [s > threshold for s in scores]
    assert sum(a == REFUSAL for a in answers) == 2


def test_stream_batch_refuses_rows_above_the_threshold_without_generating(tiny):
    from pipeline.prompt import REFUSAL

    model, tokenizer = tiny
    texts = finals(stream_batch(model, tokenizer, [conversation(q) for q in QUESTIONS], max_new_tokens=6,
                                refusal_threshold=-1e9))
    assert list(texts.values()) == [REFUSAL] * 3


def test_waiting_requests_are_decoded_as_one_batch(tiny):
    batcher = Batcher(*tiny, max_batch=8, workers=1)
    settings = GenerationSettings(max_new_tokens=10)
    with batcher._ready:  # the worker cannot take any request until all three wait
        streams = [batcher.stream(conversation(q), settings) for q in QUESTIONS]
    replies = [list(s)[-1] for s in streams]
    assert batcher.batch_sizes == [3]
    assert [r.strip() for r in replies] == [alone(tiny, q, 10) for q in QUESTIONS]


def test_close_with_a_wait_returns_once_the_worker_has_stopped(tiny):
    """A process about to exit closes its batchers first: no worker is left inside a torch call."""
    batcher = Batcher(*tiny)
    list(batcher.stream(conversation(QUESTIONS[0]), GenerationSettings(max_new_tokens=4)))
    assert all(t.is_alive() for t in batcher._threads)
    batcher.close(wait=10)
    assert not any(t.is_alive() for t in batcher._threads)


def test_a_request_joins_replies_already_being_written(tiny):
    """Continuous batching: a request that arrives mid-reply joins the running batch at the next
    step, with its own sampling settings, and still gets the reply it would get alone."""
    batcher = Batcher(*tiny, workers=1)  # one batch for all (a second worker would take it)
    long = GenerationSettings(max_new_tokens=60)
    first = batcher.stream(conversation(QUESTIONS[0]), long)
    next(first)  # the first reply is being written
    sampled = batcher.stream(conversation("b?"), GenerationSettings(max_new_tokens=5, temperature=0.7))
    late = batcher.stream(conversation(QUESTIONS[2]), GenerationSettings(max_new_tokens=10))
    assert list(late)[-1].strip() == alone(tiny, QUESTIONS[2], 10)
    assert 1 <= len(list(sampled)) <= 5
    assert list(first)[-1].strip() == alone(tiny, QUESTIONS[0], 60)
    assert max(batcher.batch_sizes) >= 2, batcher.batch_sizes


def test_the_queue_is_bounded_and_old_requests_are_turned_away(tiny):
    import time

    batcher = Batcher(*tiny, max_waiting=2, queue_timeout=0.05, workers=1)
    settings = GenerationSettings(max_new_tokens=4)
    with batcher._ready:
        streams = [batcher.stream(conversation(q), settings) for q in QUESTIONS[:2]]
        with pytest.raises(ServerBusy, match="already waiting"):
            batcher.stream(conversation("one more"), settings)
        time.sleep(0.1)  # past the queue timeout before the worker saw them
    for stream in streams:
        with pytest.raises(ServerBusy, match="within"):
            list(stream)
    assert batcher.batch_sizes == []


def test_a_closed_stream_ends_its_row_and_the_others_finish(tiny):
    model, _ = tiny
    expected = alone(tiny, QUESTIONS[1], 30)
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        alone(tiny, QUESTIONS[0], 400)
        assert len(calls) > 100, "the row to drop must run long when nobody drops it"
        calls.clear()
        batcher = Batcher(*tiny, workers=1)
        long, short = GenerationSettings(max_new_tokens=400), GenerationSettings(max_new_tokens=30)
        with batcher._ready:
            dropped = batcher.stream(conversation(QUESTIONS[0]), long)
            kept = batcher.stream(conversation(QUESTIONS[1]), short)
        next(dropped)
        dropped.close()
        assert list(kept)[-1].strip() == expected
        assert batcher.idle.wait(10)
        assert len(calls) < 60, f"{len(calls)} forward passes: the dropped row kept decoding"
    finally:
        handle.remove()


def test_the_fused_refusal_decision_matches_refusal_scores(tiny):
    """join() reads the prompt and scores the refusal in one pass; the score is the one the
    dev-split threshold was chosen on (pipeline.generation.refusal_scores)."""
    from pipeline.generation import DecodeBatch, Row, prompt_text, refusal_scores
    from pipeline.prompt import REFUSAL

    model, tokenizer = tiny
    for question in QUESTIONS:
        score = refusal_scores(model, tokenizer, [conversation(question)], desc=None)[0]
        ids = tokenizer(prompt_text(tokenizer, conversation(question)), add_special_tokens=False)["input_ids"]
        for threshold, refuses in ((score - 1e-4, True), (score + 1e-4, False)):
            texts = []
            DecodeBatch(model, tokenizer).join(Row(ids, texts.append, 3, refusal_threshold=threshold))
            assert (texts[0] == REFUSAL) == refuses, (question, threshold, score)


def test_the_system_turns_cache_gives_the_same_replies_and_is_read_once(tiny):
    """A row that starts with the cached system turn reads only its own tokens, and decodes
    exactly what reading the whole prompt decodes."""
    from pipeline.generation import PromptPrefix
    from pipeline.prompt import SYSTEM_PROMPT

    tokenizer = tiny[1]
    model = build_tiny_llama(len(tokenizer), initializer_range=0.5)  # replies that depend on the prompt
    conversations = [[{"role": "system", "content": SYSTEM_PROMPT}, *conversation(q)] for q in QUESTIONS]
    prefix = PromptPrefix.system_turn(model, tokenizer)
    read = []
    handle = model.register_forward_pre_hook(lambda _, args, kwargs: read.append(kwargs["input_ids"].shape[1]),
                                             with_kwargs=True)
    try:
        whole = finals(stream_batch(model, tokenizer, conversations, max_new_tokens=8))
        prompt_reads = read[:1]
        read.clear()
        cached = finals(stream_batch(model, tokenizer, conversations, max_new_tokens=8, prefix=prefix))
    finally:
        handle.remove()
    assert cached == whole
    assert read[0] == len(prefix.ids), "the prefix is read once, first"
    assert read[1] == prompt_reads[0] - len(prefix.ids), "a row reads only what follows the prefix"
    other = [{"role": "system", "content": "Another system prompt."}, *conversation(QUESTIONS[0])]
    assert finals_one(stream_batch(model, tokenizer, [other], max_new_tokens=8, prefix=prefix)) == \
        finals_one(stream_batch(model, tokenizer, [other], max_new_tokens=8))


def finals_one(updates) -> str:
    texts = [text for _, text in updates if text is not None]
    return texts[-1] if texts else ""


def test_lookup_draft_continues_the_latest_earlier_occurrence_of_the_tail():
    from pipeline.generation import lookup_draft

    ids = [7, 2, 3, 4, 5, 2, 3, 9, 1, 2, 3]
    assert lookup_draft(ids, 3) == [9, 1, 2], "the latest earlier [2, 3] is followed by 9, 1, 2"
    assert lookup_draft(ids, 3, ngram=3) == [9, 1, 2]
    assert lookup_draft([5, 6, 7, 6], 2) == [7, 6], "no earlier [7, 6]: the last id alone is looked up"
    assert lookup_draft([1, 2, 3], 4) == [], "nothing to continue"


def _decode_alone(model, tokenizer, question: str, cap: int, lookup: int) -> tuple[list[int], int]:
    """(tokens, decode steps) of one greedy row of ``cap`` tokens, the refusal's words banned."""
    import torch

    from pipeline.generation import DecodeBatch, Row, prompt_text, refusal_word_ids

    ids = tokenizer(prompt_text(tokenizer, conversation(question)), add_special_tokens=False)["input_ids"]
    batch = DecodeBatch(model, tokenizer, lookup_tokens=lookup)
    row = Row(ids, lambda text: None, cap, min_new_tokens=cap)
    with torch.inference_mode():
        batch.join(row)
        row.processors.append(NoBadWordsLogitsProcessor(refusal_word_ids(tokenizer), eos_token_id=[2]))
        while batch.rows:
            batch.step()
    return row.generated, batch.steps


def test_prompt_lookup_writes_the_same_reply_in_fewer_steps(monkeypatch):
    """A lone greedy row fed guessed tokens writes exactly the tokens it writes one step at a
    time, in fewer steps. Here each guess is the true continuation with its third token wrong,
    so every step keeps two guesses, drops the rest and their cache, and goes on from there."""
    import pipeline.generation as generation

    tokenizer = build_tokenizer()
    sharp = build_tiny_llama(len(tokenizer), initializer_range=0.5)
    for question, cap in zip(QUESTIONS, (30, 17, 25)):
        plain, plain_steps = _decode_alone(sharp, tokenizer, question, cap, lookup=0)
        assert len(set(plain)) > 3, "the check needs a reply that varies"
        start = len(tokenizer(generation.prompt_text(tokenizer, conversation(question)),
                              add_special_tokens=False)["input_ids"])

        def half_right(ids, size, ngram=2):
            truth = plain[len(ids) - start:len(ids) - start + size]
            return [(t + 1) % len(tokenizer) if i == 2 else t for i, t in enumerate(truth)]

        monkeypatch.setattr(generation, "lookup_draft", half_right)
        guessed, guessed_steps = _decode_alone(sharp, tokenizer, question, cap, lookup=6)
        monkeypatch.undo()
        assert guessed == plain and len(plain) == cap
        assert guessed_steps <= plain_steps // 2, (guessed_steps, plain_steps)
    model, _ = tiny = build_tiny_llama(len(tokenizer)), tokenizer
    texts = finals(stream_batch(model, tokenizer, [conversation(q) for q in QUESTIONS], max_new_tokens=12,
                                lookup_tokens=8))
    assert [texts[i].strip() for i in range(len(QUESTIONS))] == [alone(tiny, q, 12) for q in QUESTIONS]


def test_rows_decoding_together_keep_their_own_guesses(monkeypatch):
    """Rows fed guesses together (20 in all: 6 a row while three decode): each keeps the guesses
    it would choose (here the first two, or four), the rest are masked out of the cache, and
    every row writes exactly its reply decoded alone, whatever its neighbours kept."""
    import torch

    import pipeline.generation as generation

    tokenizer = build_tokenizer()
    sharp = build_tiny_llama(len(tokenizer), initializer_range=0.5)
    caps = (30, 17, 25)
    prompts = [tokenizer(generation.prompt_text(tokenizer, conversation(q)), add_special_tokens=False)["input_ids"]
               for q in QUESTIONS]
    plain = [_decode_alone(sharp, tokenizer, q, cap, lookup=0)[0] for q, cap in zip(QUESTIONS, caps)]
    wrong_at = {0: 2, 1: 4, 2: 2}

    def partly_right(ids, size, ngram=2):
        row = next(i for i, p in enumerate(prompts) if ids[:len(p)] == p)
        done = len(ids) - len(prompts[row])
        truth = plain[row][done:done + size]
        return [(t + 1) % len(tokenizer) if i == wrong_at[row] else t for i, t in enumerate(truth)]

    monkeypatch.setattr(generation, "lookup_draft", partly_right)
    batch = generation.DecodeBatch(sharp, tokenizer, lookup_tokens=20)
    rows = [generation.Row(ids, lambda text: None, cap, min_new_tokens=cap) for ids, cap in zip(prompts, caps)]
    with torch.inference_mode():
        for row in rows:
            batch.join(row)
        while batch.rows:
            batch.step()
    assert [row.generated for row in rows] == plain
    assert batch.steps <= max(caps) // 2, batch.steps


def test_the_batcher_guesses_for_a_lone_request(tiny):
    batcher = Batcher(*tiny)
    reply = list(batcher.stream(conversation(QUESTIONS[1]), GenerationSettings(max_new_tokens=40)))[-1]
    assert reply.strip() == alone(tiny, QUESTIONS[1], 40)
    assert batcher.batch.steps < batcher.batch.step_tokens, "one step wrote several tokens"


def test_decode_steps_run_with_the_decode_threads_and_prompts_with_torchs(tiny, monkeypatch):
    """The worker reads each prompt with torch's thread count and decodes with ``decode_threads``
    (OpenMP regions off the main thread cost far more with two threads); the reply is the same."""
    import torch

    from pipeline.generation import DecodeBatch

    seen = {"join": set(), "step": set()}
    join, step = DecodeBatch.join, DecodeBatch.step

    def counted(kind, method):
        def wrapper(self, *args):
            seen[kind].add(torch.get_num_threads())
            return method(self, *args)
        return wrapper

    monkeypatch.setattr(DecodeBatch, "join", counted("join", join))
    monkeypatch.setattr(DecodeBatch, "step", counted("step", step))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batcher = Batcher(*tiny, decode_threads=1)  # prompts: this thread's 2
        torch.set_num_threads(1)  # the default a new thread starts with, as during another worker's step
        reply = list(batcher.stream(conversation(QUESTIONS[1]), GenerationSettings(max_new_tokens=12)))[-1]
        batcher.close(wait=10)
    finally:
        torch.set_num_threads(threads)
    assert seen == {"join": {2}, "step": {1}}
    assert reply.strip() == alone(tiny, QUESTIONS[1], 12)


def test_two_workers_decode_two_requests_in_parallel_batches(tiny):
    """With two workers, a request goes to the idle worker rather than joining the busy one's
    batch; each reply is the one decoded alone, and closing stops both workers."""
    import threading

    batcher = Batcher(*tiny, max_batch=8, workers=2)
    settings = GenerationSettings(max_new_tokens=30)
    replies = {}

    def ask(question, stream):
        replies[question] = list(stream)[-1]

    with batcher._ready:  # both wait before either worker takes one
        streams = [batcher.stream(conversation(q), settings) for q in QUESTIONS[:2]]
    askers = [threading.Thread(target=ask, args=(q, s)) for q, s in zip(QUESTIONS[:2], streams)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join(60)
    assert sorted(batcher.batch_sizes) == [1, 1], batcher.batch_sizes
    assert all(b is not None and b.steps > 0 for b in batcher.batches), "both workers decoded"
    assert {q: r.strip() for q, r in replies.items()} == {q: alone(tiny, q, 30) for q in QUESTIONS[:2]}
    batcher.close(wait=10)
    assert not any(t.is_alive() for t in batcher._threads)


def test_a_thread_that_starts_during_a_decode_step_takes_its_count_back():
    """torch gives a thread's first call the count last set anywhere: one started while a decode
    step runs with one thread would keep one. Request threads call use_threads first."""
    import threading

    import torch

    from pipeline.numeric import intra_op_threads, use_threads

    threads, seen = torch.get_num_threads(), []
    torch.set_num_threads(2)

    def request_thread():
        seen.append(torch.get_num_threads())
        use_threads(2)
        seen.append(torch.get_num_threads())

    try:
        with intra_op_threads(1):
            late = threading.Thread(target=request_thread)
            late.start()
            late.join()
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 2]


def test_prompts_are_read_on_the_thread_that_serves_model_calls(tiny, monkeypatch):
    """While a thread serves model calls (the service's main thread), the batcher's workers hand
    it every prompt to read; with ``decode_threads`` 1 they keep the decode steps; the reply is
    the same."""
    import threading

    from pipeline import model_calls
    from pipeline.generation import DecodeBatch, PromptPrefix

    seen = {"prefix": set(), "join": set(), "step": set()}
    join, step, system_turn = DecodeBatch.join, DecodeBatch.step, PromptPrefix.system_turn

    def recorded(kind, method):
        def wrapper(*args):
            seen[kind].add(threading.current_thread())
            return method(*args)
        return wrapper

    monkeypatch.setattr(DecodeBatch, "join", recorded("join", join))
    monkeypatch.setattr(DecodeBatch, "step", recorded("step", step))
    monkeypatch.setattr(PromptPrefix, "system_turn", staticmethod(recorded("prefix", system_turn)))
    batcher = Batcher(*tiny, workers=2, decode_threads=1)
    settings = GenerationSettings(max_new_tokens=12)
    try:
        replies = model_calls.serve_while(
            lambda: [list(batcher.stream(conversation(q), settings))[-1] for q in QUESTIONS[:2]])
    finally:
        batcher.close(wait=10)
    here = threading.current_thread()
    assert seen["prefix"] == {here} and seen["join"] == {here}
    assert seen["step"] and here not in seen["step"], "decode steps stay in the workers"
    assert [r.strip() for r in replies] == [alone(tiny, q, 12) for q in QUESTIONS[:2]]


def test_multi_threaded_decode_steps_run_on_the_thread_that_serves_model_calls(tiny, monkeypatch):
    """Decode steps with more than one intra-op thread (``decode_threads`` 0, the default: the
    serving thread's count) are model calls like prompts: they run on the serving thread."""
    import threading

    from pipeline import model_calls
    from pipeline.generation import DecodeBatch

    stepped_on, step = set(), DecodeBatch.step

    def recorded(self):
        stepped_on.add(threading.current_thread())
        return step(self)

    monkeypatch.setattr(DecodeBatch, "step", recorded)
    batcher = Batcher(*tiny)
    try:
        reply = model_calls.serve_while(
            lambda: list(batcher.stream(conversation(QUESTIONS[0]), GenerationSettings(max_new_tokens=12)))[-1])
    finally:
        batcher.close(wait=10)
    assert stepped_on == {threading.current_thread()}
    assert reply.strip() == alone(tiny, QUESTIONS[0], 12)
