"""Per-call time limits: the future fails with CallTimeoutError, the worker process that ran the call is
gone (and replaced), the call is never retried; on real processes over tcp, zmq and gearman (embedded and a
gearmand of its own), and the scheduler's and the executor's own backstops on their own."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from remote_executor import BrokenRemoteExecutor, CallTimeoutError, RemoteExecutor
from remote_executor.jobserver.scheduler import Close
from remote_executor.supervisor import Supervisor
from remote_executor.transports.base import Call, ClientTransport, Listener, Session
from remote_executor.transports.gearman.gearmand import GearmandProcess
from remote_executor.transports.tcp.server import TcpServer
from remote_executor.wire.frames import LIMITED, Frame, Kind, Status
from remote_executor.wire.messages import call_frame, split_limit
from tests.conftest import pid_alive, wait_for
from tests.test_scheduler import Harness, call, sent

FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5}
FAST_WORKER = ("--heartbeat-interval", "0.2", "--heartbeat-timeout", "1.5")


def count_start_and_sleep(path: str, seconds: float) -> int:
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return os.getpid()


def starts(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


def takes_keyword(*, timeout: float) -> float:
    return timeout


def spin_in_c() -> int:
    """Holds the GIL for a very long time: sum() over a range never lets another thread run."""
    return sum(range(10**13))


@pytest.mark.parametrize("transport", [None, pytest.param("zmq", marks=pytest.mark.zmq),
                                       pytest.param("gearman", marks=pytest.mark.gearman),
                                       pytest.param("gearman://", marks=pytest.mark.gearman)],
                         ids=["tcp", "zmq", "gearman", "gearman-url"])
def test_timed_out_call_fails_fast_frees_its_slot_and_its_process_is_gone(
        transport: str | None, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="remote_executor")
    if transport == "gearman://":  # a gearmand we did not start (no -j): workers report every start
        with GearmandProcess(threads=2) as gearmand:
            supervisor = Supervisor(gearmand.url, 1, worker_args=FAST_WORKER, name="test-worker")
            supervisor.start()
            try:
                check_timed_out_call(1, gearmand.url, tmp_path)
            finally:
                supervisor.stop()
    else:
        check_timed_out_call(1, transport, tmp_path)
    if transport in (None, "zmq"):  # the embedded job server (in this process) logs what it heard
        # The worker's own report reached it before the process ended (ZeroMQ sends on a thread of its
        # own, which an exiting process must wait for), rather than the server noticing a lost worker.
        assert "stopped a call at its time limit" in caplog.text


def check_timed_out_call(workers: int | None, transport: str | None, tmp_path: Path) -> None:
    log = tmp_path / "starts"
    with RemoteExecutor(workers, transport=transport, max_retries=2, **FAST) as executor:  # type: ignore[arg-type]
        # The limit covers unpickling the call too: import this module in the worker first.
        executor.submit(count_start_and_sleep, str(tmp_path / "warm-up"), 0).result(timeout=10)
        started = time.monotonic()
        future = executor.with_options(timeout=0.5).submit(count_start_and_sleep, str(log), 60)
        with pytest.raises(CallTimeoutError) as info:
            future.result(timeout=10)
        elapsed = time.monotonic() - started
        assert elapsed < 2.0, f"the timed-out call took {elapsed:.2f}s to fail"
        assert isinstance(info.value, cf.TimeoutError) and info.value.limit == 0.5
        [pid] = starts(log)
        wait_for(lambda: not pid_alive(pid), 5.0, "the process that ran the call to exit")
        # The slot is free again (a fresh process), and the call was not retried: a requeued call would
        # have gone ahead of this one.
        assert executor.submit(os.getpid).result(timeout=10) != pid
        assert starts(log) == [pid]


def test_executor_wide_limit_and_per_call_views(tcp_server: TcpServer,
                                                start_workers: Callable[..., Supervisor]) -> None:
    start_workers(1)
    with RemoteExecutor(transport=tcp_server.url, call_timeout=0.5, **FAST) as executor:  # type: ignore[arg-type]
        assert executor.call_timeout == 0.5
        with pytest.raises(CallTimeoutError):
            executor.submit(time.sleep, 30).result(timeout=10)
        # The view passes every keyword on, even one named "timeout"; its own limit is not the user's.
        relaxed = executor.with_options(timeout=None)
        assert relaxed.call_timeout is None and executor.call_timeout == 0.5
        assert relaxed.submit(takes_keyword, timeout=3.0).result(timeout=10) == 3.0
        assert relaxed.submit(time.sleep, 0.7).result(timeout=10) is None
        assert list(executor.with_options(timeout=5).map(abs, [-1, -2], chunksize=2)) == [1, 2]
        with pytest.raises(CallTimeoutError):  # map's calls get the view's limit too
            list(executor.map(time.sleep, [30]))


def test_map_on_a_view_made_for_it_returns_every_result_under_the_views_limit(
        tcp_server: TcpServer, start_workers: Callable[..., Supervisor]) -> None:
    """Nothing holds a view made inline for ``map`` once map has returned: the lazy input (buffersize) must
    go on all the same (it stopped after ``buffersize`` results, silently), with the view's limit."""
    start_workers(2)
    with RemoteExecutor(transport=tcp_server.url, **FAST) as executor:  # type: ignore[arg-type]
        for chunksize in (1, 3):
            results = executor.with_options(timeout=30).map(abs, range(-10, 0), buffersize=2, chunksize=chunksize)
            assert list(results) == list(range(10, 0, -1))
        with pytest.raises(CallTimeoutError):
            list(executor.with_options(timeout=0.5).map(time.sleep, [0, 0, 30], buffersize=1))


