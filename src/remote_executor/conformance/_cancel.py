"""``Future.cancel``: it succeeds only while the call is pending, and a cancelled future is notified."""

from __future__ import annotations

import queue
from concurrent import futures
from concurrent.futures import Future

import pytest

from . import tasks
from ._base import TIMEOUT, ConformanceBase, ExecutorFactory
from .gate import Gate

__all__ = ["CancelTests"]


class CancelTests(ConformanceBase):
    def test_cancel_pending_future_succeeds(self, new_executor: ExecutorFactory, gate: Gate) -> None:
        executor = new_executor(max_workers=2)
        held = [executor.submit(tasks.wait_at_gate, gate.address, f"held-{i}", i) for i in range(2)]
        gate.wait_started(2)
        ahead = self.fill_prefetch(executor, 2)
        pending = executor.submit(tasks.wait_at_gate, gate.address, "pending", "never")
        notified: list[Future[object]] = []
        pending.add_done_callback(notified.append)

        assert pending.cancel() is True
        assert pending.cancelled()
        assert pending.done()
        assert not pending.running()
        assert notified == [pending]
        assert pending.cancel() is True  # cancelling again is harmless
        with pytest.raises(futures.CancelledError):
            pending.result(timeout=TIMEOUT)
        with pytest.raises(futures.CancelledError):
            pending.exception(timeout=TIMEOUT)

        gate.release()
        assert [f.result(timeout=TIMEOUT) for f in held] == [0, 1]
        assert [f.result(timeout=TIMEOUT) for f in ahead] == [i * i for i in range(len(ahead))]
        # Once the executor gets to it, a cancelled future is notified: wait() and as_completed() see it.
        done, _ = futures.wait([pending], timeout=TIMEOUT)
        assert done == {pending}
        assert list(futures.as_completed([pending], timeout=TIMEOUT)) == [pending]
        executor.shutdown(wait=True)
        assert sorted(gate.started) == ["held-0", "held-1"]  # the cancelled call never ran

    def test_cancel_running_future_fails(self, new_executor: ExecutorFactory, gate: Gate) -> None:
        executor = new_executor(max_workers=2)
        held = [executor.submit(tasks.wait_at_gate, gate.address, f"held-{i}", i) for i in range(2)]
        gate.wait_started(2)
        notified: queue.SimpleQueue[Future[object]] = queue.SimpleQueue()
        held[0].add_done_callback(notified.put)

        assert held[0].cancel() is False
        assert not held[0].cancelled()
        assert held[0].running()
        assert notified.empty()
        gate.release()
        assert held[0].result(timeout=TIMEOUT) == 0
        assert not held[0].cancelled()
        assert held[1].result(timeout=TIMEOUT) == 1
        assert notified.get(timeout=TIMEOUT) is held[0]

    def test_cancel_finished_future_fails(self, new_executor: ExecutorFactory) -> None:
        executor = new_executor()
        future = executor.submit(tasks.square, 4)
        assert future.result(timeout=TIMEOUT) == 16
        assert future.cancel() is False
        assert not future.cancelled()
        assert future.result() == 16
