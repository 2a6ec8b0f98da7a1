"""Delivery guarantees across job-server loss, on our job server (tcp, zmq): every future resolves, no call
runs more than ``max_retries + 1`` times (counted by a side effect, not by our own logs), and with two job
servers losing one loses nothing.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

from remote_executor import RemoteExecutor
from remote_executor.errors import ServerUnavailableError, WorkerLostError
from remote_executor.supervisor import Supervisor
from remote_executor.transports.tcp.server import TcpServer
from remote_executor.transports.zmq.server import ZmqServer

from .conftest import FAST_HEARTBEAT, wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module

FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5}
SERVERS = {"tcp": TcpServer, "zmq": ZmqServer}


def record_then_sleep(path: str, tag: int, seconds: float) -> int:
    """The side effect that counts executions: one line per start, appended atomically."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{tag}\n".encode())
    finally:
        os.close(fd)
    time.sleep(seconds)
    return tag * 2


def executions(path: Path) -> collections.Counter[int]:
    lines = path.read_text().split() if path.exists() else []
    return collections.Counter(int(line) for line in lines)


class Servers:
    """Job servers of one scheme on loopback that a test can kill and start again on the same port."""

    def __init__(self, scheme: str, count: int) -> None:
        self.cls: Any = SERVERS[scheme]
        self.live: list[Any] = [self.cls("127.0.0.1", 0, **FAST) for _ in range(count)]
        self.ports = [server.port for server in self.live]
        for server in self.live:
            server.start()
        self.url = f"{scheme}://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def restart(self, index: int = 0) -> None:
        self.live[index].stop()
        self.live[index] = self.cls("127.0.0.1", self.ports[index], **FAST)
        self.live[index].start()

    def stop(self) -> None:
        for server in self.live:
            server.stop()


@pytest.fixture(params=["tcp", pytest.param("zmq", marks=pytest.mark.zmq)])
def scheme(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def cluster(scheme: str) -> Iterator[Callable[..., tuple[Servers, Supervisor]]]:
    made: list[tuple[Servers, Supervisor]] = []

    def make(servers: int = 1, workers: int = 2) -> tuple[Servers, Supervisor]:
        group = Servers(scheme, servers)
        supervisor = Supervisor(group.url, workers, worker_args=FAST_HEARTBEAT, name="delivery-worker")
        supervisor.start()
        made.append((group, supervisor))
        return group, supervisor

    yield make
    for group, supervisor in made:
        supervisor.stop()
        group.stop()


def settle(futures: list[Future[int]], bound: float) -> tuple[int, int]:
    """(results, worker-lost errors); fails if a future is unresolved after ``bound`` s or wrong."""
    _, pending = wait(futures, timeout=bound)
    assert not pending, f"{len(pending)} future(s) unresolved after {bound}s"
    results = lost = 0
    for future in futures:
        error = future.exception()
        if error is None:
            results += 1
        else:
            assert isinstance(error, WorkerLostError), repr(error)
            lost += 1
    return results, lost


def test_max_retries_zero_and_a_server_restart_resolve_every_future(
    cluster: Callable[..., tuple[Servers, Supervisor]], tmp_path: Path
) -> None:
    """The executor keeps submitting while the server restarts: nothing is stranded, nothing runs twice."""
    servers, _ = cluster()
    log = tmp_path / "runs"
    with RemoteExecutor(transport=servers.url, max_retries=0, reconnect_timeout=30, **FAST) as ex:
        futures = [ex.submit(record_then_sleep, str(log), i, 0.05) for i in range(60)]
        wait_for(lambda: sum(executions(log).values()) >= 5, what="the first calls to run")
        servers.restart()
        futures += [ex.submit(record_then_sleep, str(log), i, 0.05) for i in range(60, 120)]
        results, lost = settle(futures, bound=120)
    assert results + lost == 120 and results > 0
    assert max(executions(log).values()) == 1  # at most once
    for i, future in enumerate(futures):
        if future.exception() is None:
            assert future.result() == 2 * i


def test_server_restarts_do_not_reset_the_attempt_count(
    cluster: Callable[..., tuple[Servers, Supervisor]], tmp_path: Path
) -> None:
    """Restarted four times during 2-second calls, with max_retries=2: no call runs more than 3 times."""
    servers, _ = cluster(workers=4)
    log = tmp_path / "runs"
    with RemoteExecutor(transport=servers.url, max_retries=2, reconnect_timeout=30, **FAST) as ex:
        futures = [ex.submit(record_then_sleep, str(log), i, 2.0) for i in range(4)]
        for restart in range(4):
            started = sum(executions(log).values())
            # Three restarts can exhaust every call's retries when all four ran at once: then nothing restarts.
            wait_for(lambda started=started: sum(executions(log).values()) > started  # type: ignore[misc]
                     or all(f.done() for f in futures), timeout=60,
                     what=f"a call to (re)start before restart {restart + 1}")
            if all(f.done() for f in futures):
                break
            servers.restart()
        _, lost = settle(futures, bound=120)
    counts = executions(log)
    assert max(counts.values()) <= 3, counts
    assert lost > 0, counts  # four losses of a call that may run three times: some ran out of retries


def test_two_job_servers_survive_losing_one(
    cluster: Callable[..., tuple[Servers, Supervisor]], tmp_path: Path
) -> None:
    servers, _ = cluster(servers=2, workers=2)
    log = tmp_path / "runs"
    with RemoteExecutor(transport=servers.url, max_retries=2, **FAST) as ex:
        futures = [ex.submit(record_then_sleep, str(log), i, 0.05) for i in range(80)]
        wait_for(lambda: sum(executions(log).values()) >= 10, what="calls to run through the first server")
        servers.live[0].stop()  # the server the client and the workers were using
        start = time.monotonic()
        futures += [ex.submit(record_then_sleep, str(log), i, 0.05) for i in range(80, 160)]
        results, lost = settle(futures, bound=120)
        elapsed = time.monotonic() - start
    assert (results, lost) == (160, 0)
    assert [f.result() for f in futures] == [2 * i for i in range(160)]
    assert max(executions(log).values()) <= 2  # a call lost with its server ran at most once more
    assert elapsed < 60


def test_a_worker_serves_every_listed_server(cluster: Callable[..., tuple[Servers, Supervisor]]) -> None:
    servers, _ = cluster(servers=2, workers=1)
    for port in servers.ports:
        with RemoteExecutor(transport=f"{servers.url.split('://')[0]}://127.0.0.1:{port}", **FAST) as ex:
            assert ex.submit(pow, 2, 8).result(timeout=60) == 256


@pytest.mark.parametrize("noticed", [True, False], ids=["reconnecting", "not-noticed-yet"])
def test_a_worker_whose_server_is_down_exits_promptly_on_sigterm(scheme: str, noticed: bool) -> None:
    """The job server dies, then SIGTERM ends the worker command at once: whether the worker is reconnecting
    already, or has not noticed yet (on zmq nothing tells it before its heartbeat timeout, a minute here:
    the drain it sends is never answered, and it exits without waiting that long)."""
    servers = Servers(scheme, 1)
    heartbeats = FAST_HEARTBEAT if noticed else ["--heartbeat-interval", "0.2", "--heartbeat-timeout", "60"]
    cli = [sys.executable, "-m", "remote_executor.cli", "worker", servers.url, "--processes", "1", *heartbeats]
    proc = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: servers.live[0].scheduler.capacity == 1, what="the worker to attach")
        servers.stop()
        assert proc.stderr is not None
        while noticed and (line := proc.stderr.readline()) and "connecting to" not in line:
            pass  # until the worker says it is reconnecting (the per-test timeout bounds this)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, errors = proc.communicate(timeout=30)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        servers.stop()
    assert proc.returncode == 0, errors
    assert elapsed < 10, f"{elapsed:.1f}s from SIGTERM to exit:\n{errors}"


