"""Fault scenarios for remote executors: workers killed, frozen or poisoned, job servers restarted or gone.

:class:`FaultTests` holds the scenarios as pytest test methods. A backend runs them by subclassing it and
providing a ``fault_cluster`` fixture that returns a :class:`FaultCluster`: a running job server that
``RemoteExecutor(transport=cluster.url)`` reaches, and that the scenario may stop and start again::

    import pytest
    from remote_executor.conformance import FaultTests

    class TestMyTransportFaults(FaultTests):
        unsupported = {"sigstop": "my transport has no heartbeat"}   # only what it really cannot do

        @pytest.fixture
        def fault_cluster(self):
            cluster = MyCluster()          # starts the job server; see FaultCluster for what it offers
            yield cluster
            cluster.close()                # stops the job server, also when the scenario failed

The scenarios start the worker processes themselves (:class:`~remote_executor.supervisor.Supervisor`
children running ``python -m remote_executor.worker URL``, and ``remote-executor worker URL``) and stop
every one of them, and every executor they made, when the test ends, whether it passed or failed.

A scenario the backend cannot support is named, with the reason, in :attr:`FaultTests.unsupported`. That
scenario then passes by checking the declaration (and, for ``"sigstop"``, that the cluster indeed has no
heartbeat) instead of being skipped: a declared limitation is visible in the backend's test class and in
the test report, never silently skipped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import BrokenExecutor
from typing import TYPE_CHECKING, Any, ClassVar, Final, Protocol

import pytest

from ..errors import ServerUnavailableError, WorkerLostError
from ..supervisor import Supervisor
from . import tasks
from ._base import TIMEOUT
from .gate import Gate

if TYPE_CHECKING:
    from ..executor import RemoteExecutor

__all__ = ["SCENARIOS", "WORKER_NAME", "Connect", "FaultCluster", "FaultTests", "StartWorkers"]

SCENARIOS: Final = frozenset(
    {"sigkill_retry", "sigkill_no_retry", "poison", "sigstop", "server_restart", "reconnect_timeout", "drain"}
)
"""The names :attr:`FaultTests.unsupported` may use, one per scenario."""

WORKER_NAME: Final = "fault-worker"
"""The ``--name`` prefix of the worker processes the scenarios start (``fault-worker-0``, ...)."""

_LOST_SLOWER: Final = 2.0  # how much later than heartbeat_timeout a loss may be noticed on a loaded machine
_POISON_TIMEOUT: Final = 60.0  # three crashes, each followed by a supervisor restart with back-off


class FaultCluster(Protocol):
    """What a backend's ``fault_cluster`` fixture returns: a running job server, and how to reach it.

    The fixture starts the job server before the scenario and stops it afterwards (also after a failed
    scenario, and also when the scenario left it stopped). Worker processes inherit the test process's
    environment, so a key or token for them goes into ``os.environ`` (``monkeypatch.setenv``).
    """

    @property
    def url(self) -> str:
        """What ``RemoteExecutor(transport=...)`` and ``python -m remote_executor.worker`` connect to."""

    @property
    def executor_options(self) -> Mapping[str, Any]:
        """Keyword arguments for every ``RemoteExecutor`` (fast heartbeats, a key, ...); may be empty."""

    @property
    def worker_args(self) -> Sequence[str]:
        """Command-line options for every worker (``("--heartbeat-interval", "0.2", ...)``); may be empty."""

    @property
    def heartbeat(self) -> tuple[float, float] | None:
        """``(interval, timeout)``: the heartbeat the job server and workers were configured with.

        A worker that stays silent for ``timeout`` seconds is declared lost. ``None``: the backend has no
        heartbeat, so only a closed connection tells that a worker is gone (declare ``"sigstop"`` in
        :attr:`FaultTests.unsupported`).
        """

    def stop_server(self) -> None:
        """Stop the job server now: its connections close and the calls it held are lost with it."""

    def start_server(self) -> None:
        """Start the job server again on the same address; clients and workers are expected to reconnect."""


class StartWorkers(Protocol):
    def __call__(self, count: int) -> Supervisor: ...


class Connect(Protocol):
    def __call__(self, **kwargs: Any) -> RemoteExecutor: ...


def _pid(report: str) -> int:
    """The pid in a ``"<token> <pid>"`` report of :func:`tasks.report_pid_at_gate`."""
    return int(report.rsplit(" ", 1)[1])


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll a condition that no event announces (a supervisor's restart count), with a deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


class FaultTests:
    """The fault scenarios; subclass it and provide a ``fault_cluster`` fixture (see :class:`FaultCluster`)."""

    unsupported: ClassVar[Mapping[str, str]] = {}
    """Scenario name (one of :data:`SCENARIOS`) -> why this backend cannot support it."""

    # --- fixtures ----------------------------------------------------------------------------------------

    @pytest.fixture
    def gate(self) -> Iterator[Gate]:
        with Gate() as gate:
            yield gate

    @pytest.fixture
    def start_workers(self, fault_cluster: FaultCluster) -> Iterator[StartWorkers]:
        """``start_workers(count)``: a started :class:`Supervisor` of ``count`` workers, stopped at the end."""
        started: list[Supervisor] = []

        def start(count: int) -> Supervisor:
            supervisor = Supervisor(fault_cluster.url, count, worker_args=tuple(fault_cluster.worker_args),
                                    name=WORKER_NAME)
            started.append(supervisor)
            supervisor.start()
            return supervisor

        yield start
        for supervisor in started:
            for pid in supervisor.pids():  # a scenario may have left one frozen
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            supervisor.stop()

    @pytest.fixture
    def connect(self, fault_cluster: FaultCluster, start_workers: StartWorkers, gate: Gate) -> Iterator[Connect]:
        """``connect(**kwargs)``: a ``RemoteExecutor`` on the cluster, shut down before the workers stop."""
        from .. import RemoteExecutor

        made: list[RemoteExecutor] = []

        def connect(**kwargs: Any) -> RemoteExecutor:
            executor = RemoteExecutor(transport=fault_cluster.url, **{**fault_cluster.executor_options, **kwargs})
            made.append(executor)
            return executor

        yield connect
        gate.release()  # held calls must not keep shutdown(wait=True) waiting
        for executor in made:
            executor.shutdown(wait=True, cancel_futures=True)

    # --- declared limitations ----------------------------------------------------------------------------

    def _declared_unsupported(self, scenario: str) -> bool:
        """True (after checking the declaration) when this backend declared ``scenario`` unsupported."""
        assert scenario in SCENARIOS
        reason = self.unsupported.get(scenario)
        if reason is None:
            return False
        assert isinstance(reason, str) and reason.strip(), f"unsupported[{scenario!r}] must say why"
        return True

    def test_declared_limitations_name_known_scenarios(self) -> None:
        unknown = set(self.unsupported) - SCENARIOS
        assert not unknown, f"unsupported names no scenario: {sorted(unknown)}; the scenarios are {sorted(SCENARIOS)}"
        for scenario, reason in self.unsupported.items():
            assert isinstance(reason, str) and reason.strip(), f"unsupported[{scenario!r}] must say why"

    # --- a worker dies mid-call --------------------------------------------------------------------------

    @pytest.mark.parametrize("max_retries", [1, 3])
    def test_sigkilled_worker_call_is_retried_on_another(
        self, fault_cluster: FaultCluster, start_workers: StartWorkers, connect: Connect, gate: Gate,
        max_retries: int,
    ) -> None:
        if self._declared_unsupported("sigkill_retry"):
            return
        start_workers(2)
        with connect(max_retries=max_retries) as executor:
            future = executor.submit(tasks.report_pid_at_gate, gate.address, "held")
            first = _pid(gate.wait_started(1)[0])
            killed = time.monotonic()
            os.kill(first, signal.SIGKILL)
            second = _pid(gate.wait_started(2)[1])  # resubmitted, and running again on another worker
            if fault_cluster.heartbeat is not None:  # a silent death is noticed by the heartbeat at the latest
                assert time.monotonic() - killed < fault_cluster.heartbeat[1] + _LOST_SLOWER
            gate.release()
            assert future.result(timeout=TIMEOUT) == second
            assert second not in (first, os.getpid())
            assert len(gate.started) == 2  # ran twice: once on the killed worker, once on the other

    def test_sigkilled_worker_without_retries_fails_with_worker_lost(
        self, start_workers: StartWorkers, connect: Connect, gate: Gate
    ) -> None:
        if self._declared_unsupported("sigkill_no_retry"):
            return
        start_workers(2)
        with connect(max_retries=0) as executor:
            doomed = executor.submit(tasks.report_pid_at_gate, gate.address, "held")
            os.kill(_pid(gate.wait_started(1)[0]), signal.SIGKILL)
            with pytest.raises(WorkerLostError) as info:
                doomed.result(timeout=TIMEOUT)
            assert len(info.value.workers) == 1 and info.value.workers[0].startswith(f"{WORKER_NAME}-")
            assert "1 time(s)" in str(info.value)
            gate.release()  # a job server that requeues on its own (gearmand without -j) ran it again
            assert executor.submit(tasks.square, 3).result(timeout=TIMEOUT) == 9  # the executor goes on

    def test_poison_call_fails_after_max_retries_and_workers_are_replaced(
        self, start_workers: StartWorkers, connect: Connect
    ) -> None:
        if self._declared_unsupported("poison"):
            return
        supervisor = start_workers(2)
        with connect(max_retries=2) as executor:
            with pytest.raises(WorkerLostError) as info:
                executor.submit(tasks.kill_own_process).result(timeout=_POISON_TIMEOUT)
            assert len(info.value.workers) == 3  # ran three times, lost three workers
            assert all(name.startswith(f"{WORKER_NAME}-") for name in info.value.workers)
            assert "3 time(s)" in str(info.value)
            assert list(executor.map(abs, [-1, -2, -3], timeout=TIMEOUT)) == [1, 2, 3]  # the fleet was restored
        _wait_for(lambda: supervisor.restarts >= 3, "the three killed workers to be replaced")

    # --- a worker hangs ----------------------------------------------------------------------------------

    def test_sigstopped_worker_is_declared_lost_after_the_heartbeat_timeout(
        self, fault_cluster: FaultCluster, start_workers: StartWorkers, connect: Connect, gate: Gate
    ) -> None:
        declared = self._declared_unsupported("sigstop")
        if fault_cluster.heartbeat is None:
            assert declared, "without a heartbeat a frozen worker is never noticed: declare unsupported['sigstop']"
            return
        assert not declared, "unsupported['sigstop'] is declared, yet the cluster has a heartbeat"
        interval, timeout = fault_cluster.heartbeat
        start_workers(2)
        with connect(max_retries=1) as executor:
            future = executor.submit(tasks.report_pid_at_gate, gate.address, "held")
            frozen = _pid(gate.wait_started(1)[0])
            stopped = time.monotonic()
            os.kill(frozen, signal.SIGSTOP)  # the connection stays up: only the missing heartbeats tell
            try:
                second = _pid(gate.wait_started(2, timeout=timeout + TIMEOUT)[1])
                elapsed = time.monotonic() - stopped
                # Silence counts from the worker's last heartbeat, up to one interval (plus a poll) before
                # the SIGSTOP; the upper margin is for a loaded machine, not for the transport.
                assert timeout - interval - 0.1 <= elapsed < timeout + _LOST_SLOWER
                gate.release()
                assert future.result(timeout=TIMEOUT) == second != frozen
            finally:
                os.kill(frozen, signal.SIGCONT)

    # --- the job server goes away --------------------------------------------------------------------------

    def test_server_restart_client_and_workers_reconnect(
        self, fault_cluster: FaultCluster, start_workers: StartWorkers, connect: Connect, gate: Gate
    ) -> None:
        if self._declared_unsupported("server_restart"):
            return
        start_workers(2)
        with connect(max_retries=2) as executor:
            held = executor.submit(tasks.report_pid_at_gate, gate.address, "held")
            gate.wait_started(1)
            queued = [executor.submit(tasks.square, i) for i in range(10)]
            fault_cluster.stop_server()  # the server's queue is lost with it
            fault_cluster.start_server()
            gate.release()  # the first run's result goes nowhere; the client resubmits what was in flight
            assert held.result(timeout=TIMEOUT) in {_pid(report) for report in gate.started}
            assert [f.result(timeout=TIMEOUT) for f in queued] == [i * i for i in range(10)]
            more = [executor.submit(tasks.add, i, 1) for i in range(20)]
            assert [f.result(timeout=TIMEOUT) for f in more] == list(range(1, 21))
            with Gate() as both:  # both workers came back: two calls run at once, on two processes
                pair = [executor.submit(tasks.report_pid_at_gate, both.address, f"again-{i}") for i in range(2)]
                reports = both.wait_started(2)
                both.release()
                assert sorted(f.result(timeout=TIMEOUT) for f in pair) == sorted(_pid(r) for r in reports)
                assert len({_pid(r) for r in reports}) == 2

    def test_client_gives_up_after_reconnect_timeout(
        self, fault_cluster: FaultCluster, start_workers: StartWorkers, connect: Connect, gate: Gate
    ) -> None:
        if self._declared_unsupported("reconnect_timeout"):
            return
        start_workers(1)
        executor = connect(reconnect_timeout=0.5)
        held = executor.submit(tasks.wait_at_gate, gate.address, "held")
        gate.wait_started(1)
        fault_cluster.stop_server()
        with pytest.raises(ServerUnavailableError, match="could not reconnect"):
            held.result(timeout=TIMEOUT)
        assert isinstance(held.exception(), BrokenExecutor)
        with pytest.raises(BrokenExecutor):
            executor.submit(tasks.square, 2)
        executor.shutdown()
        gate.release()

    # --- a worker is told to stop ------------------------------------------------------------------------

    @pytest.mark.parametrize("command", ["cli", "worker"])
    def test_worker_drains_on_sigterm(
        self, fault_cluster: FaultCluster, start_workers: StartWorkers, connect: Connect, gate: Gate, command: str
    ) -> None:
        """``remote-executor worker URL`` (which drains its worker process) or one worker process itself."""
        if self._declared_unsupported("drain"):
            return
        if command == "cli":
            argv = ["-m", "remote_executor.cli", "worker", fault_cluster.url, "--processes", "1"]
        else:
            argv = ["-m", "remote_executor.worker", fault_cluster.url, "--name", f"{WORKER_NAME}-draining"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p or os.getcwd() for p in sys.path)}
        process = subprocess.Popen([sys.executable, *argv, *fault_cluster.worker_args], env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            with connect() as executor:
                held = executor.submit(tasks.hold_reporting_sigterm, gate.address, "held", "finished")
                gate.wait_started(1)
                process.send_signal(signal.SIGTERM)
                assert gate.wait_started(2)[1] == "held:sigterm"  # the worker's drain began mid-call
                later = executor.submit(tasks.square, 5)
                gate.release()
                assert held.result(timeout=TIMEOUT) == "finished"  # the running call finished
                assert process.wait(timeout=TIMEOUT) == 0
                assert not later.done()  # it did not start on the draining worker, and nothing failed it
                start_workers(1)
                assert later.result(timeout=TIMEOUT) == 25
        finally:
            process.kill()
            process.wait()
