"""RemoteExecutor over the memory transport (real pickling, worker threads) and over a scripted transport.

Calls that must stay busy wait on threading.Event gates held in module globals: functions of this module
travel by reference, so the worker threads see the very same events.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import logging
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

import remote_executor
from remote_executor import (
    BrokenRemoteExecutor,
    InitializerFailed,
    RemoteError,
    RemoteExecutor,
    RemoteTraceback,
    SerializationError,
    TransportError,
    WorkerLostError,
)
from remote_executor import cluster as cluster_module
from remote_executor.security import user_key
from remote_executor.transports import UnknownSchemeError
from remote_executor.transports.base import (
    Call,
    ClientTransport,
    Listener,
    Options,
    Session,
    Status,
)
from remote_executor.transports.memory import MemoryTransport
from remote_executor.wire.messages import worker_lost_parts
from remote_executor.wire.serialization import run_task

GATE: dict[str, threading.Event] = {}
RAN: list[Any] = []
INIT_THREADS: list[int] = []


# --- remote functions ------------------------------------------------------------------------------


def blocked(value: Any = None) -> Any:
    """Signal that a worker is busy, then wait for the test to release it."""
    GATE["started"].set()
    assert GATE["release"].wait(60)
    RAN.append(value)
    return value


def blocked_unless_first(value: int) -> int:
    if value == 0:
        RAN.append(value)
        return value
    return int(blocked(value))


def record(value: Any) -> Any:
    RAN.append(value)
    return value


def echo(*args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return args, kwargs


def inverse(x: float) -> float:
    return 1 / x


class CustomError(Exception):
    pass


def raise_custom(code: int, text: str) -> None:
    raise CustomError(code, text)


class UnpicklableError(Exception):
    def __init__(self) -> None:
        super().__init__("stays remote")
        self.lock = threading.Lock()


def raise_unpicklable() -> None:
    raise UnpicklableError()


def returns_lock() -> threading.Lock:
    return threading.Lock()


def record_init(tag: str) -> None:
    assert tag == "tag"
    INIT_THREADS.append(threading.get_ident())


def thread_ident() -> int:
    return threading.get_ident()


def failing_init() -> None:
    raise OSError("no database here")


# --- fixtures and helpers --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def gates() -> None:
    GATE.clear()
    GATE.update(started=threading.Event(), release=threading.Event())
    RAN.clear()
    INIT_THREADS.clear()


@pytest.fixture
def make() -> Iterator[Callable[..., RemoteExecutor]]:
    """Make executors; at teardown release every gate and shut them all down (waiting)."""
    made: list[RemoteExecutor] = []

    def factory(max_workers: int | None = 2, transport: Any = "memory", **kwargs: Any) -> RemoteExecutor:
        ex = RemoteExecutor(max_workers, transport, **kwargs)
        made.append(ex)
        return ex

    yield factory
    GATE["release"].set()
    for ex in made:
        ex.shutdown(wait=True)


class CountingTransport(MemoryTransport):
    """The memory transport, recording every batch handed to it and its closing."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers)
        self.batches: list[int] = []
        self.closed = threading.Event()

    def submit(self, calls: Sequence[Call]) -> None:
        self.batches.append(len(calls))
        super().submit(calls)

    def close(self) -> None:
        super().close()
        self.closed.set()


class ScriptedTransport(ClientTransport):
    """Runs nothing by itself: the test decides the capacity and when each call finishes."""

    def __init__(self, capacity: int = 0) -> None:
        self.initial_capacity = capacity
        self.batches: list[list[Call]] = []
        self.closed = threading.Event()
        self.listener: Listener | None = None

    def start(self, session: Session, listener: Listener) -> None:
        self.session, self.listener = session, listener
        if self.initial_capacity:
            listener.on_capacity(self.initial_capacity)

    def submit(self, calls: Sequence[Call]) -> None:
        self.batches.append(list(calls))

    def close(self) -> None:
        self.closed.set()

    @property
    def calls(self) -> list[Call]:
        return [call for batch in self.batches for call in batch]

    @property
    def report(self) -> Listener:
        assert self.listener is not None
        return self.listener

    def finish(self, call: Call) -> None:
        self.report.on_result(call.task_id, Status.DONE, run_task(call.parts))