def test_reconnecting_to_an_address_that_never_answers_gives_up_at_the_reconnect_timeout(scheme: str) -> None:
    """Each reconnection attempt is bounded by what is left of reconnect_timeout, not by connect_timeout: an
    address that accepts and never answers (a stopped server, its kernel still accepting) fails the calls in
    about reconnect_timeout, not in a whole connect_timeout (30 s here) or more."""
    servers = Servers(scheme, 1)
    try:
        with RemoteExecutor(transport=servers.url, reconnect_timeout=2, connect_timeout=30, **FAST) as ex:
            future = ex.submit(abs, -1)  # no worker: it waits
            servers.stop()
            with socket.socket() as silent:
                silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                silent.bind(("127.0.0.1", servers.ports[0]))
                silent.listen()
                start = time.monotonic()
                with pytest.raises(ServerUnavailableError, match="could not reconnect within 2s"):
                    future.result(timeout=120)
                elapsed = time.monotonic() - start
    finally:
        servers.stop()
    assert elapsed < 10, f"{elapsed:.1f}s"


def lost_twice_around_a_hang(path: str, seconds: float) -> int:
    """Its worker dies on its first and third runs; its second run hangs (while the test restarts the job
    server under it)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"1\n")
    finally:
        os.close(fd)
    runs = len(Path(path).read_text().split())
    if runs in (1, 3):
        os._exit(1)
    time.sleep(seconds)
    return runs


def test_worker_lost_error_names_the_losses_on_every_server(
    cluster: Callable[..., tuple[Servers, Supervisor]], tmp_path: Path
) -> None:
    """Lost with a worker, then with the job server, then with a worker of the next server: the error
    names all three, in order, not only those of the server that gave up."""
    servers, _ = cluster(workers=2)  # the third run on the worker that is not busy with the second
    log = tmp_path / "runs"
    with RemoteExecutor(transport=servers.url, max_retries=2, reconnect_timeout=30, **FAST) as ex:
        future = ex.submit(lost_twice_around_a_hang, str(log), 30.0)
        wait_for(lambda: len(log.read_text().split()) >= 2 if log.exists() else False, timeout=60,
                 what="the second run")
        servers.restart()
        error = future.exception(timeout=60)
    assert isinstance(error, WorkerLostError), repr(error)
    assert len(log.read_text().split()) == 3
    assert len(error.workers) == 3, error.workers
    first, server, last = error.workers
    assert first.startswith("delivery-worker") and last.startswith("delivery-worker"), error.workers
    assert server.endswith("(connection lost)") and str(servers.ports[0]) in server, error.workers
    assert "3 time(s)" in str(error)
