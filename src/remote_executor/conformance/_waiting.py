"""``concurrent.futures.wait`` and ``as_completed`` over the candidate's futures."""

from __future__ import annotations

from concurrent import futures
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, Executor

import pytest

from . import tasks
from ._base import TIMEOUT, ConformanceBase
from .gate import Gate

__all__ = ["WaitTests"]


class WaitTests(ConformanceBase):
    def test_wait_all_completed(self, executor: Executor) -> None:
        fs = [executor.submit(tasks.square, i) for i in range(5)]
        done, not_done = futures.wait(fs, timeout=TIMEOUT, return_when=ALL_COMPLETED)
        assert done == set(fs)
        assert not not_done
        assert [f.result() for f in fs] == [0, 1, 4, 9, 16]

    def test_wait_first_completed(self, executor: Executor, gate: Gate) -> None:
        held = executor.submit(tasks.wait_at_gate, gate.address, "held")
        quick = executor.submit(tasks.square, 2)
        done, not_done = futures.wait([held, quick], timeout=TIMEOUT, return_when=FIRST_COMPLETED)
        assert done == {quick}
        assert not_done == {held}

    def test_wait_first_exception(self, executor: Executor, gate: Gate) -> None:
        held = executor.submit(tasks.wait_at_gate, gate.address, "held")
        failing = executor.submit(tasks.raise_value_error, "boom")
        done, not_done = futures.wait([held, failing], timeout=TIMEOUT, return_when=FIRST_EXCEPTION)
        assert failing in done
        assert not_done == {held}

    def test_wait_first_exception_without_exception_waits_for_all(self, executor: Executor) -> None:
        fs = [executor.submit(tasks.square, i) for i in range(4)]
        done, not_done = futures.wait(fs, timeout=TIMEOUT, return_when=FIRST_EXCEPTION)
        assert done == set(fs)
        assert not not_done

    @pytest.mark.parametrize("return_when", [ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION])
    def test_wait_timeout_expires(self, executor: Executor, gate: Gate, return_when: str) -> None:
        held = executor.submit(tasks.wait_at_gate, gate.address, "held")
        quick = executor.submit(tasks.square, 2)
        assert quick.result(timeout=TIMEOUT) == 4
        gate.wait_started(1)
        done, not_done = futures.wait([held, quick], timeout=0.1, return_when=return_when)
        assert done == {quick}
        assert not_done == {held}
        done, not_done = futures.wait([held], timeout=0.1, return_when=return_when)
        assert not done
        assert not_done == {held}

    def test_as_completed_yields_in_completion_order(self, executor: Executor, gate: Gate) -> None:
        held = executor.submit(tasks.wait_at_gate, gate.address, "held", "late")
        quick = executor.submit(tasks.square, 5)
        completed = futures.as_completed([held, quick], timeout=TIMEOUT)
        assert next(completed) is quick
        gate.release()
        assert next(completed) is held
        assert held.result() == "late"
        with pytest.raises(StopIteration):
            next(completed)

    def test_as_completed_timeout_expires(self, executor: Executor, gate: Gate) -> None:
        held = executor.submit(tasks.wait_at_gate, gate.address, "held")
        quick = executor.submit(tasks.square, 5)
        assert quick.result(timeout=TIMEOUT) == 25
        completed = futures.as_completed([held, quick], timeout=0.2)
        assert next(completed) is quick
        with pytest.raises(futures.TimeoutError):
            next(completed)
        assert not held.done()

    def test_as_completed_with_duplicate_futures(self, executor: Executor) -> None:
        first = executor.submit(tasks.square, 3)
        second = executor.submit(tasks.square, 4)
        yielded = list(futures.as_completed([first, first, second, second, first], timeout=TIMEOUT))
        assert len(yielded) == 2
        assert set(yielded) == {first, second}
