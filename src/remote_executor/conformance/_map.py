"""``Executor.map``: order, deadline, errors in place, early close, ``chunksize`` and ``buffersize``."""

from __future__ import annotations

import functools
import gc
import inspect
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from concurrent.futures import Executor
from typing import Any

import pytest

from . import tasks
from ._base import TIMEOUT, ConformanceBase, ExecutorFactory
from .gate import Gate

__all__ = ["MapTests"]


def _map(executor: Executor, *args: Any, **kwargs: Any) -> Iterator[Any]:
    # ``buffersize`` is newer than the stdlib stubs of Python < 3.14: call through Any.
    method: Any = executor.map
    return method(*args, **kwargs)  # type: ignore[no-any-return]


class MapTests(ConformanceBase):
    def test_map_yields_results_in_input_order(self, executor: Executor, gate: Gate) -> None:
        results = executor.map(functools.partial(tasks.wait_at_gate, gate.address), ["slow", "fast"], [1, 2])
        gate.release("fast")
        gate.wait_started(2)
        gate.release("slow")
        assert list(results) == [1, 2]
        assert list(executor.map(tasks.square, range(20))) == [i * i for i in range(20)]

    def test_map_zips_iterables_to_the_shortest(self, executor: Executor) -> None:
        assert list(executor.map(tasks.add, [1, 2, 3], (10, 20))) == [11, 22]
        assert list(executor.map(tasks.square, [])) == []

    def test_map_lambda(self, executor: Executor) -> None:
        offset = 100
        assert list(executor.map(lambda x: x + offset, range(5))) == [100, 101, 102, 103, 104]

    def test_map_raises_when_the_failing_element_is_reached(self, executor: Executor) -> None:
        results = executor.map(tasks.raise_if_negative, [1, 2, -3, 4])
        assert next(results) == 1
        assert next(results) == 2
        with pytest.raises(ValueError, match=r"^-3$") as caught:
            next(results)
        assert caught.value.args == (-3,)

    def test_map_timeout_counts_from_the_call(self, executor: Executor, gate: Gate) -> None:
        started = time.monotonic()
        results = executor.map(functools.partial(tasks.wait_at_gate, gate.address), ["held"], timeout=1.0)
        gate.wait_started(1)
        time.sleep(max(0.0, started + 1.0 - time.monotonic()))  # let the whole timeout pass, not synchronise
        before_next = time.monotonic()
        with pytest.raises(futures.TimeoutError):
            next(results)
        assert time.monotonic() - before_next < 0.5, "map's timeout restarted at next() instead of the call"

    def test_map_timeout_after_earlier_results(self, executor: Executor, gate: Gate) -> None:
        # Both workers hold a call at once, so each has run one (imports done) before the 2 s clock starts:
        # "quick" may land on either, and a cold one can take longer than that on a loaded machine.
        warm = [executor.submit(tasks.wait_at_gate, gate.address, f"warm-{i}", i) for i in range(2)]
        gate.wait_started(2)
        gate.release("warm-0")
        gate.release("warm-1")
        assert [f.result(timeout=TIMEOUT) for f in warm] == [0, 1]
        gate.release("quick")
        results = executor.map(
            functools.partial(tasks.wait_at_gate, gate.address), ["quick", "held"], ["q", "h"], timeout=2.0
        )
        assert next(results) == "q"
        with pytest.raises(futures.TimeoutError):
            next(results)

    @pytest.mark.parametrize("how", ["closed", "dropped"])
    def test_map_closed_or_dropped_once_iterated_cancels_calls_not_yet_started(
            self, new_executor: ExecutorFactory, gate: Gate, how: str) -> None:
        executor = new_executor(max_workers=2)
        gate.release("quick")
        ahead = [f"ahead-{i}" for i in range(2 * self.prefetch)]  # handed out ahead: they run too
        tokens = ["quick", "held-1", "held-2", *ahead, "rest-3", "rest-4", "rest-5"]
        results = executor.map(functools.partial(tasks.wait_at_gate, gate.address), tokens, tokens)
        assert next(results) == "quick"
        gate.wait_started(3)  # both workers now hold a call; the rest waits
        if how == "closed":
            results.close()  # type: ignore[attr-defined]
        del results  # (dropped: as a generator's would, its finalization cancels the rest)
        gc.collect()
        gate.release()
        executor.shutdown(wait=True)
        assert sorted(gate.started) == sorted(["held-1", "held-2", "quick", *ahead])

    def test_map_returns_a_generator(self, executor: Executor) -> None:
        """A generator, as ThreadPoolExecutor's: ``close()``, ``send()``, ``throw()`` and what they mean."""
        results: Any = executor.map(tasks.square, range(4))
        is_generator = inspect.isgenerator(results)  # (a separate name: mypy would narrow ``results`` to Never)
        assert is_generator
        assert results.send(None) == 0
        assert results.send("ignored") == 1
        with pytest.raises(KeyError, match="stop here"):
            results.throw(KeyError("stop here"))  # raised where it stands: the map is over
        with pytest.raises(StopIteration):
            next(results)
        unstarted: Any = executor.map(tasks.square, range(3))
        with pytest.raises(TypeError):
            unstarted.send("not None")  # (a generator that has not started takes only None)
        assert list(unstarted) == [0, 1, 4]

    def test_map_closed_before_its_first_result_is_over(self, executor: Executor) -> None:
        results = executor.map(tasks.square, range(3))
        results.close()  # type: ignore[attr-defined]
        with pytest.raises(StopIteration):
            next(results)
        assert list(results) == []

    def test_map_closed_from_another_thread_while_it_waits(self, executor: Executor, gate: Gate) -> None:
        """Closing the iterator while another thread waits in it is refused, as for any running generator;
        the waiting thread gets every result."""
        results = executor.map(functools.partial(tasks.wait_at_gate, gate.address), ["held", "next"], [1, 2])
        got: list[Any] = []
        reader = threading.Thread(target=lambda: got.extend(results))
        reader.start()
        try:
            gate.wait_started(1)
            deadline = time.monotonic() + TIMEOUT
            refused = None
            while refused is None:  # the reader is inside the generator once closing it is refused
                try:
                    results.close()  # type: ignore[attr-defined]
                except ValueError as exc:
                    refused = str(exc)
                    continue
                assert time.monotonic() < deadline, "the reader never entered the map's iterator"
                time.sleep(0.01)
            assert "already executing" in refused
        finally:
            gate.release()
            reader.join(TIMEOUT)
        assert not reader.is_alive() and got == [1, 2]

    @pytest.mark.parametrize("how", ["dropped", "closed"])
    def test_map_never_iterated_runs_every_call(self, new_executor: ExecutorFactory, gate: Gate, how: str) -> None:
        """``executor.map(side_effect, items)`` with its iterator unused, or closed before its first result:
        every call runs, as from a loop of ``submit`` (a generator never started has nothing to clean up)."""
        executor = new_executor(max_workers=2)
        tokens = [f"call-{i}" for i in range(8)]
        results = executor.map(functools.partial(tasks.wait_at_gate, gate.address), tokens, tokens)
        if how == "closed":
            results.close()  # type: ignore[attr-defined]
        del results
        gc.collect()
        gate.release()
        executor.shutdown(wait=True)
        assert sorted(gate.started) == sorted(tokens)

    @pytest.mark.parametrize("chunksize", [1, 2, 7, 100])
    def test_map_chunksize_gives_the_same_results(self, executor: Executor, chunksize: int) -> None:
        expected = [i * i for i in range(25)]
        assert list(executor.map(tasks.square, range(25), chunksize=chunksize)) == expected
        assert list(executor.map(tasks.add, range(5), range(10, 13), chunksize=chunksize)) == [10, 12, 14]
        results = executor.map(tasks.raise_if_negative, [1, 2, -3, 4, 5], chunksize=chunksize)
        assert next(results) == 1
        assert next(results) == 2
        with pytest.raises(ValueError, match=r"^-3$"):
            next(results)

    @pytest.mark.parametrize("chunksize", [0, -1])
    def test_map_chunksize_below_one(self, executor: Executor, chunksize: int) -> None:
        if self.remote:
            with pytest.raises(ValueError):  # noqa: PT011 - the message is the candidate's own
                executor.map(tasks.square, [1, 2], chunksize=chunksize)
        else:  # ThreadPoolExecutor ignores chunksize (documented difference: see docs/conformance.md)
            assert list(executor.map(tasks.square, [1, 2], chunksize=chunksize)) == [1, 4]

    def test_map_buffersize_bounds_how_far_input_is_consumed(self, executor: Executor) -> None:
        pulled: list[int] = []

        def source() -> Iterator[int]:
            for i in range(10):
                pulled.append(i)
                yield i

        results = _map(executor, tasks.square, source(), buffersize=2)
        assert 1 <= len(pulled) <= 2
        assert next(results) == 0
        assert len(pulled) <= 3
        assert list(results) == [i * i for i in range(1, 10)]
        assert pulled == list(range(10))

    def test_map_buffersize_with_chunksize_and_timeout(self, executor: Executor) -> None:
        results = _map(executor, tasks.add, range(30), range(30), buffersize=4, chunksize=3, timeout=TIMEOUT)
        assert list(results) == [2 * i for i in range(30)]

    def test_map_buffersize_close_cancels_the_rest(self, new_executor: ExecutorFactory, gate: Gate) -> None:
        executor = new_executor(max_workers=2)
        gate.release("quick")
        ahead = [f"ahead-{i}" for i in range(2 * self.prefetch)]  # handed out ahead: they run too
        tokens = ["quick", "held-1", "held-2", *ahead, "rest-3", "rest-4"]
        results = _map(executor, functools.partial(tasks.wait_at_gate, gate.address), tokens,
                       buffersize=4 + len(ahead))
        assert next(results) is None
        gate.wait_started(3)
        results.close()  # type: ignore[attr-defined]
        gate.release()
        executor.shutdown(wait=True)
        assert sorted(gate.started) == sorted(["held-1", "held-2", "quick", *ahead])

    @pytest.mark.parametrize(
        ("buffersize", "error"), [(0, ValueError), (-1, ValueError), (1.5, TypeError), ("2", TypeError)]
    )
    def test_map_buffersize_invalid(self, executor: Executor, buffersize: object, error: type[Exception]) -> None:
        with pytest.raises(error):
            _map(executor, tasks.square, [1, 2], buffersize=buffersize)
