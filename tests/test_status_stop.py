"""Knowing where you stand: ``cluster_status`` and ``RemoteExecutor.status()`` (typed), ``remote-executor status
--watch`` (its rendering, and a clean exit on SIGINT), ``ping --wait`` and ``remote-executor stop [--workers]``,
on real job servers, worker processes and commands."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from remote_executor import RemoteExecutor, WorkerLostError, cluster_status
from remote_executor.conformance.gate import Gate, wait_at_gate
from remote_executor.status import ClientStatus, ClusterStatus, PoolStatus, ServerStatus, WorkerStatus, render
from remote_executor.supervisor import Supervisor
from remote_executor.transports import get_backend
from remote_executor.transports.base import ServerSettings
from remote_executor.transports.tcp.server import TcpServer

from .conftest import FAST_HEARTBEAT, start_cli_server, wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module

SRC = str(Path(__file__).resolve().parents[1] / "src")
KEY = b"status-test-key-" + b"k" * 16
ENV = {**os.environ, "PYTHONPATH": SRC, "REMOTE_EXECUTOR_KEY": KEY.decode()}
# Liveness is not under test here: long enough that a peer starved on a loaded machine is not declared dead.
HEARTBEAT_TIMEOUT = 5.0


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "remote_executor.cli", *args]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server() -> Iterator[TcpServer]:
    made = TcpServer("127.0.0.1", 0, key=KEY, heartbeat_interval=0.2, heartbeat_timeout=HEARTBEAT_TIMEOUT)
    made.start()
    yield made
    made.stop()


@pytest.fixture
def workers(server: TcpServer) -> Iterator[Supervisor]:
    supervisor = Supervisor(server.url, 2, env={"REMOTE_EXECUTOR_KEY": KEY.decode()}, worker_args=FAST_HEARTBEAT,
                            name="sw")
    supervisor.start()
    yield supervisor
    supervisor.stop()


def test_cluster_status_and_executor_status_are_typed(server: TcpServer, workers: Supervisor) -> None:
    with RemoteExecutor(transport=server.url, key=KEY, heartbeat_interval=0.2,
                        heartbeat_timeout=HEARTBEAT_TIMEOUT) as ex:
        ex.wait_for_workers(2, timeout=30)
        assert list(ex.map(abs, range(-10, 0))) == list(range(10, 0, -1))
        wait_for(lambda: cluster_status(server.url, key=KEY).done == 10, what="ten calls counted")
        status = cluster_status(server.url, key=KEY)
        assert isinstance(status, ClusterStatus) and status.url == server.url
        assert sorted(w.pid for w in status.workers if w.pid is not None) == sorted(workers.pids())
        for worker in status.workers:
            assert (worker.host, worker.pool, worker.slots, worker.running) == (socket.gethostname(), "default", 1, 0)
            assert worker.uptime is not None and worker.uptime >= 0
        assert sum(w.done or 0 for w in status.workers) == 10
        assert [(c.pool, c.queued, c.running) for c in status.clients] == [("default", 0, 0)]
        assert status.queued == {"default": 0}
        mine = ex.status()
        assert sorted(w.name for w in mine.workers) == sorted(w.name for w in status.workers)
        assert len(mine.clients) == 1  # this executor (an admin connection, as cluster_status's, is none)


def raise_if_negative(x: int) -> int:
    if x < 0:
        raise ValueError(x)
    return x


@pytest.mark.parametrize("transport", [None, pytest.param("zmq", marks=pytest.mark.zmq)], ids=["tcp", "zmq"])
def test_status_counts_each_workers_failed_calls(transport: str | None) -> None:
    """``done`` counts every answered call, ``failed`` those whose outcome was an error among them."""
    with RemoteExecutor(1, transport=transport) as ex:  # type: ignore[arg-type]
        futures = [ex.submit(raise_if_negative, x) for x in (1, -1, 2, -2, 3)]
        assert [f.exception(timeout=30) is None for f in futures] == [True, False, True, False, True]
        assert ex.submit(list, "x").result(timeout=30) == ["x"]  # a call after the failures: not failed
        wait_for(lambda: sum(w.done or 0 for w in ex.status().workers) == 6, what="six calls counted")
        [worker] = ex.status().workers
        assert (worker.done, worker.failed) == (6, 2)


def test_cluster_status_of_a_url_where_nothing_answers_is_a_clear_error() -> None:
    from remote_executor.errors import ConnectionFailedError

    with pytest.raises(ConnectionFailedError):
        cluster_status(f"tcp://127.0.0.1:{free_port()}", key=KEY, timeout=1.0)


def test_render_shows_workers_queues_and_calls_per_second() -> None:
    def cluster(done: int) -> ClusterStatus:
        worker = WorkerStatus("gpu-1#4", "node-a", 4242, "gpu", 1, 1, done, 75.0, failed=3)
        server = ServerStatus("tcp://h:5555", (worker,), (ClientStatus("client x#5", "gpu", 3, 1),),
                              (PoolStatus("gpu", 1, 1, 1, 3),), done, 3700.0)
        return ClusterStatus("tcp://h:5555", (server,))

    first = render(cluster(10))
    assert "calls/s: -" in first
    assert "pool gpu: 1 worker(s), 1 slot(s), 3 queued" in first
    line = next(line for line in first.splitlines() if "gpu-1#4" in line)
    assert "node-a" in line and "4242" in line and "1/1" in line and "1m15s" in line
    assert line.split()[-2:-1] == ["3"] and "FAILED" in first  # the failed column, before the uptime
    assert "up 1h01m" in first
    assert "calls/s: 5.0" in render(cluster(20), cluster(10), elapsed=2.0)
    down = ClusterStatus("u", (ServerStatus("tcp://h:1", error="refused"),))
    assert "tcp://h:1: not answering: refused" in render(down)


def test_status_watch_refreshes_and_exits_cleanly_on_sigint(server: TcpServer, workers: Supervisor) -> None:
    with subprocess.Popen(cli("status", server.url, "--watch", "--interval", "0.2"), env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            seen: list[str] = []
            deadline = time.monotonic() + 30
            while sum("sw-" in line for line in seen) < 2 and time.monotonic() < deadline:
                seen.append(proc.stdout.readline())  # until both workers appear in a refresh
            assert sum("sw-" in line for line in seen) >= 2, seen
            assert any("calls/s" in line for line in seen), seen
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=10) == 0
            assert "Traceback" not in proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()


def test_ping_wait_retries_until_the_server_answers() -> None:
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    late: TcpServer | None = None
    with subprocess.Popen(cli("ping", url, "--wait", "30", "--timeout", "1"), env=ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stderr is not None
            assert "no answer yet" in proc.stderr.readline()  # it is retrying: now start the server
            late = TcpServer("127.0.0.1", port, key=KEY)
            late.start()
            out, _ = proc.communicate(timeout=30)
            assert proc.returncode == 0
            assert f"{url} answered in" in out and "after waiting" in out
        finally:
            if proc.poll() is None:
                proc.kill()
            if late is not None:
                late.stop()


def test_ping_wait_gives_up_when_the_time_is_up() -> None:
    began = time.monotonic()
    done = subprocess.run(cli("ping", f"tcp://127.0.0.1:{free_port()}", "--wait", "0.5", "--timeout", "0.5"),
                          env=ENV, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert time.monotonic() - began < 20


def start_server(scheme: str = "tcp") -> tuple[int, subprocess.Popen[str]]:
    return start_cli_server(lambda port: cli("server", f"{scheme}://127.0.0.1:{port}", "--heartbeat-interval", "0.2",
                                             "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT)), ENV)


def test_stop_with_workers_lets_running_calls_finish_then_everything_exits_for_good() -> None:
    port, server = start_server()
    url = f"tcp://127.0.0.1:{port}"
    worker = subprocess.Popen(cli("worker", url, "--processes", "2", "--heartbeat-interval", "0.2",
                                  "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT)), env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        with Gate() as gate, RemoteExecutor(transport=url, key=KEY, heartbeat_interval=0.2,
                                            heartbeat_timeout=HEARTBEAT_TIMEOUT, reconnect_timeout=1.0,
                                            max_retries=0) as ex:
            ex.wait_for_workers(2, timeout=30)
            running = ex.submit(wait_at_gate, gate.address, "held", "finished")
            gate.wait_started(1)
            wait_for(lambda: sum(w.running or 0 for w in cluster_status(url, key=KEY).workers) == 1,
                     what="the server to see the call running")
            stopped = subprocess.run(cli("stop", url, "--workers"), env=ENV, capture_output=True, text=True,
                                     timeout=30)
            assert stopped.returncode == 0, stopped.stderr
            assert "is stopping: 1 running call(s) finish first" in stopped.stdout  # still held at the gate
            gate.release()
            assert running.result(timeout=30) == "finished"  # it finished on the stopping server
        assert server.wait(timeout=30) == 0
        out, err = worker.communicate(timeout=30)
        assert worker.returncode == 0, err
        assert "stopped with its workers" in out
        assert "restarting" not in err
    finally:
        for proc in (worker, server):
            if proc.poll() is None:
                proc.kill()
            proc.communicate()  # reaps it and closes its pipes


@contextlib.contextmanager
def server_to_stop(scheme: str = "tcp") -> Iterator[tuple[str, Supervisor, Callable[[], None], subprocess.Popen[str]]]:
    """A job server (the command line's) with one worker that outlives it: its URL, the worker's supervisor,
    ``succeed()``, which waits for the server to exit after a ``stop`` and starts another on its port, and the
    server's process."""
    port, server = start_server(scheme)
    url = f"{scheme}://127.0.0.1:{port}"
    supervisor = Supervisor(url, 1, env={"REMOTE_EXECUTOR_KEY": KEY.decode()}, worker_args=FAST_HEARTBEAT, name="stay")
    supervisor.start()
    successors: list[Any] = []

    def succeed() -> None:
        assert server.wait(timeout=30) == 0
        settings = ServerSettings(key=KEY, heartbeat_interval=0.2, heartbeat_timeout=HEARTBEAT_TIMEOUT)
        successors.append(get_backend(scheme).server(url, settings))
        successors[0].start()

    try:
        yield url, supervisor, succeed, server
    finally:
        supervisor.stop()
        for successor in successors:
            successor.stop()
        if server.poll() is None:
            server.kill()
        server.communicate()


def test_a_call_the_stopped_server_never_started_runs_on_its_successor_without_counting_an_attempt() -> None:
    """With max_retries=0 a call lost with its server fails, since it may have run there; a call still
    queued when the server was told to stop cannot have, and the server says so: it runs on the next one."""
    options = {"key": KEY, "heartbeat_interval": 0.2, "heartbeat_timeout": HEARTBEAT_TIMEOUT,
               "reconnect_timeout": 30.0, "max_retries": 0}
    with server_to_stop() as (url, supervisor, succeed, _), Gate() as gate, \
            RemoteExecutor(transport=url, **options) as first, \
            RemoteExecutor(transport=url, **options) as second:  # type: ignore[arg-type]
        first.wait_for_workers(1, timeout=30)
        running = first.submit(wait_at_gate, gate.address, "held", "finished")
        gate.wait_started(1)
        queued = second.submit(os.getpid)  # the one worker is busy: it waits in the server's queue
        wait_for(lambda: cluster_status(url, key=KEY).queued.get("default") == 1,
                 what="the server to queue the second executor's call")
        stopped = subprocess.run(cli("stop", url), env=ENV, capture_output=True, text=True, timeout=30)
        assert stopped.returncode == 0, stopped.stderr
        gate.release()
        assert running.result(timeout=30) == "finished"  # the running call finishes first
        succeed()
        assert queued.result(timeout=30) == supervisor.pids()[0]  # run once, by the worker that came back


@pytest.mark.parametrize("scheme", ["tcp", pytest.param("zmq", marks=pytest.mark.zmq)])
def test_a_server_stopped_by_sigterm_tells_its_clients_which_calls_never_started(scheme: str) -> None:
    """SIGTERM (systemd stopping the service) stops the server at once: the call running there is lost with
    it, as in a crash, and fails with max_retries=0; the call still queued there cannot have run, and the
    server says so before it goes: it runs on the next server, with max_retries=0."""
    options = {"key": KEY, "heartbeat_interval": 0.2, "heartbeat_timeout": HEARTBEAT_TIMEOUT,
               "reconnect_timeout": 30.0, "max_retries": 0}
    with server_to_stop(scheme) as (url, supervisor, succeed, server), Gate() as gate, \
            RemoteExecutor(transport=url, **options) as first, \
            RemoteExecutor(transport=url, **options) as second:  # type: ignore[arg-type]
        first.wait_for_workers(1, timeout=30)
        running = first.submit(wait_at_gate, gate.address, "held", "finished")
        gate.wait_started(1)
        queued = second.submit(os.getpid)
        wait_for(lambda: cluster_status(url, key=KEY).queued.get("default") == 1,
                 what="the server to queue the second executor's call")
        server.send_signal(signal.SIGTERM)
        with pytest.raises(WorkerLostError):
            running.result(timeout=30)
        gate.release()  # the worker finishes it (for nobody) and reconnects
        succeed()
        assert queued.result(timeout=30) == supervisor.pids()[0]


def test_a_call_sent_into_the_slot_a_stopping_servers_last_result_freed_is_not_counted() -> None:
    """The executor's window is the one slot: its second call waits in this process, and goes to the server
    when the first call's result frees the slot, just as the stopped server ends. The server's last word to
    its clients says nothing of theirs runs there: the call runs on the successor, with max_retries=0."""
    with server_to_stop() as (url, supervisor, succeed, _), Gate() as gate, \
            RemoteExecutor(4, transport=url, key=KEY, heartbeat_interval=0.2, heartbeat_timeout=HEARTBEAT_TIMEOUT,
                           reconnect_timeout=30.0, max_retries=0) as ex:
        ex.wait_for_workers(1, timeout=30)
        running = ex.submit(wait_at_gate, gate.address, "held", "finished")
        gate.wait_started(1)
        waiting = ex.submit(os.getpid)
        assert waiting._state == "PENDING"  # type: ignore[attr-defined]  # (in this process: one slot)
        stopped = subprocess.run(cli("stop", url), env=ENV, capture_output=True, text=True, timeout=30)
        assert stopped.returncode == 0, stopped.stderr
        gate.release()
        assert running.result(timeout=30) == "finished"
        succeed()
        assert waiting.result(timeout=30) == supervisor.pids()[0]


def test_stop_without_workers_leaves_them_waiting_for_the_server(tmp_path: Path) -> None:
    port, server = start_server()
    url = f"tcp://127.0.0.1:{port}"
    supervisor = Supervisor(url, 1, env={"REMOTE_EXECUTOR_KEY": KEY.decode()}, worker_args=FAST_HEARTBEAT,
                            name="stay")
    supervisor.start()
    try:
        wait_for(lambda: len(cluster_status(url, key=KEY).workers) == 1, what="the worker to attach")
        pids = supervisor.pids()
        assert subprocess.run(cli("stop", url), env=ENV, capture_output=True, timeout=30).returncode == 0
        assert server.wait(timeout=30) == 0
        again = TcpServer("127.0.0.1", port, key=KEY, heartbeat_interval=0.2, heartbeat_timeout=HEARTBEAT_TIMEOUT)
        again.start()
        try:  # the same worker process reconnects to the server that took its place
            wait_for(lambda: [w.pid for w in cluster_status(url, key=KEY).workers] == pids,
                     what="the worker to reconnect")
        finally:
            again.stop()
    finally:
        supervisor.stop()
        if server.poll() is None:
            server.kill()
        server.communicate()


@pytest.mark.gearman
def test_stop_a_gearmand_lets_its_running_call_finish_then_it_exits(tmp_path: Path) -> None:
    from remote_executor.transports.gearman.gearmand import GearmandProcess

    with GearmandProcess(threads=2) as gearmand:
        url = gearmand.url
        refused = subprocess.run(cli("stop", url, "--workers"), env=ENV, capture_output=True, text=True, timeout=30)
        assert refused.returncode == 2 and "--workers is not available for gearman://" in refused.stderr
        assert gearmand.is_running()  # a refused command stopped nothing
        workers = Supervisor(url, 1, env={"REMOTE_EXECUTOR_KEY": KEY.decode()}, worker_args=FAST_HEARTBEAT,
                             name="gw")
        workers.start()
        try:
            with Gate() as gate, RemoteExecutor(transport=url, key=KEY, max_retries=0) as ex:
                ex.wait_for_workers(1, timeout=30)
                running = ex.submit(wait_at_gate, gate.address, "held", "finished")
                gate.wait_started(1)
                stopped = subprocess.run(cli("stop", url), env=ENV, capture_output=True, text=True, timeout=30)
                assert stopped.returncode == 0, stopped.stderr
                assert "is stopping: 1 running and 0 queued call(s) finish first" in stopped.stdout
                gate.release()
                assert running.result(timeout=30) == "finished"  # gearmand let it finish before it exited
            wait_for(lambda: not gearmand.is_running(), 30.0, "gearmand to exit")
        finally:
            workers.stop()
        status = subprocess.run(cli("status", url, "--timeout", "2"), env=ENV, capture_output=True, text=True,
                                timeout=30)
        assert status.returncode == 1, status.stdout


def test_stop_a_gearmand_over_the_network_without_a_key_is_refused_before_anything_is_sent() -> None:
    from remote_executor.errors import TransportError
    from remote_executor.transports.base import Options
    from remote_executor.transports.gearman import GearmanBackend

    with pytest.raises(TransportError, match=r"refusing to stop gearmand at 192\.0\.2\.1 without a key"):
        GearmanBackend().stop("gearman://192.0.2.1:4730", Options(connect_timeout=0.1), workers=False)
