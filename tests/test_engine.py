"""The chat engine on a tiny hand-built model: streaming, sources, variants, history, limits."""
from __future__ import annotations

import pytest

from pipeline.errors import UserError
from pipeline.prompt import REFUSAL
from service.engine import EMPTY_MESSAGE_REPLY, MAX_MESSAGE_CHARS, Engine, GenerationSettings, MessageTooLong, Reply

SHORT = GenerationSettings(max_new_tokens=12)

pytestmark = pytest.mark.slow  # loads the real all-MiniLM-L6-v2 embedder


@pytest.fixture(scope="module")
def engine(served_artifacts):
    return Engine(served_artifacts, numeric="fp32")  # exact weights, so merging can be checked


def test_stream_grows_and_ends_with_sources(engine):
    replies = list(engine.stream("Who proposed Adam?", settings=SHORT))
    assert len(replies) >= 3
    texts = [r.text for r in replies]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    final = replies[-1]
    assert final.completion_tokens > 0 and final.prompt_tokens > 20
    assert final.passages and final.passages[0].doc_id == "adam.md"


def test_retrieval_toggle(engine):
    assert engine.answer("Who proposed Adam?", use_retrieval=False, settings=SHORT).passages == []
    with_passages = engine.answer("Who proposed Adam?", settings=SHORT)
    without = engine.answer("Who proposed Adam?", use_retrieval=False, settings=SHORT)
    assert with_passages.prompt_tokens > without.prompt_tokens + 20


def test_variants_are_listed_and_differ(engine):
    assert engine.variants() == ["base", "sft"]
    base, _ = engine.model("base")
    sft, _ = engine.model("sft")
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert not base.state_dict()[weight].equal(sft.state_dict()[weight]), "adapter not merged"
    assert engine.answer("dropout?", variant="sft", settings=SHORT).variant == "sft"
    with pytest.raises(UserError, match="variant 'dpo' is not built"):
        engine.answer("x", variant="dpo")
    with pytest.raises(UserError, match="unknown variant"):
        engine.answer("x", variant="gpt5")


