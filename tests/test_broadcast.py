"""``RemoteExecutor.broadcast`` on real job servers and real worker processes: once per worker attached now,
outcomes by worker name, a lost worker reported (never retried elsewhere), the typical uses (logging level,
a warm cache, loading code and ``importlib.reload``), and gearman's clear refusal."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import wait
from pathlib import Path
from typing import Any

import pytest

from remote_executor import RemoteExecutor
from remote_executor.errors import CallTimeoutError, WorkerLostError
from remote_executor.supervisor import Supervisor
from remote_executor.transports.tcp.server import TcpServer

from . import bcast_tasks as tasks
from .conftest import FAST_HEARTBEAT, wait_for

KEY = b"broadcast-test-key-" + b"k" * 13


class Cluster:
    """A job server of one scheme, and supervisors of worker processes started on demand."""

    def __init__(self, scheme: str) -> None:
        if scheme == "zmq":
            from remote_executor.transports.zmq.server import ZmqServer

            self.server: Any = ZmqServer("127.0.0.1", 0, key=KEY, heartbeat_interval=0.2, heartbeat_timeout=1.5)
        else:
            self.server = TcpServer("127.0.0.1", 0, key=KEY, heartbeat_interval=0.2, heartbeat_timeout=1.5)
        self.server.start()
        self.url: str = self.server.url
        self.supervisors: list[Supervisor] = []

    def workers(self, count: int, name: str = "bw", restart: bool = True) -> Supervisor:
        supervisor = Supervisor(self.url, count, env={"REMOTE_EXECUTOR_KEY": KEY.decode()},
                                worker_args=FAST_HEARTBEAT, name=name, restart=restart)
        supervisor.start()
        self.supervisors.append(supervisor)
        return supervisor

    def executor(self, **kwargs: Any) -> RemoteExecutor:
        return RemoteExecutor(transport=self.url, key=KEY, heartbeat_interval=0.2, heartbeat_timeout=1.5, **kwargs)

    def stop(self) -> None:
        for supervisor in self.supervisors:
            supervisor.stop()
        self.server.stop()


@pytest.fixture(params=["tcp", pytest.param("zmq", marks=pytest.mark.zmq)])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    made = Cluster(str(request.param))
    yield made
    made.stop()


@pytest.fixture
def tcp_cluster() -> Iterator[Cluster]:
    made = Cluster("tcp")
    yield made
    made.stop()


def outcomes(futures: dict[str, Any]) -> dict[str, Any]:
    return {name: future.result(timeout=30) for name, future in futures.items()}


def test_broadcast_runs_once_on_every_worker_and_keys_outcomes_by_worker_name(cluster: Cluster) -> None:
    supervisor = cluster.workers(3)
    with cluster.executor() as ex:
        ex.wait_for_workers(3, timeout=30)
        pids = outcomes(ex.broadcast(os.getpid))
        assert sorted(pids.values()) == sorted(supervisor.pids())  # each process once
        status = ex.status()
        assert sorted(pids) == sorted(w.name for w in status.workers)  # the names status shows
        assert {w.name: w.pid for w in status.workers} == pids
        assert all(name.startswith("bw-") for name in pids)


def test_broadcast_passes_every_argument_on_and_reports_each_exception(cluster: Cluster) -> None:
    cluster.workers(2)
    with cluster.executor() as ex:
        ex.wait_for_workers(2, timeout=30)
        got = outcomes(ex.broadcast(tasks.echo, 1, timeout=5, worker="w", fn="f"))
        assert list(got.values()) == [((1,), {"timeout": 5, "worker": "w", "fn": "f"})] * 2
        futures = ex.broadcast(tasks.fail, "boom")
        assert len(futures) == 2
        for future in futures.values():
            with pytest.raises(ValueError, match="boom"):
                future.result(timeout=30)


def test_typical_uses_logging_level_and_a_warm_cache(tcp_cluster: Cluster) -> None:
    tcp_cluster.workers(2)
    with tcp_cluster.executor() as ex:
        ex.wait_for_workers(2, timeout=30)
        wait(list(ex.broadcast(tasks.set_level, "app", logging.DEBUG).values()))
        assert set(outcomes(ex.broadcast(tasks.level, "app")).values()) == {logging.DEBUG}
        outcomes(ex.broadcast(tasks.warm, "model", {"weights": [1, 2, 3]}))
        # every later call, wherever it runs, finds the cache warm
        assert list(ex.map(tasks.cached, ["model"] * 8)) == [{"weights": [1, 2, 3]}] * 8


def test_typical_use_load_code_then_importlib_reload(tcp_cluster: Cluster, tmp_path: Path) -> None:
    name = f"bcast_mod_{uuid.uuid4().hex}"
    source = tmp_path / f"{name}.py"
    source.write_text("VALUE = 1\n")
    tcp_cluster.workers(2)

    def value() -> int:
        return int(importlib.import_module(name).VALUE)

    def reload() -> int:
        return int(importlib.reload(sys.modules[name]).VALUE)

    with tcp_cluster.executor() as ex:
        ex.wait_for_workers(2, timeout=30)
        outcomes(ex.broadcast(tasks.add_path, str(tmp_path)))
        assert set(outcomes(ex.broadcast(value)).values()) == {1}
        source.write_text(textwrap.dedent("""\
            # changed: a new version of the code
            VALUE = 22
            """))
        assert set(outcomes(ex.broadcast(reload)).values()) == {22}
        assert set(ex.map(lambda _: value(), range(6))) == {22}


def test_a_worker_lost_during_the_broadcast_is_reported_and_not_retried_elsewhere(tcp_cluster: Cluster) -> None:
    supervisor = tcp_cluster.workers(3, restart=False)
    with tcp_cluster.executor(max_retries=2) as ex:
        ex.wait_for_workers(3, timeout=30)
        pids = outcomes(ex.broadcast(os.getpid))
        victim_name, victim = next(iter(pids.items()))
        futures = ex.broadcast(tasks.exit_if, victim)
        assert sorted(futures) == sorted(pids)
        with pytest.raises(WorkerLostError) as lost:
            futures[victim_name].result(timeout=30)
        assert lost.value.workers == (victim_name,)
        assert "never retried" in str(lost.value)
        others = {name: f.result(timeout=30) for name, f in futures.items() if name != victim_name}
        assert others == {name: pid for name, pid in pids.items() if name != victim_name}  # ran once each
        wait_for(lambda: len(supervisor.pids()) == 2 or supervisor.exits != [], what="the victim to exit")
        assert sorted(outcomes(ex.broadcast(os.getpid)).values()) == sorted(p for p in pids.values() if p != victim)


def test_workers_that_attach_later_do_not_run_an_earlier_broadcast(tcp_cluster: Cluster) -> None:
    tcp_cluster.workers(1, name="early")
    with tcp_cluster.executor() as ex:
        ex.wait_for_workers(1, timeout=30)
        assert list(outcomes(ex.broadcast(tasks.count_run)).values()) == [1]
        tcp_cluster.workers(1, name="late")
        ex.wait_for_workers(2, timeout=30)
        runs = outcomes(ex.broadcast(tasks.runs))
        assert sorted((name.split("-")[0], count) for name, count in runs.items()) == [("early", 1), ("late", 0)]


def test_no_worker_attached_gives_an_empty_dict(tcp_cluster: Cluster) -> None:
    with tcp_cluster.executor(no_workers_warning=None) as ex:
        assert ex.broadcast(os.getpid) == {}


def test_broadcast_stays_outside_the_executors_window(tcp_cluster: Cluster) -> None:
    tcp_cluster.workers(2)
    with tcp_cluster.executor(max_workers=1) as ex:
        ex.wait_for_workers(2, timeout=30)
        futures = ex.broadcast(os.getpid)  # two calls although max_workers=1
        assert len(futures) == 2
        assert len(ex._core.in_flight) == 0 and len(ex._core.pending) == 0
        assert len(set(outcomes(futures).values())) == 2
        assert ex.submit(os.getpid).result(timeout=30) in futures_values(futures)
        assert ex._core.outstanding == 0


def futures_values(futures: dict[str, Any]) -> set[Any]:
    return {f.result() for f in futures.values()}


def test_a_broadcast_with_a_time_limit_stops_each_worker_at_it(tcp_cluster: Cluster) -> None:
    import time

    tcp_cluster.workers(2)
    with tcp_cluster.executor() as ex:
        ex.wait_for_workers(2, timeout=30)
        futures = ex.with_options(timeout=0.5).broadcast(time.sleep, 60)
        for future in futures.values():
            with pytest.raises(CallTimeoutError):
                future.result(timeout=30)


def test_the_embedded_cluster_broadcasts_to_its_worker_processes() -> None:
    with RemoteExecutor(max_workers=2) as ex:
        pids = outcomes(ex.broadcast(os.getpid))
        assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
        assert sorted(w.name for w in ex.status().workers) == sorted(pids)


@pytest.mark.gearman
def test_gearman_refuses_broadcast_saying_why() -> None:
    from remote_executor.transports.gearman.gearmand import GearmandProcess

    gearmand = GearmandProcess(threads=1).start()
    try:
        with RemoteExecutor(transport=gearmand.url, no_workers_warning=None) as ex, \
                pytest.raises(NotImplementedError, match="cannot address one worker"):
            ex.broadcast(os.getpid)
    finally:
        gearmand.stop()


def test_a_call_that_cannot_be_pickled_fails_the_broadcast_at_once(tcp_cluster: Cluster) -> None:
    from remote_executor.errors import SerializationError

    with tcp_cluster.executor(no_workers_warning=None) as ex:
        unpicklable: Callable[[], None] = lambda: None  # noqa: E731
        with pytest.raises(SerializationError):
            ex.broadcast(tasks.echo, unpicklable.__globals__)  # a module's globals: not picklable
