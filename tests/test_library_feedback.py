"""Uploads (names, limits, incremental indexing) and chat feedback -> preference pairs."""
from __future__ import annotations

import json

import pytest

from conftest import SMALL_DOCS
from pipeline.data.feedback import FeedbackStore, export_pairs
from pipeline.errors import UserError
from pipeline.retrieval.settings import IndexSettings
from service.library import Library, safe_name


def test_safe_names():
    assert safe_name("../../etc/passwd.md") == "passwd.md"
    assert safe_name("C:\\\\Users\\\\me\\\\my notes (v2).txt") == "my_notes_v2_.txt"
    assert safe_name(".hidden.md") == "hidden.md"
    for bad in ("run.exe", "noextension", "..", ""):
        with pytest.raises(UserError, match="unsupported file"):
            safe_name(bad)


@pytest.fixture
def library(tmp_path):
    from pipeline.retrieval.embedder import Embedder
    from pipeline.retrieval.store import build_index

    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in SMALL_DOCS.items():
        (docs / name).write_text(text)
    settings = IndexSettings()
    build_index(docs, tmp_path / "served", settings, Embedder())
    return Library(docs, tmp_path / "served", tmp_path / "work", settings, max_bytes=2000)


@pytest.mark.slow
def test_upload_is_indexed_incrementally_and_removable(library):
    from pipeline.retrieval.retriever import Retriever

    index = library.add("lion.md", b"# Lion\n\nThe Lion optimizer tracks only momentum.\n")
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["documents"] == 3 and manifest["embedded"] == 1, "only the new chunk is embedded"
    assert Retriever(index).search("Lion optimizer momentum", k=1)[0].doc_id == "uploads/lion.md"
    assert library.documents() == [{"name": "lion.md", "kilobytes": 0.0}]
    index = library.remove("lion.md")
    assert json.loads((index / "manifest.json").read_text())["documents"] == 2
    with pytest.raises(UserError, match="no uploaded document"):
        library.remove("lion.md")


@pytest.mark.slow
def test_upload_limits(library):
    with pytest.raises(UserError, match="the limit is"):
        library.add("big.md", b"x" * 3000)
    with pytest.raises(UserError, match="unsupported"):
        library.add("tool.sh", b"echo")
    with pytest.raises(UserError, match="'empty.md' cannot be indexed: it holds no text"):
        library.add("empty.md", b"   ")
    with pytest.raises(UserError, match="'blob.md' cannot be indexed: binary file"):
        library.add("blob.md", b"\x00\x01binary")
    assert library.documents() == []


def test_feedback_exports_preference_pairs(tmp_path):
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    prompt = [{"role": "user", "content": "Who made Adam?"}]
    store.record("sft", prompt, "Hinton [1].", -1, "Kingma and Ba [1].")
    store.record("sft", prompt, "Kingma and Ba [2].", 1)
    store.record("dpo", [{"role": "user", "content": "other"}], "fine", 1)
    with pytest.raises(ValueError):
        store.record("sft", prompt, "x", 0)
    assert export_pairs(store, tmp_path / "prefs.jsonl") == 0, "nothing joins DPO before a review"
    assert store.set_review([1, 2, 3], "approved") == 3
    count = export_pairs(store, tmp_path / "prefs.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert count == 2 and len(rows) == 2
    assert rows[0]["chosen"][0]["content"] == "Kingma and Ba [1]." and rows[0]["rejected"][0]["content"] == "Hinton [1]."
    assert rows[1]["chosen"][0]["content"] == "Kingma and Ba [2]." and rows[1]["prompt"] == prompt


@pytest.mark.slow
def test_chat_model_calls_run_between_an_uploads_embedding_batches(library, monkeypatch):
    """An upload embeds one batch per model call, so a chat's call queued meanwhile runs before
    the upload's next batch instead of after the whole upload."""
    import threading
    import time
    from dataclasses import replace

    from pipeline import model_calls
    from pipeline.retrieval.embedder import Embedder

    library.settings = replace(library.settings, batch_size=1)
    order, first_batch = [], threading.Event()
    encode = Embedder.encode

    def recorded(self, texts, progress=False):
        order.append(("embed", threading.current_thread()))
        if len(order) == 1:
            first_batch.set()
            time.sleep(0.3)  # the chat's call is queued while this batch runs
        return encode(self, texts, progress)

    monkeypatch.setattr(Embedder, "encode", recorded)

    def chat():
        first_batch.wait(30)
        model_calls.run(lambda: order.append(("chat", threading.current_thread())))

    def upload():
        asker = threading.Thread(target=chat)
        asker.start()
        text = "\n\n".join(f"## Part {i}\n\n" + f"Lion fact number {i} is about momentum. " * 12 for i in range(3))
        index = library.add("lion.md", f"# Lion\n\n{text}\n".encode())
        asker.join()
        return index

    index = model_calls.serve_while(upload)
    kinds = [kind for kind, _ in order]
    assert kinds.count("embed") >= 3 and kinds[:2] == ["embed", "chat"], kinds
    assert {thread for _, thread in order} == {threading.current_thread()}, "every call on the serving thread"
    assert json.loads((index / "manifest.json").read_text())["embedded"] == kinds.count("embed")


@pytest.mark.slow
def test_an_upload_uses_the_shared_embedder_instead_of_loading_one(library, tmp_path, monkeypatch):
    from pipeline.retrieval.embedder import Embedder

    shared = Embedder()

    def no_loading(*args, **kwargs):
        raise AssertionError("the library loaded an embedder of its own")

    monkeypatch.setattr("pipeline.retrieval.embedder.Embedder", no_loading)
    sharing = Library(library.docs_dir, library.served_index, tmp_path / "sharing", library.settings,
                      max_bytes=2000, embedder=shared)
    index = sharing.add("lion.md", b"# Lion\n\nThe Lion optimizer tracks only momentum.\n")
    assert json.loads((index / "manifest.json").read_text())["embedded"] == 1
    from service.library import BatchedModelCalls

    batched = BatchedModelCalls(shared, 8)
    assert batched.tokenizer is not shared.tokenizer, "chunking must not share the query embedder's tokenizer"
    assert batched.tokenizer("Lion optimizer")["input_ids"] == shared.tokenizer("Lion optimizer")["input_ids"]
