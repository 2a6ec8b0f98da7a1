"""Named worker pools on our job server (tcp, zmq) and on gearmand: a call runs only on a worker of its
executor's pool, a call for a pool without workers waits for one, and status shows the pools. Real servers,
real worker processes (the same command line users run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from remote_executor import RemoteExecutor
from remote_executor.errors import TransportError
from remote_executor.supervisor import Supervisor
from remote_executor.transports import get_backend
from remote_executor.transports.base import Options
from remote_executor.transports.gearman.gearmand import GearmandProcess
from remote_executor.transports.tcp.server import TcpServer
from remote_executor.transports.zmq.server import ZmqServer

from .conftest import FAST_HEARTBEAT, wait_for

SRC = str(Path(__file__).resolve().parents[1] / "src")
KEY = b"pool-test-key-" + b"k" * 18


class Cluster:
    """A job server (or gearmand) of one scheme and worker supervisors started per pool."""

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme
        self.gearmand: GearmandProcess | None = None
        self.server: Any = None
        if scheme == "gearman":
            self.gearmand = GearmandProcess(threads=2).start()
            self.url = self.gearmand.url
        else:
            self.server = (TcpServer if scheme == "tcp" else ZmqServer)("127.0.0.1", 0, key=KEY)
            self.server.start()
            self.url = self.server.url
        self.supervisors: list[Supervisor] = []

    def workers(self, pool: str | None, count: int = 1) -> Supervisor:
        args = FAST_HEARTBEAT + (("--pool", pool) if pool else ())
        env = {"REMOTE_EXECUTOR_KEY": KEY.decode()}
        supervisor = Supervisor(self.url, count, env=env, worker_args=args, name=f"w-{pool or 'default'}")
        supervisor.start()
        self.supervisors.append(supervisor)
        return supervisor

    def stop(self) -> None:
        for supervisor in self.supervisors:
            supervisor.stop()
        if self.server is not None:
            self.server.stop()
        if self.gearmand is not None:
            self.gearmand.stop()


@pytest.fixture(params=["tcp", pytest.param("zmq", marks=pytest.mark.zmq),
                        pytest.param("gearman", marks=pytest.mark.gearman)])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    made = Cluster(str(request.param))
    yield made
    made.stop()


def executor(url: str, **kwargs: Any) -> RemoteExecutor:
    return RemoteExecutor(transport=url, key=KEY, heartbeat_interval=0.2, heartbeat_timeout=1.5, **kwargs)


def test_calls_run_only_on_workers_of_their_pool(cluster: Cluster) -> None:
    gpu = cluster.workers("gpu", count=2)
    cpu = cluster.workers(None, count=2)
    with executor(f"{cluster.url}/gpu") as ex:
        pids = {ex.submit(os.getpid).result(timeout=60) for _ in range(20)}
    with executor(cluster.url) as ex:  # no pool: the default pool
        default_pids = {ex.submit(os.getpid).result(timeout=60) for _ in range(20)}
    assert pids and pids <= set(gpu.pids())
    assert default_pids and default_pids <= set(cpu.pids())


def test_the_pool_option_picks_the_pool_too(cluster: Cluster) -> None:
    gpu = cluster.workers("gpu")
    cluster.workers(None)
    with executor(cluster.url, pool="gpu") as ex:
        assert {ex.submit(os.getpid).result(timeout=60) for _ in range(10)} <= set(gpu.pids())


def test_a_call_for_a_pool_without_workers_waits_for_one(cluster: Cluster) -> None:
    cluster.workers(None)
    with executor(f"{cluster.url}/late", max_workers=1) as ex:
        future = ex.submit(os.getpid)
        assert not future.done()
        late = cluster.workers("late")
        wait_for(lambda: future.done(), timeout=60, what="the call to run once its pool has a worker")
        assert future.result() in late.pids()


def test_a_bad_pool_name_is_a_clear_error(cluster: Cluster) -> None:
    with pytest.raises(TransportError, match="bad pool name"):
        executor(f"{cluster.url}/no such pool")


@pytest.mark.parametrize("scheme", ["tcp", pytest.param("zmq", marks=pytest.mark.zmq)])
def test_status_shows_the_pools(scheme: str) -> None:
    made = Cluster(scheme)
    try:
        made.workers("gpu", count=2)
        made.workers(None)
        status: Callable[[], dict[str, Any]] = lambda: get_backend(scheme).status(  # noqa: E731
            made.url, Options(key=KEY))
        wait_for(lambda: len(status()["workers"]) == 3, timeout=60, what="three workers to attach")
        pools = status()["pools"]
        assert pools["gpu"]["workers"] == 2 and pools["default"]["workers"] == 1
        assert sorted(w["pool"] for w in status()["workers"]) == ["default", "gpu", "gpu"]
        done = subprocess.run([sys.executable, "-m", "remote_executor.cli", "status", made.url],
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": SRC, "REMOTE_EXECUTOR_KEY": KEY.decode()})
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["pools"]["gpu"]["capacity"] == 2
    finally:
        made.stop()


def test_the_worker_command_rejects_a_bad_pool_name() -> None:
    done = subprocess.run([sys.executable, "-m", "remote_executor.cli", "worker", "tcp://127.0.0.1:9", "--pool",
                           "a b"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": SRC, "REMOTE_EXECUTOR_KEY": KEY.decode()})
    assert done.returncode == 2  # a mistake in the command line
    assert "bad pool name 'a b'" in done.stderr
    assert "Traceback" not in done.stderr