# --- construction ----------------------------------------------------------------------------------


def test_public_names() -> None:
    for name in remote_executor.__all__:
        assert hasattr(remote_executor, name)
    assert remote_executor.__version__ == "0.1.0"
    assert issubclass(RemoteExecutor, cf.Executor)


@pytest.mark.parametrize("max_workers", [0, -1])
def test_max_workers_must_be_positive(max_workers: int) -> None:
    with pytest.raises(ValueError, match=r"^max_workers must be greater than 0$"):
        RemoteExecutor(max_workers, "memory")


@pytest.mark.parametrize("max_workers", [2.0, "2"])
def test_max_workers_of_another_type_is_a_clear_type_error(max_workers: object) -> None:
    with pytest.raises(TypeError, match=rf"^max_workers must be an int or None, not {type(max_workers).__name__}$"):
        RemoteExecutor(max_workers, "memory")  # type: ignore[arg-type]


class Index:
    """An integer that is not an int (numpy's int64 is one): ``operator.index`` takes it, as the standard
    library does."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


def test_integers_that_are_not_ints_are_taken(make: Callable[..., RemoteExecutor]) -> None:
    ex = make(Index(2))
    assert list(ex.map(abs, [-1, -2, -3], chunksize=Index(2))) == [1, 2, 3]  # type: ignore[arg-type]


def test_a_tuple_as_the_function_fails_its_future_with_type_error(make: Callable[..., RemoteExecutor]) -> None:
    """A tuple is what a function shipped by value travels as: refused here with the TypeError calling it
    would raise, not taken for a malformed pickle on the worker."""
    ex = make()
    any_fn: Any = (1, 2)
    for future in (ex.submit(any_fn), ex._submit_chunk(any_fn, [()], None)):
        error = future.exception(timeout=30)
        assert type(error) is TypeError and error.args == ("'tuple' object is not callable",)


def test_thread_name_prefix_names_the_embedded_workers() -> None:
    """ThreadPoolExecutor's keyword works here too: the worker processes stand for its threads (any text,
    one that starts with a dash too)."""
    with RemoteExecutor(2, thread_name_prefix="-fetch") as ex:
        assert sorted(w.name.split("#")[0] for w in ex.status().workers) == ["-fetch-0", "-fetch-1"]
    with pytest.raises(TypeError, match="thread_name_prefix must be a str"):
        RemoteExecutor(1, "memory", thread_name_prefix=5)  # type: ignore[arg-type]


@pytest.mark.parametrize(("interval", "timeout"), [(2.0, 1.0), (1.0, 1.0)])
def test_a_heartbeat_timeout_not_longer_than_the_interval_is_refused(interval: float, timeout: float) -> None:
    with pytest.raises(ValueError, match=r"heartbeat_timeout \(.*s\) must be longer than heartbeat_interval"):
        RemoteExecutor(1, "memory", heartbeat_interval=interval, heartbeat_timeout=timeout)


def test_initializer_must_be_callable() -> None:
    with pytest.raises(TypeError, match=r"^initializer must be a callable$"):
        RemoteExecutor(1, "memory", initializer=42)  # type: ignore[arg-type]


def test_max_retries_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="max_retries"):
        RemoteExecutor(1, "memory", max_retries=-1)


@pytest.mark.parametrize(
    ("key", "env", "expected"),
    [
        ("sekrit", None, b"sekrit"),
        (b"raw", "env", b"raw"),
        (None, "from-env", b"from-env"),
        (None, None, "this user's key"),  # a URL with no key given anywhere: the per-user key
    ],
)
def test_options_and_key_resolution(
    monkeypatch: pytest.MonkeyPatch, key: str | bytes | None, env: str | None, expected: bytes | str
) -> None:
    seen: list[Options] = []

    def create(spec: Any, options: Options) -> ClientTransport:
        seen.append(options)
        return ScriptedTransport(1)

    monkeypatch.setattr(cluster_module, "make_transport", create)
    if env is None:
        monkeypatch.delenv("REMOTE_EXECUTOR_KEY", raising=False)
    else:
        monkeypatch.setenv("REMOTE_EXECUTOR_KEY", env)
    ex = RemoteExecutor(3, "x://y", key=key, heartbeat_timeout=5.0, workers_hint=7)
    ex.shutdown()
    assert seen[0].key == (user_key() if expected == "this user's key" else expected)
    assert seen[0].max_workers == 3
    assert seen[0].heartbeat_timeout == 5.0
    assert seen[0].extra == {"workers_hint": 7}


def test_a_transport_that_cannot_start_is_closed_and_its_error_raised() -> None:
    class Unreachable(ScriptedTransport):
        def start(self, session: Session, listener: Listener) -> None:
            raise TransportError("connection refused")

    transport = Unreachable()
    with pytest.raises(TransportError, match="connection refused"):
        RemoteExecutor(transport=transport)
    assert transport.closed.is_set()


# --- submit and results ----------------------------------------------------------------------------


def test_submit_result_and_keywords_named_fn_and_self(make: Callable[..., RemoteExecutor]) -> None:
    ex = make()
    assert ex.submit(pow, 2, 10).result(timeout=10) == 1024
    assert ex.submit(echo, 1, fn="f", self="s").result(timeout=10) == ((1,), {"fn": "f", "self": "s"})
    assert ex.submit(lambda x: x * 3, 5).result(timeout=10) == 15
    assert RemoteExecutor.submit.__doc__ == cf.Executor.submit.__doc__


def test_exception_keeps_type_and_args_with_remote_traceback(make: Callable[..., RemoteExecutor]) -> None:
    future = make().submit(raise_custom, 7, "seven")
    with pytest.raises(CustomError) as info:
        future.result(timeout=10)
    assert info.value.args == (7, "seven")
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "raise_custom" in cause.tb
    assert "CustomError: (7, 'seven')" in cause.tb


def test_unpicklable_exception_arrives_as_remote_error(make: Callable[..., RemoteExecutor]) -> None:
    with pytest.raises(RemoteError) as info:
        make().submit(raise_unpicklable).result(timeout=10)
    assert info.value.type_name == "UnpicklableError"
    assert info.value.message == "stays remote"
    assert "raise_unpicklable" in info.value.traceback_text


def test_unpicklable_argument_fails_only_its_future(make: Callable[..., RemoteExecutor]) -> None:
    ex = make()
    before = ex.submit(pow, 2, 2)
    bad = ex.submit(echo, 1, threading.Lock())
    bad_kw = ex.submit(echo, data=threading.Lock())
    after = ex.submit(pow, 3, 2)
    with pytest.raises(SerializationError, match=r"argument 1 \(lock\).*echo"):
        bad.result(timeout=0)  # failed at once, in the caller's thread
    with pytest.raises(SerializationError, match="keyword argument 'data'"):
        bad_kw.result(timeout=0)
    assert (before.result(timeout=10), after.result(timeout=10)) == (4, 9)


def test_unpicklable_result_fails_its_future(make: Callable[..., RemoteExecutor]) -> None:
    ex = make()
    with pytest.raises(SerializationError, match=r"the result \(lock\).*returns_lock"):
        ex.submit(returns_lock).result(timeout=10)
    assert ex.submit(pow, 2, 3).result(timeout=10) == 8


def test_future_is_running_once_handed_to_the_transport_and_cannot_be_cancelled(
    make: Callable[..., RemoteExecutor],
) -> None:
    ex = make(1)
    running = ex.submit(blocked, "first")
    assert GATE["started"].wait(10)
    pending = ex.submit(record, "second")
    assert running.running()
    assert not pending.running()
    assert not running.cancel()
    assert pending.cancel()
    done, _ = cf.wait([pending], timeout=10)
    assert done == {pending}  # a cancelled future is notified, wait() returns
    GATE["release"].set()
    assert running.result(timeout=10) == "first"
    ex.shutdown(wait=True)
    assert RAN == ["first"]  # the cancelled call never ran


def test_done_callback_may_submit_more_work(make: Callable[..., RemoteExecutor]) -> None:
    ex = make(1)
    chained: list[cf.Future[int]] = []
    submitted = threading.Event()

    def callback(future: cf.Future[int]) -> None:
        chained.append(ex.submit(pow, future.result(), 2))
        submitted.set()

    ex.submit(pow, 2, 3).add_done_callback(callback)
    assert submitted.wait(10)
    assert chained[0].result(timeout=10) == 64


def test_asyncio_run_in_executor(make: Callable[..., RemoteExecutor]) -> None:
    ex = make()

    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        first = await loop.run_in_executor(ex, pow, 2, 5)
        second = await asyncio.wrap_future(ex.submit(pow, 3, 3))
        return first, second

    assert asyncio.run(main()) == (32, 27)


# --- shutdown --------------------------------------------------------------------------------------


def test_shutdown_wait_finishes_everything_then_closes(make: Callable[..., RemoteExecutor]) -> None:
    transport = CountingTransport(1)
    ex = make(transport=transport)
    futures = [ex.submit(blocked, 0), *(ex.submit(record, n) for n in range(1, 5))]
    assert GATE["started"].wait(10)
    releaser = threading.Thread(target=GATE["release"].set)
    releaser.start()
    ex.shutdown(wait=True)
    releaser.join()
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [0, 1, 2, 3, 4]
    assert transport.closed.is_set()
    ex.shutdown()  # idempotent


def test_shutdown_nowait_runs_queued_calls_then_closes_the_transport(
    make: Callable[..., RemoteExecutor],
) -> None:
    transport = CountingTransport(1)
    ex = make(transport=transport)
    futures = [ex.submit(blocked, 0), *(ex.submit(record, n) for n in range(1, 4))]
    assert GATE["started"].wait(10)
    ex.shutdown(wait=False)
    assert not any(f.done() for f in futures)
    assert not transport.closed.is_set()
    with pytest.raises(RuntimeError, match=r"^cannot schedule new futures after shutdown$"):
        ex.submit(pow, 1, 1)
    GATE["release"].set()
    assert [f.result(timeout=10) for f in futures] == [0, 1, 2, 3]
    assert transport.closed.wait(10)


def test_shutdown_cancel_futures(make: Callable[..., RemoteExecutor]) -> None:
    ex = make(1)
    running = ex.submit(blocked, 0)
    assert GATE["started"].wait(10)
    queued = [ex.submit(record, n) for n in range(1, 4)]
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    done, _ = cf.wait(queued, timeout=10)
    assert done == set(queued)
    GATE["release"].set()
    assert running.result(timeout=10) == 0
    ex.shutdown(wait=True)
    assert RAN == [0]


def test_context_manager_waits(make: Callable[..., RemoteExecutor]) -> None:
    with make(2) as ex:
        futures = [ex.submit(record, n) for n in range(10)]
    assert all(f.done() for f in futures)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(record, 1)


def test_shutdown_wait_from_a_result_callback_raises_instead_of_deadlocking(
    make: Callable[..., RemoteExecutor],
) -> None:
    seen: list[BaseException] = []
    called = threading.Event()

    def callback(future: cf.Future[int]) -> None:
        try:
            ex.shutdown(wait=True)
        except RuntimeError as exc:
            seen.append(exc)
        called.set()

    transport = CountingTransport(1)
    ex = make(transport=transport)
    ex.submit(blocked, 1).add_done_callback(callback)  # registered before the call can finish
    GATE["release"].set()
    assert called.wait(10)
    assert len(seen) == 1
    assert transport.closed.wait(10)  # closed in the background once that call settled


def test_garbage_collected_executor_finishes_work_and_closes() -> None:
    transport = CountingTransport(1)
    ex = RemoteExecutor(transport=transport)
    futures = [ex.submit(blocked, 0), ex.submit(record, 1)]
    assert GATE["started"].wait(10)
    del ex
    GATE["release"].set()
    assert [f.result(timeout=10) for f in futures] == [0, 1]
    assert transport.closed.wait(10)


def test_interpreter_exit_finishes_pending_work_then_refuses_submits() -> None:
    script = textwrap.dedent(
        """
        import atexit, time
        from remote_executor import RemoteExecutor

        def slow(i):
            time.sleep(0.2 if i == 0 else 0)  # keeps calls queued when the main thread ends
            return i

        ex = RemoteExecutor(1, "memory")
        for i in range(4):
            ex.submit(slow, i).add_done_callback(lambda f: print("done", f.result(), flush=True))

        @atexit.register
        def late():  # atexit hooks run after the executor's exit hook
            try:
                ex.submit(slow, 9)
            except RuntimeError as exc:
                print("late:", exc, flush=True)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "done 0",
        "done 1",
        "done 2",
        "done 3",
        "late: cannot schedule new futures after interpreter shutdown",
    ]


