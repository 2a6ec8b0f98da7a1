"""Done-callbacks of the caller's run on the executor's callback threads, never on the thread that brings
results (the embedded job server's): however they race with the result, whatever they raise, however long
they take, on real worker processes."""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest

from remote_executor import RemoteExecutor


@pytest.fixture(scope="module")
def executor() -> Iterator[RemoteExecutor]:
    with RemoteExecutor(2) as ex:
        yield ex


def test_a_callback_added_as_the_result_arrives_never_runs_on_the_results_thread(executor: RemoteExecutor) -> None:
    """A callback added while the result was being set ran inside set_result, on the job server's thread
    (which a callback that waits for another call of the executor then deadlocked)."""
    futures = [executor.submit(abs, -i) for i in range(300)]
    where: set[str] = set()
    stop = threading.Event()

    def add_callbacks() -> None:  # as fast as it can, to the next future to get its result: racing it
        frontier = 0
        while not stop.is_set() and frontier < len(futures):
            if futures[frontier].done():
                frontier += 1
            else:
                futures[frontier].add_done_callback(lambda f: where.add(threading.current_thread().name))
    adders = [threading.Thread(target=add_callbacks, name="adder") for _ in range(2)]
    for adder in adders:
        adder.start()
    try:
        assert [f.result(timeout=60) for f in futures] == list(range(300))
    finally:
        stop.set()
        for adder in adders:
            adder.join(60)
    assert where <= {"remote_executor-callbacks", "adder"}, where


def test_a_callback_raising_systemexit_leaves_the_others_and_shutdown_alone(caplog: pytest.LogCaptureFixture) -> None:
    ran = threading.Event()
    with RemoteExecutor(1) as ex:
        ex.submit(os.getpid).add_done_callback(lambda f: exec("raise SystemExit('a callback exits')"))
        later = ex.submit(os.getpid)
        later.add_done_callback(lambda f: ran.set())
        later.result(timeout=60)
    assert ran.wait(30)  # and the with block's shutdown(wait=True) returned
    assert "exception calling callback" in caplog.text and "a callback exits" in caplog.text


def test_a_slow_callback_does_not_hold_up_another_futures_callbacks(executor: RemoteExecutor) -> None:
    """The first one waits until the second one has run: with one callback thread, never."""
    second_ran, first_done = threading.Event(), threading.Event()

    def slow(f: Future[Any]) -> None:
        if second_ran.wait(30):
            first_done.set()
    executor.submit(abs, -1).add_done_callback(slow)
    executor.submit(abs, -2).add_done_callback(lambda f: second_ran.set())
    assert first_done.wait(60)


def test_a_callback_thread_keeps_nothing_of_the_future_it_ran_while_it_waits_for_the_next(
        executor: RemoteExecutor) -> None:
    """A thread pool forgets a finished work item before it waits for the next one; our callback threads kept
    the last future they ran (with its result, and its callbacks' closures) for as long as they waited, up to
    the executor's shutdown: a large result stayed in memory for good."""
    ran = threading.Event()
    future = executor.submit(bytes, 1 << 20)
    future.add_done_callback(lambda f: ran.set())
    assert ran.wait(30)
    result = weakref.ref(future)
    del future
    deadline = time.monotonic() + 10
    while result() is not None and time.monotonic() < deadline:  # the thread returns to its wait at once
        gc.collect()
        time.sleep(0.01)
    assert result() is None, "the future outlived its callback: something still holds it"
