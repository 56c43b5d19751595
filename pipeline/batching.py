"""Free decoding for concurrent chat requests, batched: one decode step serves them all.

On a CPU a decode step of a 135M model reads every weight once whether it extends one reply or
eight, so eight requests decoded together cost little more per step than one. A worker thread
owns the model. Requests wait in a bounded queue; whenever the worker is free it takes every
waiting request with the same sampling settings (up to ``max_batch``) and decodes them as one
left-padded batch (``pipeline.generation.stream_batch``), each row with its own token cap,
deadline and refusal decision. A request that arrives during a batch waits for the next one.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator


class ServerBusy(Exception):
    """More requests wait than the queue bound allows, or one waited past its deadline."""

    retry_after_seconds = 2


@dataclass
class _Request:
    messages: list
    settings: object  # service.engine.GenerationSettings (or any object with its fields)
    refusal_threshold: float | None = None
    arrived: float = field(default_factory=time.monotonic)
    out: queue.Queue = field(default_factory=queue.Queue)
    abandoned: threading.Event = field(default_factory=threading.Event)

    def sampling(self) -> tuple:
        s = self.settings
        return (s.temperature, s.top_p if s.temperature > 0 else None, s.repetition_penalty,
                self.refusal_threshold)


class Batcher:
    """One model's free-decoding queue and the worker thread that drains it in batches."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_waiting: int = 16, queue_timeout: float = 60.0):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_waiting, self.queue_timeout = max_batch, max_waiting, queue_timeout
        self._pending: list[_Request] = []
        self._ready = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False
        self.idle = threading.Event()  # set while the worker waits for requests
        self.idle.set()
        self.batch_sizes: list[int] = []  # what each batch held, for tests and the bench
        self.min_new_tokens = 0  # the bench sets it to time fixed-length replies

    def stream(self, messages: list[dict], settings, refusal_threshold: float | None = None) -> Iterator[str]:
        """Yield the growing reply; closing the generator drops the request at the next step.
        With ``refusal_threshold`` the row decides first (``stream_batch``)."""
        request = _Request(messages, settings, refusal_threshold)
        with self._ready:
            if self._closed:
                raise ServerBusy("this model was just unloaded; retry")
            if len(self._pending) >= self.max_waiting:
                raise ServerBusy(f"{len(self._pending)} requests are already waiting; retry shortly")
            self._pending.append(request)
            self.idle.clear()
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="batcher", daemon=True)
                self._worker.start()
            self._ready.notify()
        return self._replies(request)

    @staticmethod
    def _replies(request: _Request):
        try:
            while True:
                item = request.out.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    return
                yield item
        finally:
            request.abandoned.set()

    def close(self) -> None:
        """Stop the worker once the waiting requests are answered (the model is being unloaded)."""
        with self._ready:
            self._closed = True
            self._ready.notify()

    def _next_batch(self) -> list[_Request] | None:
        with self._ready:
            while not self._pending and not self._closed:
                self.idle.set()
                self._ready.wait()
            self.idle.clear()
            if not self._pending:
                return None
            now, kept = time.monotonic(), []
            for request in self._pending:  # too old, or gone before its turn
                if request.abandoned.is_set():
                    continue
                if now - request.arrived > self.queue_timeout:
                    request.out.put(ServerBusy(f"no decoding slot freed within {self.queue_timeout:.0f} s; "
                                               "retry shortly"))
                    continue
                kept.append(request)
            key = kept[0].sampling() if kept else None
            batch = [r for r in kept if r.sampling() == key][:self.max_batch]
            self._pending = [r for r in kept if r not in batch]
            return batch

    def _work(self) -> None:
        from pipeline.generation import stream_batch

        while (batch := self._next_batch()) is not None:
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            first = batch[0].settings
            try:
                for row, text in stream_batch(
                        self.model, self.tokenizer, [r.messages for r in batch],
                        max_new_tokens=[r.settings.max_new_tokens for r in batch],
                        temperature=first.temperature, top_p=first.top_p,
                        repetition_penalty=first.repetition_penalty,
                        refusal_threshold=batch[0].refusal_threshold,
                        deadline_seconds=[r.settings.deadline_seconds - (time.monotonic() - r.arrived)
                                          for r in batch],
                        abandoned=[r.abandoned for r in batch], min_new_tokens=self.min_new_tokens):
                    batch[row].out.put(text)
            except Exception as err:  # every request of the batch hears of it; the worker lives on
                for request in batch:
                    request.out.put(err)
