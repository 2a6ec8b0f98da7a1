"""`remote-executor cluster start -n N` / `status` / `stop`: a persistent cluster on this machine, found by
remote_executor.connect() without a URL; and the discovery order (argument, environment, cluster file)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from remote_executor import connect
from remote_executor.discovery import discover
from remote_executor.errors import TransportError
from remote_executor.supervisor import Supervisor
from remote_executor.transports.tcp.server import TcpServer
from tests.conftest import pid_alive, wait_for

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    for name in ("REMOTE_EXECUTOR_ADDRESS", "REMOTE_EXECUTOR_KEY_FILE", "REMOTE_EXECUTOR_KEY"):
        monkeypatch.delenv(name, raising=False)
    state = tmp_path / "remote_executor" / "cluster.json"
    yield state
    if state.exists():  # a failed test's cluster: stop it, and its workers with it
        pid = json.loads(state.read_text())["pid"]
        if pid == os.getpid():  # a made-up cluster file
            return
        cli("cluster", "stop", "--timeout", "30")
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "remote_executor.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(SRC)})


@pytest.mark.parametrize("transport", ["tcp", "zmq", "gearman"])
def test_start_connect_status_stop(config: Path, transport: str) -> None:
    started = cli("cluster", "start", "-n", "2", "--transport", transport)
    assert started.returncode == 0, started.stderr
    assert "remote_executor.connect()" in started.stdout
    state = json.loads(config.read_text())
    assert state["url"].startswith(f"{transport}://127.0.0.1:") and pid_alive(state["pid"])
    assert cli("cluster", "start", "-n", "1").returncode == 1  # one cluster per config directory

    with connect() as executor:
        pids = set(executor.map(_pid, range(20)))
    assert 1 <= len(pids) <= 2 and os.getpid() not in pids

    status = cli("cluster", "status")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["url"] == state["url"]

    stopped = cli("cluster", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not config.exists()
    wait_for(lambda: not pid_alive(state["pid"]) and not any(pid_alive(pid) for pid in pids), timeout=30,
             what="the cluster and its workers to exit")


def test_discovery_order(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TransportError, match="cluster start"):
        discover()
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"url": "tcp://127.0.0.1:1", "key_file": "/k", "pid": os.getpid(),
                                  "options": {"tls_ca": "/ca.pem"}}))
    with pytest.raises(TransportError, match="not running"):  # this test process is no cluster
        discover()
    monkeypatch.setenv("REMOTE_EXECUTOR_ADDRESS", "zmq://127.0.0.1:2")
    monkeypatch.setenv("REMOTE_EXECUTOR_KEY_FILE", "/env.key")
    assert discover() == {"transport": "zmq://127.0.0.1:2", "key_file": "/env.key"}
    assert discover("tcp://127.0.0.1:3") == {"transport": "tcp://127.0.0.1:3"}


def test_connect_uses_the_environment(config: Path, monkeypatch: pytest.MonkeyPatch, tcp_server: TcpServer,
                                      start_workers: Callable[..., Supervisor]) -> None:
    start_workers(1)
    monkeypatch.setenv("REMOTE_EXECUTOR_ADDRESS", tcp_server.url)
    with connect() as executor:
        assert repr(executor).startswith(f"<RemoteExecutor {tcp_server.url} ")
        assert executor.submit(pow, 2, 3).result(timeout=30) == 8


def _pid(_: object) -> int:
    return os.getpid()


@pytest.mark.parametrize("transport", ["tcp", "zmq"])
def test_stopping_the_job_server_ends_the_cluster(config: Path, transport: str) -> None:
    # `remote-executor stop URL` (with the cluster's key) stops its job server: the cluster process must not
    # stay behind with workers reconnecting to nothing, and its record goes with it.
    assert cli("cluster", "start", "-n", "1", "--transport", transport).returncode == 0
    state = json.loads(config.read_text())
    with connect() as executor:
        worker_pid = executor.submit(_pid, 0).result(timeout=60)
    stopped = cli("stop", state["url"], "--key-file", state["key_file"])
    assert stopped.returncode == 0, stopped.stderr
    wait_for(lambda: not pid_alive(state["pid"]) and not pid_alive(worker_pid), timeout=30,
             what="the cluster and its worker to exit after its job server was stopped")
    assert not config.exists()
