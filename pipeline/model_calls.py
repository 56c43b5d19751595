"""One thread runs the process's multi-threaded model calls.

PyTorch's CPU kernels run their parallel regions on OpenMP (libgomp). Every thread that starts
a region with two or more threads gets its own pool of OpenMP workers, kept while it lives. Once
the process holds more such threads than it has CPUs, libgomp spins only briefly before it puts
them to sleep, so every later region, in every thread, pays to wake them. On a 2-core EPYC one
int8 linear of a decode step took 26 us from the one thread that had used OpenMP, and 80 to 98 us
as soon as a second thread had too (exploration runs, sessions 13 and 14; docs/results.md).

A service answers each request in a thread of its own (and decodes in the batcher's worker
threads), so the cure is that one thread, the one that loaded the models, reads every prompt,
runs every decode step, scores every candidate and embeds every query. ``serve_while`` makes
the calling thread that thread for as long as a function (the web server) runs in another;
``run`` hands a call to it and waits for the result. With nobody serving (tests, scripts, the
pipeline's stages), ``run`` calls the function where it is. Decode steps asked to use one
intra-op thread start no region and stay in the batcher's workers (pipeline/batching.py).
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable, TypeVar

T = TypeVar("T")

_calls: queue.SimpleQueue = queue.SimpleQueue()
_lock = threading.Lock()  # guards _owner against a run() racing the end of serve_while()
_owner: threading.Thread | None = None


def serving_thread() -> threading.Thread | None:
    """The thread that runs model calls now, or None when each caller runs its own."""
    return _owner


def run(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on the serving thread, if one serves; here otherwise. Its
    exception is raised here."""
    with _lock:
        owner = _owner
        if owner is not None and owner is not threading.current_thread():
            future: Future = Future()
            _calls.put((future, fn, args, kwargs))
        else:
            future = None
    if future is None:
        return fn(*args, **kwargs)
    return future.result()


def _execute(item) -> None:
    future, fn, args, kwargs = item
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn(*args, **kwargs))
    except BaseException as err:  # the caller re-raises it
        future.set_exception(err)


def serve_while(work: Callable[[], T], poll: float = 0.2) -> T:
    """Run ``work`` in a new thread while this thread serves every ``run`` call; return its
    result (or raise its exception) once it ends. Calls handed over before it ended are
    still served."""
    global _owner
    with _lock:
        if _owner is not None:
            raise RuntimeError(f"thread {_owner.name} already serves model calls")
        _owner = threading.current_thread()
    done: Future = Future()

    def worker():
        try:
            done.set_result(work())
        except BaseException as err:
            done.set_exception(err)

    thread = threading.Thread(target=worker, name="served-work")  # the interpreter waits for it at exit
    try:
        thread.start()
        while not done.done():
            try:
                _execute(_calls.get(timeout=poll))
            except queue.Empty:
                pass
    finally:
        with _lock:
            _owner = None
        while True:  # calls queued before _owner was cleared
            try:
                _execute(_calls.get_nowait())
            except queue.Empty:
                break
    return done.result()
