"""``initializer``/``initargs``: run in each worker before its first call; a failure breaks the executor."""

from __future__ import annotations

import uuid
from concurrent.futures import BrokenExecutor

import pytest

from . import tasks
from ._base import TIMEOUT, ConformanceBase, ExecutorFactory
from .gate import Gate

__all__ = ["InitializerTests"]


class InitializerTests(ConformanceBase):
    def test_initializer_runs_in_each_worker_before_its_first_call(
        self, new_executor: ExecutorFactory, gate: Gate
    ) -> None:
        marker = f"initialized-{uuid.uuid4()}"  # unique, so state left by another test cannot pass this one
        executor = new_executor(max_workers=2, initializer=tasks.set_state, initargs=(marker,))
        # Two calls held at once run on two different workers.
        held = [executor.submit(tasks.gated_get_state, gate.address, f"held-{i}") for i in range(2)]
        gate.wait_started(2)
        gate.release()
        assert [f.result(timeout=TIMEOUT) for f in held] == [marker, marker]
        assert [f.result(timeout=TIMEOUT) for f in [executor.submit(tasks.get_state) for _ in range(6)]] == [marker] * 6

    def test_initializer_lambda_with_initargs(self, new_executor: ExecutorFactory) -> None:
        marker = f"lambda-{uuid.uuid4()}"
        executor = new_executor(max_workers=1, initializer=lambda a, b: tasks.set_state(a + b), initargs=(marker, "!"))
        assert executor.submit(tasks.get_state).result(timeout=TIMEOUT) == marker + "!"

    def test_failing_initializer_breaks_the_executor(self, new_executor: ExecutorFactory) -> None:
        executor = new_executor(max_workers=2, initializer=tasks.failing_initializer, initargs=("no setup",))
        pending = []
        for i in range(3):
            try:
                pending.append(executor.submit(tasks.square, i))
            except BrokenExecutor:  # the initializer failed already: submit says so, as ThreadPoolExecutor's does
                break
        for future in pending:
            assert isinstance(future.exception(timeout=TIMEOUT), BrokenExecutor)
        with pytest.raises(BrokenExecutor):
            executor.submit(tasks.square, 9)
