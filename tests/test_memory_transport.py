"""The memory transport against the ClientTransport contract, driven by a recording listener."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import pytest

from remote_executor import InitializerFailed
from remote_executor.cluster import make_transport
from remote_executor.errors import BrokenRemoteExecutor
from remote_executor.transports.base import Call, Options, Session, Status
from remote_executor.transports.memory import DEFAULT_WORKERS, MemoryTransport
from remote_executor.wire import serialization as s

INIT_THREADS: list[int] = []


class Recorder:
    """A Listener that queues everything it is told."""

    def __init__(self) -> None:
        self.results: queue.Queue[tuple[int, Status, s.Parts]] = queue.Queue()
        self.capacity: list[int] = []
        self.broken: queue.Queue[BrokenRemoteExecutor] = queue.Queue()

    def on_result(self, task_id: int, status: Status, parts: s.Parts) -> None:
        self.results.put((task_id, status, parts))

    def on_capacity(self, slots: int) -> None:
        self.capacity.append(slots)

    def on_broken(self, error: BrokenRemoteExecutor) -> None:
        self.broken.put(error)


def record_init() -> None:
    INIT_THREADS.append(threading.get_ident())


def thread_ident() -> int:
    return threading.get_ident()


def failing_init(text: str) -> None:
    raise KeyError(text)


def mutate(values: list[int]) -> list[int]:
    values.append(99)
    return values


def session(initializer: s.Parts | None = None) -> Session:
    return Session(executor_id=1, initializer=initializer, max_retries=0)


@pytest.fixture
def started() -> Iterator[tuple[MemoryTransport, Recorder]]:
    transport, listener = MemoryTransport(3), Recorder()
    transport.start(session(), listener)
    yield transport, listener
    transport.close()


def test_reports_capacity_on_start(started: tuple[MemoryTransport, Recorder]) -> None:
    _, listener = started
    assert listener.capacity == [3]


def test_runs_calls_and_reports_done(started: tuple[MemoryTransport, Recorder]) -> None:
    transport, listener = started
    transport.submit([Call(task_id, s.encode_call(pow, (2, task_id), {})) for task_id in range(1, 6)])
    results = {}
    for _ in range(5):
        task_id, status, parts = listener.results.get(timeout=10)
        assert status is Status.DONE
        results[task_id] = s.decode_outcome(parts)
    assert results == {n: (True, 2**n) for n in range(1, 6)}


def test_arguments_are_copies(started: tuple[MemoryTransport, Recorder]) -> None:
    transport, listener = started
    values = [1]
    transport.submit([Call(1, s.encode_call(mutate, (values,), {}))])
    _, _, parts = listener.results.get(timeout=10)
    assert s.decode_outcome(parts) == (True, [1, 99])
    assert values == [1]  # the worker mutated its own copy, as a remote worker would


def test_initializer_runs_once_per_worker_before_its_first_call() -> None:
    INIT_THREADS.clear()
    transport, listener = MemoryTransport(2), Recorder()
    transport.start(session(s.encode_initializer(record_init, ())), listener)
    try:
        transport.submit([Call(n, s.encode_call(thread_ident, (), {})) for n in range(20)])
        ran_on = {s.decode_outcome(listener.results.get(timeout=10)[2])[1] for _ in range(20)}
    finally:
        transport.close()
    assert len(INIT_THREADS) == len(set(INIT_THREADS)) <= 2
    assert ran_on <= set(INIT_THREADS)


def test_initializer_failure_reports_broken_with_remote_cause() -> None:
    transport, listener = MemoryTransport(1), Recorder()
    transport.start(session(s.encode_initializer(failing_init, ("boom",))), listener)
    try:
        transport.submit([Call(1, s.encode_call(pow, (2, 2), {}))])
        error = listener.broken.get(timeout=10)
    finally:
        transport.close()
    assert isinstance(error, InitializerFailed)
    assert str(error) == "A worker initializer failed, the executor is not usable anymore"
    assert isinstance(error.__cause__, KeyError)
    assert error.__cause__.args == ("boom",)
    assert "failing_init" in str(error.__cause__.__cause__)
    assert listener.results.empty()  # the call was not run


def test_close_joins_threads_and_is_idempotent() -> None:
    transport = MemoryTransport(2)
    transport.start(session(), Recorder())
    threads = list(transport._threads)
    transport.close()
    assert not any(t.is_alive() for t in threads)
    transport.close()
    transport.submit([Call(1, s.encode_call(pow, (2, 2), {}))])  # ignored, does not raise


def test_close_from_a_listener_callback_does_not_self_join() -> None:
    transport = MemoryTransport(1)
    closed = threading.Event()

    class Closing(Recorder):
        def on_result(self, task_id: int, status: Status, parts: s.Parts) -> None:
            transport.close()
            closed.set()

    transport.start(session(), Closing())
    transport.submit([Call(1, s.encode_call(pow, (2, 2), {}))])
    assert closed.wait(10)


@pytest.mark.parametrize(
    ("url", "max_workers", "workers"), [("memory", None, DEFAULT_WORKERS), ("memory://", 2, 2)]
)
def test_registry_creates_memory_transport(url: str, max_workers: int | None, workers: int) -> None:
    transport = make_transport(url, Options(max_workers=max_workers))
    assert isinstance(transport, MemoryTransport)
    assert transport.workers == workers
    assert transport.url == url
