"""Free decoding for concurrent chat requests, batched: one decode step serves them all.

A decode step of a 135M model reads every weight once whether it extends one reply or eight,
so eight replies decoded together cost far less than eight decoded in turn (3.4x the decode
throughput of one client on 2 AVX2 cores: reports/bench-serving.md). Worker threads
(``workers``, two by default: DECODE_WORKERS) each own one
``pipeline.generation.DecodeBatch`` over the shared model. Requests wait in a bounded queue;
between two decode steps a worker admits waiting ones (up to ``max_batch / workers`` rows; an
idle worker before a busy one): it reads each one's prompt after the system turn (whose cache
is kept), and the row joins the replies already being written. A row leaves when it ends.
Each row keeps its own sampling settings, token cap, deadline and refusal decision
(continuous batching, as in Orca, OSDI 2022).
Greedy rows also guess their next tokens from their prompts (prompt lookup decoding,
``lookup_tokens``; DecodeBatch). Prompts are read, and decode steps run, with every thread on
the thread that serves model calls when one does (pipeline/model_calls.py: a worker thread's
own OpenMP pool would slow every region in the process); ``decode_threads`` 1 keeps each
worker's steps in the worker, with one thread.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

from pipeline import model_calls


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


def _inference(fn, *args):
    """``fn(*args)`` under torch.inference_mode (thread-local: the serving thread needs its own)."""
    import torch

    with torch.inference_mode():
        return fn(*args)


def _with_threads(count: int, fn):
    """``fn()`` with ``count`` intra-op threads (0: this thread's count)."""
    from pipeline.numeric import intra_op_threads

    with intra_op_threads(count):
        return fn()


class Batcher:
    """One model's free-decoding queue and the worker threads that drain it in batches.

    With ``workers`` > 1, each worker decodes its own batch of up to ``max_batch / workers``
    rows; a request goes to an idle worker before it joins a busy one. Prompts are read one at
    a time, with every thread, through ``pipeline.model_calls.run``; so are decode steps, unless
    ``decode_threads`` is 1 (each worker then steps in parallel with the others, one thread
    each)."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_waiting: int = 16, queue_timeout: float = 60.0,
                 lookup_tokens: int | None = None, decode_threads: int | None = None, workers: int | None = None,
                 prompt_threads: int | None = None):
        import torch

        from pipeline.generation import LOOKUP_TOKENS
        from pipeline.numeric import DECODE_THREADS, DECODE_WORKERS

        self.model, self.tokenizer = model, tokenizer
        # greedy requests guess their next tokens from their prompts (prompt lookup decoding)
        self.lookup_tokens = LOOKUP_TOKENS if lookup_tokens is None else lookup_tokens
        self.max_batch, self.max_waiting, self.queue_timeout = max_batch, max_waiting, queue_timeout
        # intra-op threads of a decode step (0: the count of the thread that runs it); prompts get every thread
        self.decode_threads = DECODE_THREADS if decode_threads is None else decode_threads
        # intra-op threads for reading prompts: the constructing thread's count unless given
        self.prompt_threads = prompt_threads or torch.get_num_threads()
        self._pending: list[_Request] = []
        self._ready = threading.Condition()
        self.workers = max(1, DECODE_WORKERS if workers is None else workers)
        self._row_cap = -(-max_batch // self.workers)  # rows per worker
        self._threads: list[threading.Thread] = []
        self._waiting_workers = 0  # workers waiting for a request
        self._prefill = threading.Lock()  # one worker reads prompts at a time
        self._closed = False
        self.idle = threading.Event()  # set while the worker waits for requests
        self.idle.set()
        self.batch_sizes: list[int] = []  # rows decoding after each admission, for tests and the bench
        self.min_new_tokens = 0  # the bench sets it to time fixed-length replies
        self.batches: list = [None] * self.workers  # each worker's DecodeBatch (its counters feed the bench)
        self.prefix = None  # the system turn's cache, made on the first request

    def stream(self, messages: list[dict], settings, refusal_threshold: float | None = None) -> Iterator[str]:
        """Yield the growing reply; closing the generator drops the request at the next step.
        With ``refusal_threshold`` the row decides first (``DecodeBatch.join``)."""
        request = _Request(messages, settings, refusal_threshold)
        with self._ready:
            if self._closed:
                raise ServerBusy("this model was just unloaded; retry")
            if len(self._pending) >= self.max_waiting:
                raise ServerBusy(f"{len(self._pending)} requests are already waiting; retry shortly")
            self._pending.append(request)
            self.idle.clear()
            if not self._threads:
                self._threads = [threading.Thread(target=self._work, args=(i,), name=f"batcher-{i}", daemon=True)
                                 for i in range(self.workers)]
                for thread in self._threads:
                    thread.start()
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

    def close(self, wait: float = 0.0) -> None:
        """Stop the worker once the waiting requests are answered (the model is being unloaded);
        wait up to ``wait`` seconds for it to finish (a process about to exit must: a worker
        still inside a torch call while the interpreter shuts down aborts the process)."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        deadline = time.monotonic() + wait
        for thread in self._threads if wait else []:
            thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def batch(self):
        """The first worker's DecodeBatch (the only one with ``workers`` = 1)."""
        return self.batches[0]

    def decode_counters(self) -> tuple[int, float, int]:
        """Decode steps, seconds in them and tokens they wrote, summed over the workers (seconds
        of workers decoding at once add up, so tokens / seconds understates parallel workers)."""
        batches = [b for b in self.batches if b is not None]
        return (sum(b.steps for b in batches), sum(b.step_seconds for b in batches),
                sum(b.step_tokens for b in batches))

    def _admit(self, free: int, busy: bool) -> list[_Request] | None:
        """Up to ``free`` waiting requests (waiting for one when nothing is ``busy``); None when
        closed with nothing left to do."""
        with self._ready:
            while not self._pending and not busy and not self._closed:
                self._waiting_workers += 1
                if self._waiting_workers == self.workers:
                    self.idle.set()
                self._ready.wait()
                self._waiting_workers -= 1
            if not self._pending and not busy:
                return None
            others_idle = self._idle_workers() - (0 if busy else 1)
            if busy and others_idle:  # an idle worker takes what waits
                return []
            self.idle.clear()
            now, kept = time.monotonic(), []
            for request in self._pending:  # too old, or gone before its turn
                if request.abandoned.is_set():
                    continue
                if now - request.arrived > self.queue_timeout:
                    request.out.put(ServerBusy(f"no decoding slot freed within {self.queue_timeout:.0f} s; "
                                               "retry shortly"))
                    continue
                kept.append(request)
            if others_idle:  # leave the other idle workers their share
                free = min(free, -(-len(kept) // (others_idle + 1)))
            self._pending = kept[free:]
            return kept[:free]

    def _idle_workers(self) -> int:
        """Live workers without rows (about to take requests, or waiting for them)."""
        return sum(1 for thread, batch in zip(self._threads, self.batches)
                   if thread.is_alive() and (batch is None or not batch.rows))

    def _row(self, request: _Request):
        from pipeline.generation import Row, prompt_text

        s = request.settings
        ids = self.tokenizer(prompt_text(self.tokenizer, request.messages), add_special_tokens=False)["input_ids"]
        return Row(ids, request.out.put, s.max_new_tokens, s.temperature, s.top_p, s.repetition_penalty,
                   request.refusal_threshold, self.min_new_tokens, request.arrived + s.deadline_seconds,
                   request.abandoned)

    def _work(self, index: int) -> None:
        import torch

        from pipeline.generation import DecodeBatch, PromptPrefix
        from pipeline.numeric import intra_op_threads, use_threads

        use_threads(self.prompt_threads)  # not whatever another worker's step left as the default
        with self._prefill:
            if self.prefix is None:
                self.prefix = model_calls.run(_inference, PromptPrefix.system_turn, self.model, self.tokenizer)
        self.batches[index] = batch = DecodeBatch(self.model, self.tokenizer, self.prefix, self.lookup_tokens)
        with torch.inference_mode():
            while (joining := self._admit(self._row_cap - len(batch.rows), bool(batch.rows))) is not None:
                if joining:
                    with self._prefill:
                        for request in joining:
                            try:
                                model_calls.run(_inference, batch.join, self._row(request))
                            except Exception as err:  # this request hears of it; the others go on
                                request.out.put(err)
                    self.batch_sizes.append(len(batch.rows))
                try:
                    if self.decode_threads == 1:  # starts no OpenMP region: stays in this worker
                        with intra_op_threads(1):
                            batch.step()
                    else:  # a multi-threaded call: on the thread serving them, if one does
                        model_calls.run(_inference, _with_threads, self.decode_threads, batch.step)
                except Exception as err:  # every row of the batch hears of it; the worker lives on
                    for row in batch.rows:
                        row.emit(err)
                    self.batches[index] = batch = DecodeBatch(self.model, self.tokenizer, self.prefix,
                                                              self.lookup_tokens)
