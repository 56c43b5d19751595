"""One thread runs the multi-threaded model calls (pipeline/model_calls.py)."""
from __future__ import annotations

import threading

import pytest

from pipeline import model_calls


def test_without_a_serving_thread_a_call_runs_where_it_is_made():
    seen = []
    assert model_calls.run(lambda x: seen.append(threading.current_thread()) or x * 2, 21) == 42
    assert seen == [threading.current_thread()]
    assert model_calls.serving_thread() is None


def test_calls_from_other_threads_run_on_the_serving_thread_and_raise_there_errors_where_made():
    here = threading.current_thread()
    ran_on = []

    def call(x):
        ran_on.append(threading.current_thread())
        if x < 0:
            raise ValueError(f"negative: {x}")
        return x + 1

    def work():
        asked_from = threading.current_thread()
        results = [model_calls.run(call, 1)]
        with pytest.raises(ValueError, match="negative: -1"):
            model_calls.run(call, -1)
        # from a third thread too, and from two at once
        extra = []
        threads = [threading.Thread(target=lambda n=n: extra.append(model_calls.run(call, n))) for n in (10, 20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        return asked_from, results + sorted(extra)

    asked_from, results = model_calls.serve_while(work)
    assert asked_from is not here
    assert results == [2, 11, 21]
    assert ran_on == [here] * 4, "every call ran on the serving thread"
    assert model_calls.serving_thread() is None, "serving ends with the work"


def test_the_works_error_is_raised_and_serving_stops():
    def work():
        raise RuntimeError("server failed")

    with pytest.raises(RuntimeError, match="server failed"):
        model_calls.serve_while(work)
    assert model_calls.serving_thread() is None


def test_one_thread_serves_at_a_time():
    def work():
        with pytest.raises(RuntimeError, match="already serves"):
            model_calls.serve_while(lambda: None)
        return "done"

    assert model_calls.serve_while(work) == "done"


def test_the_serving_thread_runs_its_own_calls_directly():
    """A call made on the serving thread (a model call that makes another) cannot wait for itself."""
    def outer():
        return model_calls.run(lambda: threading.current_thread())

    here = threading.current_thread()
    assert model_calls.serve_while(lambda: model_calls.run(outer)) is here
