"""An embedded cluster kills a worker process its job server gave up as hung, and starts another: a process
stuck in C code (or stopped) never notices its lost connection, and would otherwise hold its slot for ever
(with ``max_workers=1`` no call would run again)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from remote_executor import RemoteExecutor, WorkerLostError
from remote_executor.netio import Backoff
from remote_executor.supervisor import Supervisor
from tests.conftest import pid_alive, wait_for


def _write_pid(marker: Path) -> None:
    """Write this process's pid to ``marker`` at once (a reader never sees the file half-written)."""
    partial = marker.with_suffix(".partial")
    partial.write_text(str(os.getpid()))
    os.replace(partial, marker)


def _run_a_while(marker: Path) -> Callable[[], None]:
    """A long call that writes its pid to ``marker`` once its worker has surely sent a heartbeat (gearman:
    the client knows from that heartbeat which worker runs it)."""
    def call() -> None:
        time.sleep(1.0)  # five heartbeat intervals: its first heartbeat has reached the client
        _write_pid(marker)
        time.sleep(60)
    return call


@pytest.mark.parametrize("transport", ["tcp", "zmq", pytest.param("gearman", marks=pytest.mark.gearman)])
def test_a_hung_worker_is_killed_and_replaced(transport: str, tmp_path: Path) -> None:
    marker = tmp_path / "running"
    with RemoteExecutor(1, transport=transport, max_retries=0, heartbeat_interval=0.2,
                        heartbeat_timeout=1.5) as ex:
        stuck = ex.submit(_run_a_while(marker))
        wait_for(marker.exists, what="the call to start")
        hung = int(marker.read_text())
        os.kill(hung, signal.SIGSTOP)  # as stuck as a call in C code that holds the GIL
        try:
            with pytest.raises(WorkerLostError):
                stuck.result(timeout=60)
            wait_for(lambda: not pid_alive(hung), what="the hung worker to be killed")
            assert ex.submit(os.getpid).result(timeout=60) not in (hung, None)  # a new worker runs calls
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGKILL)


def _backtrack(n: int) -> int:
    """One regular-expression match that holds the interpreter lock for its whole run (about 2^n steps):
    no other thread of the process, the heartbeat's included, runs meanwhile."""
    import re

    return 0 if re.match(r"(a+)+$", "a" * n + "b") is None else 1


@pytest.mark.parametrize("transport", ["tcp", "zmq"])
def test_a_call_that_holds_the_gil_past_the_heartbeat_timeout_is_waited_for(transport: str) -> None:
    """Its worker sends no heartbeat while the call runs, yet is not hung: it is on a CPU. The embedded
    cluster sees that and waits, as a thread pool would (the call was given up as hung, ran max_retries + 1
    times and failed)."""
    start = time.perf_counter()
    _backtrack(20)
    steps = max(0, int(math.log2(4.0 / max(time.perf_counter() - start, 1e-3))))  # about 4 s in a worker
    with RemoteExecutor(1, transport=transport, max_retries=0, heartbeat_interval=0.2, heartbeat_timeout=1.0) as ex:
        assert ex.submit(_backtrack, 20 + steps).result(timeout=110) == 0


def _stop_own_process_once(marker: Path) -> Callable[[], int]:
    """A call that stops its worker process (SIGSTOP) at its first instant the first time it runs — before
    the worker could send a heartbeat — and returns the pid of the process that runs it any later time."""
    def call() -> int:  # (self-contained: importing this test module in the worker could outlast an interval)
        if not marker.exists():
            partial = marker.with_suffix(".partial")
            partial.write_text(str(os.getpid()))
            os.replace(partial, marker)
            os.kill(os.getpid(), signal.SIGSTOP)
        return os.getpid()
    return call


@pytest.mark.gearman
@pytest.mark.parametrize("max_retries", [0, 1])
def test_gearman_worker_hung_before_its_first_heartbeat(tmp_path: Path, max_retries: int) -> None:
    """The embedded gearman cluster's calls carry no start report: the client asks gearmand about a call
    that stays silent, and once gearmand says a worker runs it, that worker's silence counts as any other's."""
    marker = tmp_path / "stopped"
    with RemoteExecutor(2, transport="gearman", max_retries=max_retries, heartbeat_interval=0.2,
                        heartbeat_timeout=1.5) as ex:
        ex.submit(os.getpid).result(timeout=60)  # both workers attached
        future = ex.submit(_stop_own_process_once(marker))
        try:
            if max_retries == 0:
                with pytest.raises(WorkerLostError, match="gearmand reported the job running"):
                    future.result(timeout=30)
            else:  # run again, by the other worker
                assert future.result(timeout=30) != int(marker.read_text())
        finally:
            wait_for(marker.exists, what="the call to stop its worker")
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(marker.read_text()), signal.SIGKILL)


