"""Random sequences of executor operations, run on the oracle and a candidate side by side.

Each step applies one operation to ``ThreadPoolExecutor`` (the oracle, with Python 3.14's ``map``) and to
the candidate, and compares everything a caller can observe: return values, exception types and args,
done/cancelled states once the futures finished, and the ``RuntimeError`` after shutdown. Operations are
chosen so that no outcome depends on timing (only finished futures are cancelled; shutdown never cancels).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent import futures
from concurrent.futures import Executor, Future
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule, run_state_machine_as_test

from remote_executor.conformance import OracleExecutor, tasks

TIMEOUT = 30.0


def _remote(**kwargs: Any) -> Executor:
    from remote_executor import RemoteExecutor

    return RemoteExecutor(max_workers=2, **kwargs)


CANDIDATES: dict[str, Callable[[], Executor]] = {
    "memory": lambda: _remote(transport="memory"),
    "tcp": lambda: _remote(transport="tcp"),
}

Observation = tuple[Any, ...]


def _raised(exc: BaseException) -> Observation:
    return ("raise", type(exc), exc.args)


def _outcome(future: Future[Any]) -> Observation:
    """What a caller sees of a finished future."""
    if future.cancelled():
        return ("cancelled",)
    error = future.exception(timeout=TIMEOUT)
    return ("ok", future.result()) if error is None else _raised(error)


def _consume(results: Iterable[Any]) -> Observation:
    """Values of a map until its end or its first error, and that error."""
    values: list[Any] = []
    try:
        for value in results:
            values.append(value)
    except Exception as exc:
        return ("values", values, *_raised(exc))
    return ("values", values)


class ExecutorPair(RuleBasedStateMachine):
    """The oracle and a candidate, driven by the same operations."""

    make_candidate: Callable[[], Executor]

    def __init__(self) -> None:
        super().__init__()
        self.executors: tuple[Executor, Executor] = (OracleExecutor(max_workers=2), self.make_candidate())
        self.futures: list[tuple[Future[Any], Future[Any]]] = []

    def teardown(self) -> None:
        for executor in self.executors:
            executor.shutdown(wait=True, cancel_futures=True)

    def _both(self, operation: Callable[[Executor], Any]) -> tuple[Any, Any] | None:
        """Apply ``operation`` to both: both results, or ``None`` if both raised alike (else fail)."""
        outcomes: list[Observation] = []
        for executor in self.executors:
            try:
                outcomes.append(("returned", operation(executor)))
            except Exception as exc:
                outcomes.append(_raised(exc))
        oracle, candidate = outcomes
        if oracle[0] == "raise" or candidate[0] == "raise":
            assert candidate == oracle
            return None
        return oracle[1], candidate[1]

    def _submit(self, fn: Callable[..., Any], *args: Any) -> None:
        pair = self._both(lambda executor: executor.submit(fn, *args))
        if pair is not None:
            self.futures.append(pair)

    def _pick(self, index: int) -> tuple[Future[Any], Future[Any]]:
        return self.futures[index % len(self.futures)]

    @rule(x=st.integers(-1000, 1000))
    def submit_value(self, x: int) -> None:
        self._submit(tasks.square, x)

    @rule(x=st.integers(-1000, 1000), custom=st.booleans())
    def submit_raising(self, x: int, custom: bool) -> None:
        if custom:
            self._submit(tasks.raise_custom, x, f"error {x}")
        else:
            self._submit(tasks.raise_value_error, x, "value error")

    @rule(
        xs=st.lists(st.integers(-3, 20), max_size=6),
        chunksize=st.integers(1, 4),
        buffersize=st.none() | st.integers(1, 3),
    )
    def map_list(self, xs: list[int], chunksize: int, buffersize: int | None) -> None:
        def run(executor: Executor) -> Observation:
            method: Any = executor.map
            results = method(tasks.raise_if_negative, xs, chunksize=chunksize, buffersize=buffersize)
            return _consume(results)

        pair = self._both(run)
        if pair is not None:
            assert pair[1] == pair[0]

    @precondition(lambda self: self.futures)
    @rule(index=st.integers(min_value=0))
    def result(self, index: int) -> None:
        oracle, candidate = self._pick(index)
        assert _outcome(candidate) == _outcome(oracle)

    @precondition(lambda self: self.futures)
    @rule(index=st.integers(min_value=0))
    def cancel_finished(self, index: int) -> None:
        pair = self._pick(index)
        futures.wait(pair, timeout=TIMEOUT)
        oracle, candidate = pair
        assert candidate.cancel() == oracle.cancel()
        assert (candidate.cancelled(), candidate.done()) == (oracle.cancelled(), oracle.done())
        assert _outcome(candidate) == _outcome(oracle)

    @rule()
    def wait_all(self) -> None:
        for side in range(2):
            done, not_done = futures.wait([pair[side] for pair in self.futures], timeout=TIMEOUT)
            assert not not_done
            assert len(done) == len({id(pair[side]) for pair in self.futures})
        assert [_outcome(c) for _, c in self.futures] == [_outcome(o) for o, _ in self.futures]

    @rule()
    def as_completed_all(self) -> None:
        seen = []
        for side in range(2):
            completed = futures.as_completed([pair[side] for pair in self.futures], timeout=TIMEOUT)
            seen.append(sorted(repr(_outcome(f)) for f in completed))
        assert seen[1] == seen[0]

    @rule(wait=st.booleans())
    def shutdown(self, wait: bool) -> None:
        self._both(lambda executor: executor.shutdown(wait=wait))
        assert self._both(lambda executor: executor.submit(tasks.square, 2)) is None  # the same RuntimeError


@pytest.mark.parametrize("candidate", list(CANDIDATES))
def test_candidate_matches_the_oracle(candidate: str) -> None:
    machine = type(
        f"ExecutorPair_{candidate}", (ExecutorPair,), {"make_candidate": staticmethod(CANDIDATES[candidate])}
    )
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=25,
            stateful_step_count=12,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
