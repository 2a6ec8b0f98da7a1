"""The embedded executor's constructor returns once its workers are ready, or fails clearly."""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from remote_executor import RemoteExecutor, TransportError
from remote_executor.supervisor import Supervisor
from remote_executor.transports.gearman.gearmand import GearmandProcess
from remote_executor.transports.tcp.server import TcpServer
from remote_executor.transports.zmq.server import ZmqServer
from tests.conftest import FAST_HEARTBEAT, wait_for

FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5}


@pytest.mark.parametrize("transport", [None, "zmq", "gearman"])
def test_submit_then_cancel_runs_some_calls_like_a_thread_pool(transport: str | None) -> None:
    executor = RemoteExecutor(transport=transport)
    futures = [executor.submit(time.sleep, 0.1) for _ in range(50)]
    executor.shutdown(wait=True, cancel_futures=True)
    ran = [f for f in futures if not f.cancelled()]
    assert ran, "every call was cancelled: the workers were not ready when the constructor returned"
    assert all(f.result() is None for f in ran)
    assert len(ran) < 50  # and the rest were cancelled, as a thread pool would


def test_workers_that_cannot_start_are_a_clear_error_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker process that exits at once, as one whose interpreter or environment is broken does.
    monkeypatch.setattr(sys, "executable", shutil.which("false") or "/bin/false")
    started = time.monotonic()
    with pytest.raises(TransportError, match=r"worker processes did not start: 0 of 2 attached, local-worker-\d "
                                             r"exited with status 1"):
        RemoteExecutor(2)
    assert time.monotonic() - started < 10


# --- a cluster started elsewhere: wait_for_workers, and a warning while calls wait for none -------------------


@contextlib.contextmanager
def url_cluster(scheme: str) -> Iterator[tuple[str, Callable[[int], Supervisor]]]:
    """A job server (or gearmand) with no worker yet, and a way to start workers for it."""
    supervisors: list[Supervisor] = []
    with contextlib.ExitStack() as stack:
        if scheme == "gearman":
            url = stack.enter_context(GearmandProcess(threads=2)).url + "/readiness"
            args: tuple[str, ...] = ()
        else:
            server = TcpServer("127.0.0.1", 0, **FAST) if scheme == "tcp" else ZmqServer("127.0.0.1", 0, **FAST)
            server.start()
            stack.callback(server.stop)
            url, args = server.url, FAST_HEARTBEAT

        def start(count: int) -> Supervisor:
            supervisor = Supervisor(url, count, worker_args=args, name="ready-worker")
            supervisor.start()
            supervisors.append(supervisor)
            return supervisor

        try:
            yield url, start
        finally:
            for supervisor in supervisors:
                supervisor.stop()


@pytest.mark.parametrize("scheme", ["tcp", "zmq", "gearman"])
def test_wait_for_workers_and_the_no_workers_warning(scheme: str, caplog: pytest.LogCaptureFixture) -> None:
    with url_cluster(scheme) as (url, start), \
            RemoteExecutor(transport=url, no_workers_warning=0.2, **FAST) as executor:  # type: ignore[arg-type]
        with pytest.raises(TimeoutError, match=r"0 of 1 worker\(s\) attached to .* after 0.2s"):
            executor.wait_for_workers(1, timeout=0.2)
        futures = [executor.submit(abs, -i) for i in range(3)]
        cancelled = [executor.submit(abs, -9) for _ in range(2)]
        assert all(future.cancel() for future in cancelled)  # not counted as waiting
        wait_for(lambda: any("0 workers attached to" in r.getMessage() for r in caplog.records), 10.0,
                 "the no-workers warning")
        [record] = [r for r in caplog.records if "0 workers attached to" in r.getMessage()][:1]
        assert record.levelname == "WARNING" and "3 call(s) waiting" in record.getMessage()
        start(2)
        assert executor.wait_for_workers(2, timeout=30) >= 2
        assert [f.result(timeout=30) for f in futures] == [0, 1, 2]
