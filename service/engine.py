"""The chat engine: load a variant and the index, retrieve, and stream a cited answer.

Imports nothing from Gradio; the UI (service/app.py) and the OpenAI-compatible routes
(service/openai_api.py) both call ``Engine.stream``.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from pipeline import model_calls
from pipeline.artifacts import Artifacts
from pipeline.errors import UserError
from pipeline.numeric import load_variant, release_freed_memory, use_threads
from pipeline.prompt import build_messages, fit_history, retrieval_query
from pipeline.retrieval.settings import RetrievalSettings
from pipeline.batching import Batcher, ServerBusy  # noqa: F401  (ServerBusy: the API's 429)

log = logging.getLogger("service.engine")
VARIANTS = ("base", "sft", "ppo", "dpo")
MAX_MESSAGE_CHARS = 4000
# The engine's own default: fp32 (merged LoRA), exact on every CPU. `python -m service` passes
# pipeline.numeric.served_default() unless --numeric says otherwise.
DEFAULT_NUMERIC = "fp32"
EMPTY_MESSAGE_REPLY = "Please type a question, for example: What does the KL penalty in RLHF do?"


class MessageTooLong(UserError):
    pass


@dataclass
class GenerationSettings:
    temperature: float = 0.0  # 0 = greedy decoding (reproducible); raise for variety
    top_p: float = 0.9  # nucleus sampling mass, used when temperature > 0
    max_new_tokens: int = 160  # answer length cap, in tokens
    # 1.0 = off. transformers applies it to the prompt's tokens too, so anything above 1
    # penalises copying the passage's words, which is how a 135M model answers best.
    repetition_penalty: float = 1.0
    deadline_seconds: float = 120.0  # generation stops here even if the client still waits
    # Greedy replies of a variant with a copy-decoding selector copy one shown sentence with its
    # [n], or refuse (pipeline/copying.py); False, or temperature > 0, decodes freely.
    copy_decoding: bool = True


@dataclass
class Reply:
    text: str
    passages: list = field(default_factory=list)
    variant: str = "base"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    messages: list = field(default_factory=list)  # the exact prompt the model answered


def _embedder_name(index_dir: Path) -> str | None:
    """The embedder an index was built with (its manifest), or None if unreadable (loading the
    index then says what is wrong)."""
    import json

    try:
        return json.loads((Path(index_dir) / "manifest.json").read_text())["embedder"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


class Engine:
    def __init__(self, artifacts_dir: Path, index_dir: Path | None = None,
                 retrieval: RetrievalSettings | None = None, max_concurrent: int = 1,
                 max_batch: int = 8, max_waiting: int = 16, queue_timeout: float = 60.0,
                 remote_url: str | None = None, remote_model: str | None = None,
                 numeric: str = DEFAULT_NUMERIC, lookup_tokens: int | None = None,
                 decode_threads: int | None = None, decode_workers: int | None = None):
        from pipeline.numeric import check_numeric_path

        self.numeric = check_numeric_path(numeric)
        self.artifacts = Artifacts(artifacts_dir)
        self.remote_url = remote_url.rstrip("/") if remote_url else None  # an OpenAI-compatible server
        self.remote_model = remote_model
        self.retrieval = retrieval or RetrievalSettings()
        self.index_dir = Path(index_dir) if index_dir else None
        self._retriever = None
        self._query_embedder = None  # the served index's, kept across set_index
        self._models: dict[str, tuple] = {}
        self._thresholds: dict[str, float | None] = {}  # read once per variant, like its weights
        self._selectors: dict[str, object] = {}  # copy-decoding selectors, read once per variant
        self._reader = None  # the selectors' cross-encoder (pipeline/reader.py), loaded on first use
        self._batchers: dict[str, Batcher] = {}  # free decoding, batched across requests, per variant
        self.max_batch = max_batch
        self.lookup_tokens = lookup_tokens  # None: pipeline.generation.LOOKUP_TOKENS
        self.decode_threads = decode_threads  # None: pipeline.numeric.DECODE_THREADS
        self.decode_workers = decode_workers  # None: pipeline.numeric.DECODE_WORKERS
        import torch

        self.threads = torch.get_num_threads()  # each request's thread uses this many (use_threads)
        # One load at a time: concurrent from_pretrained calls (a variant and the embedder, from
        # two request threads) race on transformers' global loading state and can leave a
        # later model's tied weights on the meta device.
        self._load_lock = threading.RLock()
        self._slots = threading.BoundedSemaphore(max_concurrent)  # copy decoding and remote calls
        self.max_waiting, self.queue_timeout = max_waiting, queue_timeout  # past these: ServerBusy
        self._waiting, self._waiting_lock = 0, threading.Lock()

    # -- resources -------------------------------------------------------------------
    def variants(self) -> list[str]:
        if self.remote_url:
            return ["remote"]
        return [v for v in VARIANTS if self.artifacts.meta(v) is not None]

    def model(self, variant: str):
        if variant not in VARIANTS:
            raise UserError(f"unknown variant '{variant}'; choose from {', '.join(VARIANTS)}")
        with self._load_lock:
            if variant not in self._models:
                if len(self._models) >= 2:  # keep memory bounded: two variants at most
                    evicted = next(iter(self._models))
                    self._models.pop(evicted)
                    if evicted in self._batchers:
                        self._batchers.pop(evicted).close()
                log.info("loading variant %s", variant)
                self._models[variant] = load_variant(self.artifacts, variant, self.numeric)  # merged
            return self._models[variant]

    def close(self, wait: float = 30.0) -> None:
        """Stop every variant's decoding workers, waiting up to ``wait`` seconds for each batcher."""
        with self._load_lock:
            batchers, self._batchers = list(self._batchers.values()), {}
        for batcher in batchers:
            batcher.close(wait)

    def batcher(self, variant: str) -> Batcher:
        """The variant's free-decoding queue (pipeline/batching.py), made on first use."""
        model, tokenizer = self.model(variant)
        with self._load_lock:
            if variant not in self._batchers:
                self._batchers[variant] = Batcher(model, tokenizer, self.max_batch, self.max_waiting,
                                                  self.queue_timeout, self.lookup_tokens,
                                                  self.decode_threads,
                                                  self.decode_workers, self.threads)
            return self._batchers[variant]

    @property
    def retriever(self):
        with self._load_lock:
            if self._retriever is None:
                from pipeline.retrieval.retriever import Retriever

                folder = self.index_dir or self.artifacts.require("index")
                kept = self._query_embedder  # another index's: reused when it is the same model
                same = kept is not None and _embedder_name(folder) == kept.name
                retriever = Retriever(folder, self.retrieval, embedder=kept if same else None)
                self._query_embedder = retriever.embedder  # loaded now, under the lock
                self._retriever = retriever
            return self._retriever

    def set_index(self, folder: Path) -> None:
        """Serve ``folder`` from the next question on (its query embedder is reused when it was
        built with the same model: loading one takes seconds)."""
        with self._load_lock:
            self.index_dir, self._retriever = Path(folder), None

    # -- answering -------------------------------------------------------------------
    def prepare(self, question: str, history: Sequence[tuple[str, str]], variant: str,
                use_retrieval: bool):
        """(messages, passages, tokenizer, model) for one turn; checks the message first."""
        if len(question) > MAX_MESSAGE_CHARS:
            raise MessageTooLong(f"the message has {len(question)} characters; the limit is "
                                 f"{MAX_MESSAGE_CHARS}. Shorten it or split it into questions.")
        passages = self.retriever.search(retrieval_query(question, history)) if use_retrieval else []
        if self.remote_url:
            history = fit_history(history, lambda text: len(text) // 4, 1024)
            return build_messages(question, passages, history), passages, None, None
        model, tokenizer = self.model(variant)
        window = int(getattr(model.config, "max_position_embeddings", 2048))
        budget = min(window, 4096) // 2  # half the window for history, the rest for passages
        history = fit_history(history, lambda text: token_count(tokenizer, text), budget)
        return build_messages(question, passages, history), passages, tokenizer, model

    def stream(self, question: str, history: Sequence[tuple[str, str]] = (), variant: str = "base",
               use_retrieval: bool = True, settings: GenerationSettings | None = None
               ) -> Iterator[Reply]:
        """Yield the growing reply; the last one holds the full answer and token counts."""
        if not question.strip():
            yield Reply(EMPTY_MESSAGE_REPLY, [], variant)
            return
        settings = settings or GenerationSettings()
        use_threads(self.threads)  # a decode worker's step may have left one as torch's default
        # model calls (the query's embedding, a first load) run on the thread that serves them
        messages, passages, tokenizer, model = model_calls.run(self.prepare, question, history, variant,
                                                               use_retrieval)
        selector = self.selector(variant) if settings.copy_decoding and settings.temperature == 0 else None
        if not self.remote_url and not (selector is not None and passages):
            # free decoding: batched with other requests; the batcher bounds its own queue
            yield from self._with_prompt(self._generate(messages, passages, tokenizer, variant, settings), messages)
            return
        self._wait_for_slot()
        try:
            if self.remote_url:
                replies = self._generate_remote(messages, passages, variant, settings)
            else:
                replies = self._copy(messages, passages, tokenizer, model, variant, selector)
            yield from self._with_prompt(replies, messages)
        finally:
            self._slots.release()

    @staticmethod
    def _with_prompt(replies, messages):
        try:
            for reply in replies:
                reply.messages = messages
                yield reply
        finally:
            replies.close()  # a caller that stopped reading stops the generation, now
            # an answer's activations and caches leave holes that glibc keeps resident: 0.14 GB
            # after six answers, with int8-decode or fp32 (docs/results.md, memory); 1-10 ms
            release_freed_memory()

    def _wait_for_slot(self) -> None:
        """Take a generation slot, or raise ServerBusy: the queue is full or the wait too long."""
        with self._waiting_lock:
            if self._waiting >= self.max_waiting:
                raise ServerBusy(f"{self._waiting} requests are already waiting; retry shortly")
            self._waiting += 1
        try:
            acquired = self._slots.acquire(timeout=self.queue_timeout)
        finally:
            with self._waiting_lock:
                self._waiting -= 1
        if not acquired:
            raise ServerBusy(f"no generation slot freed within {self.queue_timeout:.0f} s; retry shortly")

    def _generate_remote(self, messages, passages, variant, settings):
        """Stream from an OpenAI-compatible server (vLLM, llama.cpp's server, ...)."""
        import json

        import httpx

        body = {"model": self.remote_model or variant, "messages": messages, "stream": True,
                "temperature": settings.temperature, "top_p": settings.top_p,
                "max_tokens": settings.max_new_tokens}
        text = ""
        try:
            with httpx.stream("POST", f"{self.remote_url}/v1/chat/completions", json=body, timeout=120) as response:
                response.raise_for_status()
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    delta = json.loads(line[6:])["choices"][0].get("delta", {}).get("content") or ""
                    if delta:
                        text += delta
                        yield Reply(text, passages, variant)
        except httpx.HTTPError as err:
            raise UserError(f"the remote server {self.remote_url} failed: {err}") from None
        yield Reply(text, passages, variant, 0, len(text.split()))

    def refusal_threshold(self, variant: str) -> float | None:
        """The answer-or-refuse threshold chosen on the variant's dev-split curve."""
        from pipeline.answerability import served_threshold

        if self.remote_url:
            return None
        if variant not in self._thresholds:
            self._thresholds[variant] = served_threshold(self.artifacts, variant)
        return self._thresholds[variant]

    def selector(self, variant: str):
        """The variant's copy-decoding selector (pipeline/copying.py), or None."""
        from pipeline.copying import load_selector

        if self.remote_url or self.artifacts.meta(variant) is None:
            return None
        if variant not in self._selectors:
            self._selectors[variant] = load_selector(self.artifacts.dir(variant))
        return self._selectors[variant]

    def reader(self):
        """The copy selectors' reader, loaded once (the ``reader`` stage's cross-encoder)."""
        from pipeline.reader import Reader

        with self._load_lock:
            if self._reader is None:
                self._reader = Reader(self.artifacts.require("reader"))
        return self._reader

    def _copy(self, messages, passages, tokenizer, model, variant, selector):
        """One reply: the shown sentence the selector picks, with its [n], or the refusal."""
        from pipeline.generation import prompt_text

        text = model_calls.run(self._copied_text, messages, tokenizer, model, selector)
        yield Reply(text, passages, variant, token_count(tokenizer, prompt_text(tokenizer, messages)),
                    token_count(tokenizer, text))

    def _copied_text(self, messages, tokenizer, model, selector) -> str:
        import torch

        with torch.inference_mode():
            reader = self.reader() if selector.reads_reader else None
            return selector.answer(model, tokenizer, self.retriever.embedder, reader, messages)

    def _generate(self, messages, passages, tokenizer, variant, settings):
        """Free decoding, streamed and batched with concurrent requests (pipeline/batching.py):
        decide, then answer."""
        from pipeline.generation import prompt_text

        prompt_tokens = token_count(tokenizer, prompt_text(tokenizer, messages))
        pieces = self.batcher(variant).stream(messages, settings, self.refusal_threshold(variant))
        text = ""
        try:
            for text in pieces:
                yield Reply(text, passages, variant)
        finally:  # the caller stopped reading (a dropped stream): its row ends within a step
            pieces.close()
        yield Reply(text, passages, variant, prompt_tokens, token_count(tokenizer, text))

    def answer(self, question: str, **kwargs) -> Reply:
        reply = Reply("")
        for reply in self.stream(question, **kwargs):
            pass
        return reply