def test_merged_adapter_equals_peft_model(served_artifacts, engine):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged, tokenizer = engine.model("sft")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(served_artifacts / "base"),
                                          served_artifacts / "sft" / "adapter").eval()
    ids = tokenizer("hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, reference(ids).logits, atol=1e-4, rtol=1e-4)


def test_int8_path_quantises_linear_layers_and_keeps_the_logits(served_artifacts, engine):
    import torch

    fast = Engine(served_artifacts, numeric="int8")
    int8, tokenizer = fast.model("sft")
    fp32, _ = engine.model("sft")
    assert type(int8.model.layers[0].self_attn.q_proj).__name__ == "Linear"
    assert int8.model.layers[0].self_attn.q_proj.__module__.startswith("torch.ao.nn.quantized")
    ids = tokenizer("Adam was proposed by", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = int8(ids).logits.flatten(), fp32(ids).logits.flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.99 and not torch.equal(a, b)
    reply = fast.answer("Who proposed Adam?", variant="sft", settings=SHORT)
    assert reply.completion_tokens > 0 and reply.passages[0].doc_id == "adam.md"
    with pytest.raises(UserError, match="numeric path must be one of"):
        Engine(served_artifacts, numeric="fp8")


def test_concurrent_requests_get_their_own_replies_and_loads_do_not_race(served_artifacts):
    """Three threads ask at once: each free-decoding reply, decoded in whatever batch
    (pipeline/batching.py; tests/test_batching.py pins the batching), is what it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    fresh = Engine(served_artifacts, numeric="fp32")
    questions = ["adam?", "dropout?", "adam beta?"]
    with ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(lambda q: fresh.answer(q, settings=SHORT).text, questions))
    assert texts == [fresh.answer(q, settings=SHORT).text for q in questions]
    sizes = fresh.batcher("base").batch_sizes
    assert max(sizes[:-3]) <= 3 and sizes[-3:] == [1, 1, 1], sizes  # rows decoding after each admission
    # the three threads loaded the retriever and a model: no load may have raced another and
    # left transformers' loading state behind (a later model's tied head on the meta device)
    from pipeline.artifacts import Artifacts
    from pipeline.numeric import load_variant

    later, _ = load_variant(Artifacts(served_artifacts), "base")
    assert later.lm_head.weight.device.type == "cpu"


def test_copy_decoding_is_bounded_and_queued(served_artifacts, monkeypatch):
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    bounded = Engine(served_artifacts, numeric="fp32", max_concurrent=1)
    monkeypatch.setattr(bounded, "selector", lambda variant: object())  # every request copies
    active, peak, lock = [0], [0], threading.Lock()

    def slow_copy(self, messages, passages, tokenizer, model, variant, selector):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        yield Reply("done", passages, variant)

    monkeypatch.setattr(Engine, "_copy", slow_copy)
    with ThreadPoolExecutor(3) as pool:
        texts = [r.text for r in pool.map(lambda q: bounded.answer(q), ["adam?", "dropout?", "adam beta?"])]
    assert texts == ["done"] * 3 and peak[0] == 1


def test_history_is_truncated_oldest_first(engine, monkeypatch):
    model, _ = engine.model("base")
    monkeypatch.setattr(model.config, "max_position_embeddings", 200)  # budget: 100 tokens
    history = [("first question " * 5, "first answer"), ("second", "answer two")]
    messages, *_ = engine.prepare("third?", history, "base", use_retrieval=False)
    contents = [m["content"] for m in messages]
    assert "second" in contents and not any("first question" in c for c in contents)


def test_empty_and_overlong_messages(engine):
    assert engine.answer("   ").text == EMPTY_MESSAGE_REPLY
    with pytest.raises(MessageTooLong, match=f"limit is {MAX_MESSAGE_CHARS}"):
        engine.answer("x" * (MAX_MESSAGE_CHARS + 1))


def test_a_dropped_stream_stops_generation_within_a_step(engine):
    """Closing the reply stream (a client hung up) ends generate() at the next decode step
    and leaves the batcher idle: far fewer forward passes than the 400 asked for."""
    model, _ = engine.model("base")
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        stream = engine.stream("Who proposed Adam?", settings=GenerationSettings(max_new_tokens=400))
        for _, _reply in zip(range(3), stream):
            pass
        stream.close()
        steps_at_close = len(calls)
        assert engine.batcher("base").idle.wait(10), "the batch must end once its stream closed"
        assert len(calls) <= steps_at_close + 2 and len(calls) < 50, len(calls)
    finally:
        handle.remove()


def test_each_answer_hands_freed_memory_back(engine, monkeypatch):
    """After every reply, read to its end or dropped, glibc's freed-but-kept memory goes back
    to the system (0.14 GB of the service's resident memory after six answers, measured)."""
    from service import engine as engine_module

    calls = []
    monkeypatch.setattr(engine_module, "release_freed_memory", lambda: calls.append(1))
    engine.answer("Who proposed Adam?", settings=SHORT)
    assert len(calls) == 1
    stream = engine.stream("Who proposed Adam?", settings=GenerationSettings(max_new_tokens=400))
    next(stream)
    stream.close()
    assert len(calls) == 2


def test_decide_then_answer_uses_the_variant_threshold(engine, monkeypatch):
    """Above the dev-split threshold the engine refuses without generating; below it, it
    answers with the refusal's words banned."""
    from pipeline.prompt import REFUSAL

    monkeypatch.setattr(engine, "refusal_threshold", lambda variant: -1e9)  # always above: refuse
    reply = engine.answer("Who proposed Adam?", variant="sft", settings=SHORT)
    assert reply.text == REFUSAL and reply.passages and reply.completion_tokens > 0
    monkeypatch.setattr(engine, "refusal_threshold", lambda variant: 1e9)  # never above: answer
    reply = engine.answer("Who proposed Adam?", variant="sft", settings=SHORT)
    assert reply.text != REFUSAL and "do not contain the answer" not in reply.text


@pytest.fixture
def overlap_only(served_artifacts):
    """sft served with a selector that reads word overlap alone (neither the reader nor the
    model), written to its copying.json for the test's length."""
    import json

    from pipeline.copying import SETTINGS_FILE, Linear, Selector

    selector = Selector(("word_overlap",), Linear([0], [1], [1], 0.0), Linear([0] * 2, [1] * 2, [0, 0], 0.0), 1.0,
                        ("word_overlap", "embedding_similarity"))
    path = served_artifacts / "sft" / SETTINGS_FILE
    path.write_text(json.dumps({"selector": selector.to_dict()}))
    yield selector
    path.unlink()


def test_copy_decoding_serves_a_cited_passage_sentence(served_artifacts, overlap_only):
    from pipeline.copying import Linear, Selector

    engine = Engine(served_artifacts, numeric="fp32")
    replies = list(engine.stream("Who proposed Adam?", variant="sft"))
    assert [r.text for r in replies] == ["Adam was proposed by Diederik Kingma and Jimmy Ba in 2014 [1]."]
    assert replies[0].completion_tokens > 10 and replies[0].prompt_tokens > 20
    free = engine.answer("Who proposed Adam?", variant="sft",
                         settings=GenerationSettings(max_new_tokens=12, copy_decoding=False))
    assert free.text != replies[0].text, "unticking copy decoding decodes freely"
    always_silent = Selector(("word_overlap",), overlap_only.sentence, Linear([0] * 2, [1] * 2, [0, 0], 5.0), 1.0,
                             ("word_overlap", "embedding_similarity"))
    engine._selectors["sft"] = always_silent  # silence score 5 > threshold 1: refuse
    assert engine.answer("Who proposed Adam?", variant="sft").text == REFUSAL


def test_retrieval_and_copy_decoding_run_on_the_thread_that_serves_model_calls(served_artifacts, overlap_only,
                                                                               monkeypatch):
    """As served (`python -m service`): a request's thread hands its query embedding and its copy
    decoding to the thread serving model calls, and gets the same reply."""
    import threading

    from pipeline import model_calls
    from pipeline.copying import Selector

    engine = Engine(served_artifacts, numeric="fp32")
    alone = engine.answer("Who proposed Adam?", variant="sft").text
    seen = {"search": set(), "answer": set()}
    search, answer = type(engine.retriever).search, Selector.answer

    def recorded(kind, method):
        def wrapper(*args, **kwargs):
            seen[kind].add(threading.current_thread())
            return method(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(type(engine.retriever), "search", recorded("search", search))
    monkeypatch.setattr(Selector, "answer", recorded("answer", answer))
    served = model_calls.serve_while(lambda: engine.answer("Who proposed Adam?", variant="sft").text)
    assert served == alone == "Adam was proposed by Diederik Kingma and Jimmy Ba in 2014 [1]."
    assert seen == {"search": {threading.current_thread()}, "answer": {threading.current_thread()}}


def test_a_new_index_keeps_the_query_embedder_of_the_same_model(served_artifacts, tmp_path, monkeypatch):
    """After an upload the next question must not load the embedder again (seconds)."""
    import json
    import shutil

    engine = Engine(served_artifacts, numeric="fp32")
    first = engine.retriever.embedder
    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(engine.retriever.folder, rebuilt)
    engine.set_index(rebuilt)
    assert engine.retriever.folder == rebuilt and engine.retriever.embedder is first
    assert engine.answer("Who proposed Adam?", settings=SHORT).passages[0].doc_id == "adam.md"
    other = tmp_path / "other-model"
    shutil.copytree(rebuilt, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "embedder": "another-model"}))
    loaded = []

    class Another:
        def __init__(self, name, batch_size=64):
            loaded.append(name)
            self.name = name

    monkeypatch.setattr("pipeline.retrieval.embedder.Embedder", Another)
    engine.set_index(other)
    assert engine.retriever.embedder.name == "another-model" and loaded == ["another-model"]
