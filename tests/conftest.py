"""Fixtures shared by the transport tests: a real job server and real worker processes on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
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


@pytest.fixture(autouse=True, scope="session")
def _per_user_key_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Clients, servers and workers given no key share the per-user key file: a temporary one for the whole
    session (session-wide, so module-scoped clusters use it too), never the real home directory's.
    Everything else kept under $XDG_CONFIG_HOME (cluster records) goes there too."""
    if os.environ.get("REMOTE_EXECUTOR_KEY_FILE", "").startswith(str(tmp_path_factory.getbasetemp())):
        yield  # the other test tree's conftest already did it for this session: one key file for all
        return
    with pytest.MonkeyPatch.context() as patch:
        config = tmp_path_factory.mktemp("user-config")
        patch.setenv("REMOTE_EXECUTOR_KEY_FILE", str(config / "remote_executor" / "key"))
        patch.setenv("XDG_CONFIG_HOME", str(config))  # a test that unsets the one still misses ~/.config
        yield


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