def test_a_call_that_holds_the_gil_is_stopped_all_the_same(tcp_server: TcpServer,
                                                           start_workers: Callable[..., Supervisor]) -> None:
    supervisor = start_workers(1)
    with RemoteExecutor(transport=tcp_server.url, **FAST) as executor:  # type: ignore[arg-type]
        [pid] = supervisor.pids()
        started = time.monotonic()
        with pytest.raises(CallTimeoutError):
            executor.with_options(timeout=0.5).submit(spin_in_c).result(timeout=15)
        assert time.monotonic() - started < 5.0
        wait_for(lambda: not pid_alive(pid), 10.0, "the process stuck in C code to be ended")
        assert executor.submit(os.getpid).result(timeout=15) != pid


def count_start_and_spin_in_c(path: str) -> int:
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return spin_in_c()


@pytest.mark.gearman
def test_a_gearman_call_stuck_in_c_past_its_limit_is_not_run_again(tmp_path: Path,
                                                                   capfd: pytest.CaptureFixture[str]) -> None:
    """Its process is killed without answering (the watchdog thread cannot run), so gearmand hands the job to
    another worker: that one finds the start record its sibling left and answers the job as timed out
    instead of running it a second time."""
    runs = tmp_path / "runs"
    runs.touch()
    with RemoteExecutor(2, transport="gearman", max_retries=2, heartbeat_interval=0.5,
                        heartbeat_timeout=30) as executor:  # the watchdog, not the silence, ends the process
        # Both workers import this module first (a call's limit counts the import of its function's module).
        warm = [executor.submit(count_start_and_sleep, str(tmp_path / "warm"), 0.3) for _ in range(2)]
        assert len({f.result(timeout=30) for f in warm}) == 2
        future = executor.with_options(timeout=0.5).submit(count_start_and_spin_in_c, str(runs))
        with pytest.raises(CallTimeoutError, match=r"ran past its time limit of 0\.5s"):
            future.result(timeout=30)
        [first] = starts(runs)
        wait_for(lambda: not pid_alive(first), what="the process stuck in C code to be ended")
        assert "answering it as timed out without running it" in capfd.readouterr().err
        assert executor.submit(os.getpid).result(timeout=30) != first
    assert starts(runs) == [first]


def test_bad_limits_are_refused_clearly() -> None:
    with RemoteExecutor(transport="memory") as executor:
        for bad in (0, -1, math.nan, "5", True, 10**9):
            with pytest.raises(ValueError, match="call timeout"):
                executor.with_options(timeout=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="does not support call time limits"):
            executor.with_options(timeout=1)
        assert executor.submit(abs, -1).result() == 1  # nothing was lost
    with pytest.raises(ValueError, match="does not support call time limits"):
        RemoteExecutor(1, transport="memory", call_timeout=1)


# --- the backstops, on their own -----------------------------------------------------------------------------


