"""``submit``: arguments, callables shipped by reference and by value, and the states of a future."""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Executor
from typing import Any

import pytest

from . import tasks
from ._base import TIMEOUT, ConformanceBase, ExecutorFactory
from .gate import Gate

__all__ = ["SubmitTests"]


class SubmitTests(ConformanceBase):
    def test_submit_returns_a_standard_future(self, executor: Executor) -> None:
        future = executor.submit(tasks.square, 7)
        assert isinstance(future, futures.Future)
        assert future.result(timeout=TIMEOUT) == 49

    def test_submit_passes_positional_and_keyword_arguments(self, executor: Executor) -> None:
        future = executor.submit(tasks.echo, 1, "two", [3], four=4, five={"5": 5})
        assert future.result(timeout=TIMEOUT) == ((1, "two", [3]), {"four": 4, "five": {"5": 5}})

    def test_submit_keywords_named_fn_and_self(self, executor: Executor) -> None:
        future = executor.submit(tasks.echo, fn="f", self="s")
        assert future.result(timeout=TIMEOUT) == ((), {"fn": "f", "self": "s"})
        assert executor.submit(tasks.takes_fn_and_self, fn=1, self=2).result(timeout=TIMEOUT) == (1, 2)

    @pytest.mark.parametrize("fn", [5, None, "text"], ids=["int", "None", "str"])
    def test_a_function_that_is_not_callable_fails_its_future_with_type_error(
            self, executor: Executor, fn: object) -> None:
        any_fn: Any = fn
        error = executor.submit(any_fn, 1).exception(timeout=TIMEOUT)
        assert type(error) is TypeError
        assert error.args == (f"'{type(fn).__name__}' object is not callable",)
        with pytest.raises(TypeError, match="object is not callable"):
            list(executor.map(any_fn, [1, 2], timeout=TIMEOUT))
        assert executor.submit(tasks.square, 3).result(timeout=TIMEOUT) == 9  # and the executor serves on

    def test_submit_lambda_and_closure(self, executor: Executor) -> None:
        factor = 6

        def times_factor(x: int) -> int:
            return x * factor

        add_one: Callable[..., int] = lambda x, y=1: x + y  # noqa: E731 - a lambda is the point
        assert executor.submit(add_one, 41).result(timeout=TIMEOUT) == 42
        assert executor.submit(times_factor, 7).result(timeout=TIMEOUT) == 42
        assert executor.submit(lambda: factor * 7).result(timeout=TIMEOUT) == 42

    def test_states_of_a_running_future(self, executor: Executor, gate: Gate) -> None:
        held = executor.submit(tasks.wait_at_gate, gate.address, "held", "value")
        gate.wait_started(1)
        assert held.running()
        assert not held.done()
        assert not held.cancelled()
        with pytest.raises(futures.TimeoutError):
            held.result(timeout=0.05)
        with pytest.raises(futures.TimeoutError):
            held.exception(timeout=0.05)
        gate.release()
        assert held.result(timeout=TIMEOUT) == "value"
        assert held.done()
        assert not held.running()
        assert not held.cancelled()
        assert held.exception() is None

    def test_states_of_a_pending_future(self, new_executor: ExecutorFactory, gate: Gate) -> None:
        executor = new_executor(max_workers=1)
        held = executor.submit(tasks.wait_at_gate, gate.address, "held")
        gate.wait_started(1)
        ahead = self.fill_prefetch(executor, 1)
        pending = executor.submit(tasks.square, 3)
        assert not pending.running()
        assert not pending.done()
        assert not pending.cancelled()
        gate.release()
        assert pending.result(timeout=TIMEOUT) == 9
        assert held.result(timeout=TIMEOUT) is None
        assert [f.result(timeout=TIMEOUT) for f in ahead] == [i * i for i in range(len(ahead))]

    def test_states_of_a_failed_future(self, executor: Executor) -> None:
        future = executor.submit(tasks.raise_value_error, "bad")
        error = future.exception(timeout=TIMEOUT)
        assert isinstance(error, ValueError)
        assert future.done()
        assert not future.running()
        assert not future.cancelled()
        with pytest.raises(ValueError, match=r"^bad$"):
            future.result()
