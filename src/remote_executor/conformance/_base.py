"""What every behaviour mixin shares: the candidate's description, the gate and executor fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Executor, Future
from typing import Any, ClassVar, Protocol

import pytest

from ..errors import RemoteError, SerializationError
from . import tasks
from .gate import Gate

__all__ = ["TIMEOUT", "ConformanceBase", "ExecutorFactory"]

TIMEOUT = 30.0
"""The longest any single wait in a scenario may take before the scenario fails (never a hang)."""


class ExecutorFactory(Protocol):
    """``make_executor(max_workers=2, **kwargs)``; kwargs may hold ``initializer`` and ``initargs``."""

    def __call__(self, max_workers: int = 2, **kwargs: Any) -> Executor: ...


class ConformanceBase:
    """Describe the candidate in a subclass: a ``make_executor`` fixture and these class attributes."""

    remote: ClassVar[bool] = False
    """True when calls run in other processes: arguments and results are copies, and must pickle."""

    executor_setup: ClassVar[str] = ""
    """Python statements run before :attr:`executor_source` in a fresh interpreter (imports)."""

    executor_source: ClassVar[str | None] = None
    """A Python expression building the candidate with ``max_workers=2`` in a fresh interpreter."""

    serialization_error: ClassVar[type[BaseException]] = SerializationError
    """What a remote candidate fails a future with when an argument or result cannot be pickled."""

    remote_error: ClassVar[type[BaseException]] = RemoteError
    """What a remote candidate raises for an exception that cannot cross the wire."""

    prefetch: ClassVar[int] = 0
    """The declared difference of a candidate that hands out calls ahead (``RemoteExecutor(prefetch=N)``):
    per worker, this many calls beyond the one it runs are RUNNING, and no longer cancellable, while all
    workers are busy. Scenarios about pending calls first fill those places with calls of their own."""

    def fill_prefetch(self, executor: Executor, max_workers: int) -> list[Future[Any]]:
        """With every worker busy: submit the calls the candidate hands out ahead (none for an exact one),
        so the next call submitted is pending. They must be RUNNING at once; their results are 0, 1, 4..."""
        ahead = [executor.submit(tasks.square, i) for i in range(max_workers * self.prefetch)]
        assert all(f.running() for f in ahead), "a prefetched call is not RUNNING"
        return ahead

    @pytest.fixture
    def gate(self) -> Iterator[Gate]:
        with Gate() as gate:
            yield gate

    @pytest.fixture
    def new_executor(self, make_executor: ExecutorFactory, gate: Gate) -> Iterator[ExecutorFactory]:
        """``make_executor``, shutting down (wait, cancel pending) everything it made when the test ends."""
        created: list[Executor] = []

        def factory(max_workers: int = 2, **kwargs: Any) -> Executor:
            executor = make_executor(max_workers=max_workers, **kwargs)
            created.append(executor)
            return executor

        yield factory
        gate.release()  # held tasks must not keep shutdown(wait=True) waiting
        for executor in created:
            executor.shutdown(wait=True, cancel_futures=True)

    @pytest.fixture
    def executor(self, new_executor: ExecutorFactory) -> Executor:
        """A candidate with ``max_workers=2``."""
        return new_executor()
