"""The oracle: ``ThreadPoolExecutor``, with the ``map`` of Python 3.14 on older versions.

The contract promises ``map(..., buffersize=)`` "as in Python 3.14, on every Python version", so the oracle
that the suite compares against must have it too. :class:`OracleExecutor` is ``ThreadPoolExecutor`` with
nothing changed but ``map``, which is CPython 3.14's ``Executor.map`` line for line. On 3.14 and later it
is ``ThreadPoolExecutor`` itself.
"""

from __future__ import annotations

import collections
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Any, TypeVar

__all__ = ["OracleExecutor"]

T = TypeVar("T")


def _result_or_cancel(fut: Future[T], timeout: float | None = None) -> T:
    try:
        try:
            return fut.result(timeout)
        finally:
            fut.cancel()
    finally:
        del fut  # break a reference cycle with the exception in fut._exception


class _BackportedMapExecutor(ThreadPoolExecutor):
    """``ThreadPoolExecutor`` whose ``map`` accepts ``buffersize`` (CPython 3.14 ``Executor.map``)."""

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        buffersize: int | None = None,
    ) -> Iterator[T]:
        if buffersize is not None and not isinstance(buffersize, int):
            raise TypeError("buffersize must be an integer or None")
        if buffersize is not None and buffersize < 1:
            raise ValueError("buffersize must be None or > 0")

        end_time = 0.0 if timeout is None else timeout + time.monotonic()
        zipped_iterables = zip(*iterables, strict=False)
        fs: collections.deque[Future[T]]
        if buffersize:
            fs = collections.deque(self.submit(fn, *args) for args in islice(zipped_iterables, buffersize))
        else:
            fs = collections.deque(self.submit(fn, *args) for args in zipped_iterables)
        # A weak reference lets the executor be collected independently of the iterator.
        executor_weakref = weakref.ref(self)

        def result_iterator() -> Iterator[T]:
            try:
                fs.reverse()  # reverse to keep finishing order
                while fs:
                    if buffersize and (executor := executor_weakref()) and (args := next(zipped_iterables, None)):
                        fs.appendleft(executor.submit(fn, *args))
                    # Careful not to keep a reference to the popped future
                    if timeout is None:
                        yield _result_or_cancel(fs.pop())
                    else:
                        yield _result_or_cancel(fs.pop(), end_time - time.monotonic())
            finally:
                for future in fs:
                    future.cancel()

        return result_iterator()


OracleExecutor: type[ThreadPoolExecutor] = ThreadPoolExecutor if sys.version_info >= (3, 14) else _BackportedMapExecutor
