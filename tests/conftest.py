"""Fixtures shared by the transport tests: a real job server and real worker processes on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest

from remote_executor.supervisor import Supervisor
from remote_executor.transports.tcp.server import TcpServer

FAST_HEARTBEAT = ("--heartbeat-interval", "0.2", "--heartbeat-timeout", "1.5")


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    """Poll a condition that no event announces (a process exiting, a server's view), with a deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def random_key() -> bytes:
    """A random binary key, any bytes: one starting or ending with a whitespace byte (about 1 in 21) must
    work too, since surrounding whitespace is never part of a key on any side."""
    return os.urandom(32)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


@pytest.fixture
def tcp_server() -> Iterator[TcpServer]:
    server = TcpServer("127.0.0.1", 0, heartbeat_interval=0.2, heartbeat_timeout=1.5)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def start_workers(tcp_server: TcpServer) -> Iterator[Callable[..., Supervisor]]:
    started: list[Supervisor] = []

    def start(count: int = 2, url: str | None = None, env: dict[str, str] | None = None) -> Supervisor:
        supervisor = Supervisor(url or tcp_server.url, count, env=env, worker_args=FAST_HEARTBEAT,
                                name="test-worker")
        supervisor.start()
        started.append(supervisor)
        return supervisor

    yield start
    for supervisor in started:
        for pid in supervisor.pids():  # a test may have left one stopped
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        supervisor.stop()



def start_cli_server(command: Callable[[int], list[str]], env: dict[str, str] | None = None,
                     ) -> tuple[int, subprocess.Popen[str]]:
    """``command(port)`` (a ``remote-executor server tcp://127.0.0.1:PORT ...`` line) on a free port, once it
    prints that it is serving: its port and process. The command line takes no port 0, so a port is probed
    first, and tried afresh if another process binds it before the server does."""
    for _ in range(5):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: a server that logs never blocks on it
            proc = subprocess.Popen(command(port), env=env, stdout=subprocess.PIPE, stderr=err, text=True)
            assert proc.stdout is not None
            if proc.stdout.readline().startswith("serving "):
                return port, proc
            proc.communicate()
            err.seek(0)
            error = err.read()
        assert "Address already in use" in error, error
    raise AssertionError("no free port in five tries")