# --- map -------------------------------------------------------------------------------------------


def test_map_results_in_input_order(make: Callable[..., RemoteExecutor]) -> None:
    ex = make(3)
    assert list(ex.map(pow, range(20), itertools.repeat(2))) == [n**2 for n in range(20)]
    assert list(ex.map(pow, [], [])) == []


def test_map_raises_at_the_failing_element(make: Callable[..., RemoteExecutor]) -> None:
    results = make().map(inverse, [1, 2, 0, 4])
    assert next(results) == 1.0
    assert next(results) == 0.5
    with pytest.raises(ZeroDivisionError) as info:
        next(results)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    with pytest.raises(StopIteration):
        next(results)


def test_map_timeout_counts_from_the_call(make: Callable[..., RemoteExecutor]) -> None:
    results = make(1).map(blocked, [1, 2], timeout=0.05)
    with pytest.raises(cf.TimeoutError):
        next(results)


@pytest.mark.parametrize("how", ["close", "del"])
@pytest.mark.parametrize("iterated", [True, False], ids=["iterated", "never-iterated"])
def test_closing_or_dropping_map_cancels_calls_not_started_once_iterated(
        make: Callable[..., RemoteExecutor], how: str, iterated: bool) -> None:
    """As a generator: once iterated, closing or dropping it cancels the rest; never iterated, nothing."""
    ex = make(1)
    results = ex.map(blocked_unless_first if iterated else blocked, range(5))
    if iterated:
        assert next(results) == 0
    assert GATE["started"].wait(10)  # a call runs; the others wait
    if how == "close":
        results.close()  # type: ignore[attr-defined]
    else:
        del results
    GATE["release"].set()
    ex.shutdown(wait=True)
    assert RAN[:] == ([0, 1] if iterated else [0, 1, 2, 3, 4])