class SilentTransport(ClientTransport):
    """Says every call started, then never answers: the executor must fail timed calls by itself."""

    time_limits = True

    def __init__(self) -> None:
        self.url = "silent://"
        self.listener: Listener | None = None
        self.task_ids: list[int] = []

    def start(self, session: Session, listener: Listener) -> None:
        self.listener = listener
        listener.on_capacity(4)

    def submit(self, calls: Sequence[Call]) -> None:
        assert self.listener is not None
        for c in calls:
            self.task_ids.append(c.task_id)
            if c.limit is not None:
                self.listener.on_started(c.task_id)

    def close(self) -> None:
        pass


def test_the_executor_fails_a_started_call_nobody_answers_for() -> None:
    executor = RemoteExecutor(transport=SilentTransport(), heartbeat_interval=0.1, heartbeat_timeout=0.2)
    started = time.monotonic()
    future = executor.with_options(timeout=0.1).submit(abs, 1)
    with pytest.raises(CallTimeoutError, match="no worker answered"):
        future.result(timeout=5)
    assert time.monotonic() - started < 2.0
    untimed = executor.submit(abs, 1)
    assert not untimed.done()
    # Without a limit nothing fails it: end the transport as a real one ends (broken), or the interpreter's
    # exit would wait for that call for ever, as it waits for any running call.
    transport = executor.transport
    assert isinstance(transport, SilentTransport) and transport.listener is not None
    transport.listener.on_broken(BrokenRemoteExecutor("the silent transport is gone"))
    assert isinstance(untimed.exception(timeout=5), BrokenRemoteExecutor)
    executor.shutdown(wait=True)


def test_limits_round_trip_on_the_wire() -> None:
    frame = call_frame(Kind.SUBMIT, 3, 1, [b"x", b"y"], 0.25)
    assert frame.flags == LIMITED
    assert split_limit(frame) == (0.25, [b"x", b"y"])
    assert split_limit(call_frame(Kind.TASK, 3, 1, [b"x"], None)) == (None, [b"x"])


def limited_submit(tid: int, limit: float) -> Frame:
    return call_frame(Kind.SUBMIT, tid, 0, call(str(tid)), limit)


@pytest.mark.parametrize("how", ["disconnect", "silence"])
def test_scheduler_a_worker_lost_after_the_deadline_times_the_call_out(how: str) -> None:
    h = Harness()
    h.client(1, max_retries=3)
    h.worker(2)
    actions = h.recv(1, limited_submit(10, 2.0))
    [task] = sent(actions, 2, Kind.TASK)
    assert split_limit(task) == (2.0, call("10"))
    assert [f.a for f in sent(actions, 1, Kind.STARTED)] == [10]
    h.worker(3)
    h.now = 2.5  # past the deadline (silence jumps further still)
    h.recv(3, Frame(Kind.HEARTBEAT))
    actions = h.lose(2, how)
    [result] = sent(actions, 1, Kind.RESULT)
    assert (result.a, result.b) == (10, Status.TIMED_OUT)
    assert sent(actions, 3, Kind.TASK) == []  # never retried


def test_scheduler_a_worker_lost_before_the_deadline_is_requeued() -> None:
    h = Harness()
    h.client(1, max_retries=1)
    h.worker(2)
    h.recv(1, limited_submit(10, 60.0))
    h.worker(3)
    actions = h.disconnect(2)
    assert [f.a for f in sent(actions, 1, Kind.REQUEUED)] == [10]
    assert len(sent(actions, 3, Kind.TASK)) == 1


def test_scheduler_worker_report_and_overdue_backstop() -> None:
    h = Harness()
    h.client(1)
    h.worker(2)
    h.worker(3)
    actions = h.recv(1, limited_submit(10, 1.0)) + h.recv(1, limited_submit(11, 1.0))
    tid_on_2 = sent(actions, 2, Kind.TASK)[0].a
    # The worker says it stopped the call: the client hears TIMED_OUT, the exiting worker gets nothing new.
    actions = h.recv(2, Frame(Kind.RESULT, a=tid_on_2, b=Status.TIMED_OUT))
    assert [(f.a, f.b) for f in sent(actions, 1, Kind.RESULT)] == [(10, Status.TIMED_OUT)]
    h.recv(1, limited_submit(12, 1.0))
    assert sent(h.s.take_actions(), 2, Kind.TASK) == []
    # Worker 3 keeps beating but never answers: a heartbeat timeout after the deadline it is closed.
    h.now = 1.0 + 5.0 + 0.1
    h.recv(3, Frame(Kind.HEARTBEAT))
    h.recv(2, Frame(Kind.HEARTBEAT))
    actions = h.tick(h.now)
    assert [a.conn for a in actions if isinstance(a, Close)] == [3]
    assert (11, Status.TIMED_OUT) in [(f.a, f.b) for f in sent(actions, 1, Kind.RESULT)]


