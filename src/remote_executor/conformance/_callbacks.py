"""Done-callbacks, including callbacks that submit more work to the same executor."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Executor, Future

from . import tasks
from ._base import TIMEOUT, ConformanceBase

__all__ = ["CallbackTests"]


class CallbackTests(ConformanceBase):
    def test_done_callback_gets_the_future(self, executor: Executor) -> None:
        notified: queue.SimpleQueue[Future[int]] = queue.SimpleQueue()
        future = executor.submit(tasks.square, 5)
        future.add_done_callback(notified.put)
        assert notified.get(timeout=TIMEOUT) is future
        assert future.result() == 25

    def test_done_callback_on_a_finished_future_runs_at_once(self, executor: Executor) -> None:
        future = executor.submit(tasks.square, 5)
        future.result(timeout=TIMEOUT)
        notified: list[Future[int]] = []
        future.add_done_callback(notified.append)
        assert notified == [future]

    def test_done_callback_that_raises_does_not_break_the_executor(self, executor: Executor) -> None:
        def broken(_: Future[int]) -> None:
            raise RuntimeError("callback bug")

        notified: queue.SimpleQueue[Future[int]] = queue.SimpleQueue()
        future = executor.submit(tasks.square, 5)
        future.add_done_callback(broken)
        future.add_done_callback(notified.put)
        assert notified.get(timeout=TIMEOUT) is future
        assert executor.submit(tasks.square, 6).result(timeout=TIMEOUT) == 36

    def test_done_callbacks_submit_more_work(self, executor: Executor) -> None:
        chain: queue.SimpleQueue[Future[int]] = queue.SimpleQueue()

        def next_link(future: Future[int]) -> None:
            chain.put(future)
            if future.result() < 2**16:
                executor.submit(tasks.square, future.result()).add_done_callback(next_link)

        executor.submit(tasks.square, 2).add_done_callback(next_link)
        values = [chain.get(timeout=TIMEOUT).result() for _ in range(4)]
        assert values == [4, 16, 256, 65536]

    def test_a_done_callback_may_wait_for_another_call(self, executor: Executor) -> None:
        """A callback runs on a thread that does not bring the results (a thread pool's worker thread), so
        it may submit a call and wait for its result."""
        got: queue.SimpleQueue[int] = queue.SimpleQueue()
        executor.submit(tasks.square, 2).add_done_callback(
            lambda _: got.put(executor.submit(tasks.square, 3).result(timeout=TIMEOUT)))
        assert got.get(timeout=TIMEOUT) == 9

    def test_a_blocked_done_callback_holds_up_no_other_result(self, executor: Executor) -> None:
        release = threading.Event()
        entered = threading.Event()

        def blocked(_: Future[int]) -> None:
            entered.set()
            release.wait(TIMEOUT)

        try:
            executor.submit(tasks.square, 2).add_done_callback(blocked)
            assert entered.wait(TIMEOUT)
            assert [f.result(timeout=TIMEOUT) for f in [executor.submit(tasks.square, i) for i in range(4)]] == [
                0, 1, 4, 9]
        finally:
            release.set()