def test_map_validates_chunksize_and_buffersize(make: Callable[..., RemoteExecutor]) -> None:
    ex = make()
    with pytest.raises(ValueError, match=r"^chunksize must be >= 1\.$"):
        ex.map(pow, [1], [1], chunksize=0)
    with pytest.raises(TypeError, match=r"^chunksize must be an int, not NoneType$"):
        ex.map(pow, [1], [1], chunksize=None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^buffersize must be an integer or None$"):
        ex.map(pow, [1], [1], buffersize=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^buffersize must be None or > 0$"):
        ex.map(pow, [1], [1], buffersize=0)


def test_map_chunksize_sends_one_call_per_chunk(make: Callable[..., RemoteExecutor]) -> None:
    transport = CountingTransport(2)
    ex = make(transport=transport)
    assert list(ex.map(pow, range(10), itertools.repeat(2), chunksize=4)) == [n**2 for n in range(10)]
    assert sum(transport.batches) == 3  # chunks of 4, 4 and 2 calls


def test_map_chunk_error_is_raised_at_its_element(make: Callable[..., RemoteExecutor]) -> None:
    results = make().map(inverse, [1, 2, 0, 4, 5], chunksize=4)
    assert [next(results), next(results)] == [1.0, 0.5]
    with pytest.raises(ZeroDivisionError):
        next(results)
    with pytest.raises(StopIteration):
        next(results)


def test_map_chunk_with_unpicklable_argument_fails_at_that_chunk(make: Callable[..., RemoteExecutor]) -> None:
    results = make().map(echo, [1, 2, threading.Lock(), 4], chunksize=2)
    assert next(results) == ((1,), {})
    assert next(results) == ((2,), {})
    with pytest.raises(SerializationError, match=r"argument 0 \(lock\)"):
        next(results)


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_buffersize_consumes_input_lazily(make: Callable[..., RemoteExecutor], chunksize: int) -> None:
    drawn: list[int] = []

    def naturals() -> Iterator[int]:
        for n in itertools.count():
            drawn.append(n)
            yield n

    results = make().map(pow, naturals(), itertools.repeat(2), buffersize=2, chunksize=chunksize)
    assert len(drawn) == 2 * chunksize  # two chunks submitted by map() itself
    assert [next(results) for _ in range(7)] == [n**2 for n in range(7)]
    consumed_chunks = -(-7 // chunksize)
    assert len(drawn) == (2 + consumed_chunks) * chunksize  # one more chunk per chunk consumed
    results.close()  # type: ignore[attr-defined]


def test_map_buffersize_after_shutdown_keeps_results_in_hand(make: Callable[..., RemoteExecutor]) -> None:
    ex = make(1)
    results = ex.map(abs, itertools.count(), buffersize=2)
    ex.shutdown(wait=True)
    assert [next(results), next(results)] == [0, 1]  # submitted before the shutdown: not lost
    with pytest.raises(RuntimeError, match="after shutdown"):
        next(results)
    with pytest.raises(StopIteration):
        next(results)


def test_map_without_buffersize_submits_everything_at_once(make: Callable[..., RemoteExecutor]) -> None:
    drawn: list[int] = []

    def numbers() -> Iterator[int]:
        for n in range(6):
            drawn.append(n)
            yield n

    results = make().map(abs, numbers())
    assert drawn == list(range(6))
    assert list(results) == list(range(6))


# --- initializer -----------------------------------------------------------------------------------


def test_initializer_runs_once_per_worker(make: Callable[..., RemoteExecutor]) -> None:
    ex = make(2, initializer=record_init, initargs=("tag",))
    ran_on = {ex.submit(thread_ident).result(timeout=10) for _ in range(20)}
    ex.shutdown(wait=True)
    assert len(INIT_THREADS) == len(set(INIT_THREADS)) <= 2
    assert ran_on <= set(INIT_THREADS)


def test_initializer_failure_breaks_the_executor(
    make: Callable[..., RemoteExecutor], caplog: pytest.LogCaptureFixture
) -> None:
    ex = make(1, initializer=failing_init)
    with caplog.at_level(logging.ERROR, logger="remote_executor"):
        futures = [ex.submit(pow, 2, n) for n in range(3)]
        for future in futures:
            with pytest.raises(InitializerFailed) as info:
                future.result(timeout=10)
    error = info.value
    assert isinstance(error, cf.BrokenExecutor)
    assert str(error) == "A worker initializer failed, the executor is not usable anymore"
    assert isinstance(error.__cause__, OSError)
    with pytest.raises(BrokenRemoteExecutor) as later:
        ex.submit(pow, 2, 2)
    assert isinstance(later.value, InitializerFailed)
    assert isinstance(later.value.__cause__, OSError)
    logged = caplog.text
    assert "no database here" in logged
    assert "failing_init" in logged  # the remote traceback is in the log


# --- the executor against a scripted transport -----------------------------------------------------


def test_calls_wait_in_the_client_until_capacity_then_go_in_one_batch(
    make: Callable[..., RemoteExecutor],
) -> None:
    transport = ScriptedTransport(capacity=0)
    ex = make(None, transport)
    futures = [ex.submit(pow, 2, n) for n in range(5)]
    assert transport.batches == []
    assert not any(f.running() for f in futures)
    transport.report.on_capacity(3)
    assert [len(batch) for batch in transport.batches] == [3]
    assert [f.running() for f in futures] == [True, True, True, False, False]
    transport.finish(transport.calls[0])
    assert futures[0].result(timeout=0) == 1
    assert [len(batch) for batch in transport.batches] == [3, 1]
    for call in transport.calls[1:]:
        transport.finish(call)
    assert [len(batch) for batch in transport.batches] == [3, 1, 1]
    transport.finish(transport.calls[-1])
    assert [f.result(timeout=0) for f in futures] == [1, 2, 4, 8, 16]


def test_max_workers_caps_the_window(make: Callable[..., RemoteExecutor]) -> None:
    transport = ScriptedTransport(capacity=10)
    ex = make(2, transport)
    futures = [ex.submit(pow, 2, n) for n in range(4)]
    assert len(transport.calls) == 2
    transport.finish(transport.calls[0])
    assert len(transport.calls) == 3
    transport.report.on_capacity(1)  # workers left: the window shrinks
    transport.finish(transport.calls[1])
    assert len(transport.calls) == 3
    transport.finish(transport.calls[2])
    transport.finish(transport.calls[3])
    assert [f.result(timeout=0) for f in futures] == [1, 2, 4, 8]


def test_cancelled_calls_are_skipped_at_dispatch(make: Callable[..., RemoteExecutor]) -> None:
    transport = ScriptedTransport(capacity=1)
    ex = make(None, transport)
    first, second, third = (ex.submit(pow, 2, n) for n in range(3))
    assert second.cancel()
    transport.finish(transport.calls[0])
    assert len(transport.calls) == 2
    transport.finish(transport.calls[1])
    assert (first.result(timeout=0), third.result(timeout=0)) == (1, 4)


def test_worker_lost_and_rejected_results(make: Callable[..., RemoteExecutor]) -> None:
    transport = ScriptedTransport(capacity=2)
    ex = make(None, transport)
    lost, rejected = ex.submit(pow, 2, 2), ex.submit(pow, 2, 3)
    first, second = transport.calls
    transport.report.on_result(first.task_id, Status.WORKER_LOST, worker_lost_parts(["w1", "w2"], 2))
    transport.report.on_result(second.task_id, Status.REJECTED, [b"bad input"])
    with pytest.raises(WorkerLostError) as info:
        lost.result(timeout=0)
    assert info.value.workers == ("w1", "w2")
    with pytest.raises(BrokenRemoteExecutor, match="bad input"):
        rejected.result(timeout=0)
    transport.report.on_result(first.task_id, Status.DONE, run_task(first.parts))  # a duplicate: ignored


def test_on_broken_fails_pending_and_in_flight_futures(make: Callable[..., RemoteExecutor]) -> None:
    transport = ScriptedTransport(capacity=1)
    ex = make(None, transport)
    in_flight, pending = ex.submit(pow, 2, 2), ex.submit(pow, 2, 3)
    error = BrokenRemoteExecutor("server gone")
    transport.report.on_broken(error)
    for future in (in_flight, pending):
        with pytest.raises(BrokenRemoteExecutor, match="server gone"):
            future.result(timeout=0)
    with pytest.raises(BrokenRemoteExecutor, match="server gone"):
        ex.submit(pow, 1, 1)
    transport.finish(transport.calls[0])  # late result after broken: ignored


def test_shutdown_nowait_closes_after_the_last_result(make: Callable[..., RemoteExecutor]) -> None:
    transport = ScriptedTransport(capacity=1)
    ex = make(None, transport)
    futures = [ex.submit(pow, 2, n) for n in range(2)]
    ex.shutdown(wait=False)
    transport.finish(transport.calls[0])
    assert not transport.closed.is_set()
    transport.finish(transport.calls[1])  # on this thread, the closer runs on its own
    assert transport.closed.wait(10)
    assert [f.result(timeout=0) for f in futures] == [1, 2]


class EagerTransport(ScriptedTransport):
    """Breaks the threading contract on purpose: reports each result from inside submit()."""

    def submit(self, calls: Sequence[Call]) -> None:
        for call in calls:
            self.finish(call)


def test_results_reported_from_inside_transport_submit_do_not_deadlock(
    make: Callable[..., RemoteExecutor],
) -> None:
    ex = make(None, EagerTransport(capacity=1))
    chained: list[cf.Future[int]] = []
    first = ex.submit(pow, 2, 2)
    first.add_done_callback(lambda f: chained.append(ex.submit(pow, f.result(), 2)))
    assert first.result(timeout=0) == 4
    assert chained[0].result(timeout=0) == 16
    assert list(ex.map(pow, range(4), itertools.repeat(2), chunksize=2)) == [0, 1, 4, 9]


class RefusingTransport(ScriptedTransport):
    def submit(self, calls: Sequence[Call]) -> None:
        raise OSError("transport bug")


def test_a_transport_failing_in_submit_fails_those_calls_only(
    make: Callable[..., RemoteExecutor], caplog: pytest.LogCaptureFixture
) -> None:
    ex = make(None, RefusingTransport(capacity=1))
    with caplog.at_level(logging.ERROR, logger="remote_executor"):
        future = ex.submit(pow, 2, 2)  # does not raise in the caller
    with pytest.raises(OSError, match="transport bug"):
        future.result(timeout=0)
    assert "failed to accept 1 call" in caplog.text


def test_idle_shutdown_nowait_closes_in_the_background(make: Callable[..., RemoteExecutor]) -> None:
    transport = ScriptedTransport(capacity=1)
    make(None, transport).shutdown(wait=False)
    assert transport.closed.wait(10)


def test_executor_ids_are_random_and_the_session_carries_settings(
    make: Callable[..., RemoteExecutor],
) -> None:
    first, second = ScriptedTransport(1), ScriptedTransport(1)
    make(None, first, max_retries=0)
    make(None, second, initializer=record_init, initargs=("tag",))
    assert first.session.executor_id != second.session.executor_id
    assert 0 <= first.session.executor_id < 2**63
    assert (first.session.max_retries, first.session.initializer) == (0, None)
    assert second.session.initializer is not None


@pytest.mark.parametrize(("options", "message"), [
    ({"tranport": "tcp"}, "'tranport' (did you mean 'transport'?)"),
    ({"tls_cafile": "ca.pem"}, "'tls_cafile' (did you mean 'tls_ca'?)"),
    ({"curve_server_key": "server.key"}, "for the tcp transport"),  # a zmq option given to tcp
])
def test_an_option_nothing_reads_is_a_clear_error(options: dict[str, str], message: str) -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument") as caught:
        RemoteExecutor(1, transport="tcp://127.0.0.1:1", **options)  # refused before any connection
    assert message in str(caught.value)


@pytest.mark.parametrize(("option", "value"), [("heartbeat_interval", 0), ("heartbeat_timeout", -1.0),
                                               ("heartbeat_timeout", float("nan")), ("connect_timeout", 0),
                                               ("reconnect_timeout", -5)])
def test_a_timing_option_that_cannot_work_is_a_value_error(option: str, value: float) -> None:
    with pytest.raises(ValueError, match=option):
        RemoteExecutor(1, transport="tcp", **{option: value})


def test_a_thread_name_prefix_given_in_the_transports_place_says_so() -> None:
    with pytest.raises(UnknownSchemeError, match="thread_name_prefix is a keyword argument here"):
        RemoteExecutor(2, "fetcher")


@pytest.mark.parametrize("url", ["127.0.0.1:5555", "scheduler.lan:5555", "[::1]:5555", "h1:1,h2:2", "host:1/pool"])
def test_a_url_without_its_scheme_says_so(url: str) -> None:
    with pytest.raises(UnknownSchemeError) as caught:
        RemoteExecutor(2, transport=url)
    assert str(caught.value) == f"expected a URL like tcp://host:port, got {url!r}"  # as the command line says


def test_a_misspelt_scheme_gets_its_suggestion_alone() -> None:
    with pytest.raises(UnknownSchemeError) as caught:
        RemoteExecutor(2, transport="tpc")
    assert str(caught.value).endswith("did you mean 'tcp'?")


def test_a_call_that_captures_its_executor_fails_saying_so() -> None:
    """(The error named a socket, a lock or a handle deep inside the executor, never the executor.)"""
    with RemoteExecutor(1) as ex:
        def submit_from_the_worker() -> int:
            return int(ex.submit(abs, -3).result())

        with pytest.raises(SerializationError, match="a RemoteExecutor cannot be sent to a worker"):
            ex.submit(submit_from_the_worker).result(timeout=60)
        assert ex.submit(abs, -4).result(timeout=60) == 4  # the executor serves on