def test_scheduler_rejects_a_malformed_limit() -> None:
    h = Harness()
    h.client(1)
    actions = h.recv(1, Frame(Kind.SUBMIT, a=1, parts=[b"short"], flags=LIMITED))
    assert [a.conn for a in actions if isinstance(a, Close)] == [1]


def test_the_documented_example_runs() -> None:
    example = Path(__file__).parent.parent / "examples" / "timeouts.py"
    src = Path(__file__).parent.parent / "src"
    done = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(src)}, check=True)
    assert "stopped after 0." in done.stdout and "the next call runs at once" in done.stdout


def test_a_call_started_again_gets_a_new_clock() -> None:
    """A retry (another worker took the call after a loss) runs on a clock of its own: the first start's
    deadline passing does not fail it."""
    transport = SilentTransport()
    executor = RemoteExecutor(transport=transport, heartbeat_interval=0.1,
                              heartbeat_timeout=0.5)  # 1 s of slack past the limit
    started = time.monotonic()
    future = executor.with_options(timeout=1.0).submit(abs, 1)  # first start: failed at 2 s without news
    assert transport.listener is not None
    time.sleep(1.0)  # the clock itself is under test here
    transport.listener.on_started(transport.task_ids[-1])  # started again at 1 s: failed at 3 s without news
    time.sleep(max(0.0, 2.5 - (time.monotonic() - started)))
    assert not future.done()  # the first deadline has passed
    with pytest.raises(CallTimeoutError, match="no worker answered"):
        future.result(timeout=10)
    assert time.monotonic() - started >= 2.9
    executor.shutdown(wait=True)


def test_scheduler_a_worker_that_timed_out_a_departed_clients_call_gets_nothing_new() -> None:
    """The worker process exits after stopping a call, whether or not that call's client is still there."""
    h = Harness()
    h.client(1)
    h.client(4, name="other", executor_id=8)
    h.worker(2)
    [task] = sent(h.recv(1, limited_submit(10, 1.0)), 2, Kind.TASK)
    h.disconnect(1)  # the call's client goes away while the call runs
    h.recv(2, Frame(Kind.RESULT, a=task.a, b=Status.TIMED_OUT))
    assert sent(h.submit(4, 1, "next"), 2, Kind.TASK) == []  # it would be lost with the exiting process
    assert h.s.status()["workers"][0]["draining"] is True


def test_status_and_broadcast_from_a_done_callback_are_errors_not_hangs() -> None:
    errors: list[BaseException] = []
    with RemoteExecutor(1) as executor:

        def callback(future: object) -> None:
            for call in (executor.status, lambda: executor.broadcast(abs, 1), executor.wait_for_workers):
                try:
                    call()
                except RuntimeError as exc:
                    errors.append(exc)

        executor.submit(abs, -1).add_done_callback(callback)
    assert len(errors) == 3 and all("from a done-callback" in str(e) for e in errors), errors


def test_a_settled_calls_deadline_is_forgotten_with_it() -> None:
    """Every call with a time limit armed a deadline (a closure, the executor's failsafe for a call nobody
    answers for) that stayed until the limit came up, long after the call settled: with an hour's limit,
    every call of that hour stayed in memory. A settled call's deadline is dropped with it."""
    from remote_executor.executor import COMPACT_AT

    with RemoteExecutor(2, call_timeout=3600) as ex:
        calls = 4 * COMPACT_AT
        assert list(ex.map(abs, range(-calls, 0))) == list(range(calls, 0, -1))
        deadlines = ex._core.deadlines
        assert len(deadlines) <= 2 * COMPACT_AT, len(deadlines)  # it was one per call
        assert ex.submit(abs, -1).result(timeout=30) == 1  # and calls still have their deadline