def _count_runs_hang_first(runs: Path, marker: Path) -> Callable[[], int]:
    """Appends a line to ``runs`` each time it runs; the first run then hangs (60 s) once its worker has sent
    a heartbeat, writing its pid to ``marker``; later runs return their pid."""
    def call() -> int:
        with runs.open("a") as f:
            f.write(f"{os.getpid()}\n")
        if len(runs.read_text().splitlines()) == 1:
            time.sleep(1.0)  # (as in _run_a_while)
            _write_pid(marker)
            time.sleep(60)
        return os.getpid()
    return call


@pytest.mark.gearman
def test_gearman_hung_worker_is_killed_only_after_its_job_is_cancelled(tmp_path: Path) -> None:
    """Killing a worker gearmand still counts as running a job makes gearmand hand that job to another
    worker: the call would run once more than its attempts. The old job is cancelled first."""
    runs, marker = tmp_path / "runs", tmp_path / "hung"
    with RemoteExecutor(1, transport="gearman", max_retries=2, heartbeat_interval=0.2,
                        heartbeat_timeout=1.5) as ex:
        future = ex.submit(_count_runs_hang_first(runs, marker))
        wait_for(marker.exists, what="the call to start")
        hung = int(marker.read_text())
        os.kill(hung, signal.SIGSTOP)
        try:
            assert future.result(timeout=60) != hung  # resubmitted to the worker that replaced it
            assert ex.submit(os.getpid).result(timeout=60) != hung  # after anything gearmand had queued
            assert len(runs.read_text().splitlines()) == 2
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGKILL)


def test_a_worker_is_killed_by_name_only_if_it_ran_since_the_hang_began(
        start_workers: Callable[..., Supervisor], caplog: pytest.LogCaptureFixture) -> None:
    """A replacement has the name of the worker it replaced: a hang reported under that name from before it
    started (the replaced one's) must not kill it."""
    supervisor = start_workers(1)
    [pid] = supervisor.pids()
    with caplog.at_level(logging.WARNING, logger="remote_executor.supervisor"):
        supervisor.kill_hung("test-worker-0", time.monotonic() - 3600)  # a start report older than the worker
        supervisor.kill_hung("test-worker-1", time.monotonic())  # no child of that name
        supervisor.kill_hung("someone-else-0")
        assert "given up as hung" not in caplog.text and pid_alive(pid)
        supervisor.kill_hung("test-worker-0", time.monotonic())
        assert f"worker process {pid} was given up as hung" in caplog.text
    wait_for(lambda: not pid_alive(pid), what="the worker to be killed")


def test_a_crash_looping_worker_does_not_hold_up_replacing_another(start_workers: Callable[..., Supervisor]) -> None:
    """Its backoff is waited out apart: meanwhile a sibling that ended (a crash, a time limit) is replaced
    as usual, not once the backoff is over."""
    supervisor = start_workers(2)
    wait_for(lambda: len(supervisor.pids()) == 2, what="both workers")
    looping, other = supervisor._children[0].proc.pid, supervisor._children[1].proc.pid
    supervisor._crash_backoff[0] = Backoff(600.0, 600.0)  # as if it had crashed over and over
    os.kill(looping, signal.SIGKILL)
    wait_for(lambda: looping not in supervisor.pids(), what="the looping worker's exit to be seen")
    os.kill(other, signal.SIGKILL)
    wait_for(lambda: len(supervisor.pids()) == 1 and other not in supervisor.pids(),
             what="the other worker to be replaced within its own (first) backoff")


def test_idle_workers_are_not_taken_for_hung_when_heartbeats_are_as_frequent_as_polls(
        caplog: pytest.LogCaptureFixture) -> None:
    """An idle worker sent its heartbeat only when a poll for work came back empty; with the server beating as
    often as the worker polls (every 0.05 s), none ever did, so the server gave idle workers up as hung
    and killed them again and again, and each call after a pause waited for a new worker."""
    caplog.set_level(logging.WARNING)
    # (tcp: zmq's channel happened to leave the worker empty polls all the same)
    with RemoteExecutor(2, transport="tcp", heartbeat_interval=0.05, heartbeat_timeout=1.0) as ex:
        pids = set(ex.map(lambda _: os.getpid(), range(20)))
        time.sleep(3.0)  # idle: what is under test (three heartbeat timeouts)
        assert all(pid_alive(pid) for pid in pids)  # no worker that ran a call was killed
        assert ex.submit(abs, -1).result(timeout=30) == 1
    hung = [r.getMessage() for r in caplog.records if "hung" in r.getMessage() or "silent" in r.getMessage()]
    assert not hung, hung
