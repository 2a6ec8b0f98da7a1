"""Exceptions raised by calls, and what cannot be pickled (the documented remote differences)."""

from __future__ import annotations

import threading
import traceback
from concurrent.futures import Executor

import pytest

from . import tasks
from ._base import TIMEOUT, ConformanceBase

__all__ = ["ExceptionTests"]


class ExceptionTests(ConformanceBase):
    def test_exception_keeps_type_and_args(self, executor: Executor) -> None:
        error = executor.submit(tasks.raise_value_error, "bad", 42).exception(timeout=TIMEOUT)
        assert type(error) is ValueError
        assert error.args == ("bad", 42)

        error = executor.submit(tasks.raise_custom, 7, "custom").exception(timeout=TIMEOUT)
        assert type(error) is tasks.CustomError
        assert error.args == (7, "custom")
        assert (error.code, error.message) == (7, "custom")

        empty: dict[str, int] = {}
        error = executor.submit(lambda: empty["missing"]).exception(timeout=TIMEOUT)
        assert type(error) is KeyError
        assert error.args == ("missing",)

    def test_exception_is_caught_by_its_type(self, executor: Executor) -> None:
        future = executor.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            future.result(timeout=TIMEOUT)

    def test_exception_carries_the_traceback_of_the_call(self, executor: Executor) -> None:
        error = executor.submit(tasks.raise_value_error, "traced").exception(timeout=TIMEOUT)
        assert isinstance(error, ValueError)
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        assert "raise_value_error" in text
        if self.remote:
            assert error.__cause__ is not None, "the remote traceback must ride along as __cause__"
            assert "raise_value_error" in str(error.__cause__)

    def test_unpicklable_exception(self, executor: Executor) -> None:
        error = executor.submit(tasks.raise_unpicklable, "no wire for me").exception(timeout=TIMEOUT)
        if self.remote:
            assert isinstance(error, self.remote_error)
            assert "UnpicklableError" in str(error)
            assert "no wire for me" in str(error)
            assert "UnpicklableError" in getattr(error, "type_name", str(error))
        else:
            assert type(error) is tasks.UnpicklableError
            assert error.args == ("no wire for me",)
        assert executor.submit(tasks.square, 3).result(timeout=TIMEOUT) == 9

    def test_unpicklable_argument_fails_only_that_future(self, executor: Executor) -> None:
        lock = threading.Lock()
        before = executor.submit(tasks.square, 2)
        positional = executor.submit(tasks.identity, lock)
        keyword = executor.submit(tasks.echo, 1, data=lock)
        after = executor.submit(tasks.square, 3)
        if self.remote:
            error = positional.exception(timeout=TIMEOUT)
            assert isinstance(error, self.serialization_error)
            assert "argument 0" in str(error)
            assert "lock" in str(error).lower()
            error = keyword.exception(timeout=TIMEOUT)
            assert isinstance(error, self.serialization_error)
            assert "'data'" in str(error)
        else:
            assert positional.result(timeout=TIMEOUT) is lock
            assert keyword.result(timeout=TIMEOUT) == ((1,), {"data": lock})
        assert before.result(timeout=TIMEOUT) == 4
        assert after.result(timeout=TIMEOUT) == 9

    def test_unpicklable_result_fails_only_that_future(self, executor: Executor) -> None:
        before = executor.submit(tasks.square, 2)
        unpicklable = executor.submit(tasks.make_lock)
        after = executor.submit(tasks.square, 3)
        if self.remote:
            error = unpicklable.exception(timeout=TIMEOUT)
            assert isinstance(error, self.serialization_error)
            assert "result" in str(error)
            assert "make_lock" in str(error)
        else:
            assert isinstance(unpicklable.result(timeout=TIMEOUT), type(threading.Lock()))
        assert before.result(timeout=TIMEOUT) == 4
        assert after.result(timeout=TIMEOUT) == 9

    def test_mutating_an_argument(self, executor: Executor) -> None:
        items = [1]
        returned = executor.submit(tasks.append_and_return, items, 2).result(timeout=TIMEOUT)
        assert returned == [1, 2]
        if self.remote:  # documented difference: the call mutated a copy
            assert items == [1]
            assert returned is not items
        else:
            assert items == [1, 2]
            assert returned is items

    def test_identity_of_returned_objects(self, executor: Executor) -> None:
        payload = {"key": [1, 2, 3]}
        returned = executor.submit(tasks.identity, payload).result(timeout=TIMEOUT)
        assert returned == payload
        assert (returned is payload) is (not self.remote)  # documented difference: a remote result is a copy
