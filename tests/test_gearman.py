"""The gearman transport against a real gearmand and real worker processes: -j, keys, servers, CLI.

The fault scenarios every remote transport shares (SIGKILL mid-call, poison call, gearmand restart, giving
up on reconnection, drain on SIGTERM) run from ``conformance/test_faults_gearman.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import BrokenExecutor
from pathlib import Path

import cloudpickle
import pytest

from remote_executor import RemoteExecutor, cluster_status
from remote_executor.conformance.gate import Gate, wait_at_gate
from remote_executor.errors import (
    AuthenticationError,
    InitializerFailed,
    ProtocolError,
    SerializationError,
    ServerUnavailableError,
    TransportError,
    WorkerLostError,
)
from remote_executor.supervisor import Supervisor
from remote_executor.transports.base import Call, Session, WorkerCore, WorkerSettings
from remote_executor.transports.gearman import gearmand as gearmand_module
from remote_executor.transports.gearman.connection import (
    ClientCallbacks,
    GearmanClientConnection,
    GearmanConnectionError,
    GearmanWorkerConnection,
    admin_status,
)
from remote_executor.transports.gearman.gearmand import GearmandProcess
from remote_executor.transports.gearman.jobs import JobCodec, JobIdentity, parse_url
from remote_executor.transports.gearman.worker import GearmanWorker
from remote_executor.wire.frames import Frame, Kind, encode_bytes
from remote_executor.wire.serialization import decode_outcome, encode_call

from .conftest import pid_alive, wait_for

pytestmark = pytest.mark.gearman

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module

_pools = itertools.count()


def record_pid_then_wait(path: str, address: tuple[str, int], token: str) -> int:
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    wait_at_gate(address, token)
    return os.getpid()


def pids_in(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def crash() -> None:
    import ctypes

    ctypes.string_at(0)  # a segfault: the worker process dies mid-call


def fail_to_initialize(reason: str) -> None:
    raise ValueError(reason)


@pytest.fixture(scope="module")
def gearmand() -> Iterator[GearmandProcess]:
    """One gearmand without -j for the module; tests use a pool each, so leftovers never cross tests."""
    with GearmandProcess(threads=2) as server:
        yield server


@pytest.fixture
def pool_url(gearmand: GearmandProcess) -> str:
    return f"{gearmand.url}/test-{os.getpid()}-{next(_pools)}"


@pytest.fixture
def start_workers() -> Iterator[Callable[..., Supervisor]]:
    started: list[Supervisor] = []

    def start(url: str, count: int = 2, env: dict[str, str] | None = None,
              worker_args: tuple[str, ...] = ()) -> Supervisor:
        supervisor = Supervisor(url, count, env=env, worker_args=worker_args, name="test-worker")
        supervisor.start()
        started.append(supervisor)
        return supervisor

    yield start
    for supervisor in started:
        supervisor.stop()


def wait_for_workers(url: str, count: int) -> None:
    (host, port), pool = parse_url(url)[0][0], parse_url(url)[1]

    def registered() -> bool:
        try:
            statuses = admin_status(host, port, timeout=5)
        except OSError:
            return False
        return any(s.function == f"remote_executor.{pool}" and s.workers == count for s in statuses)

    wait_for(registered, what=f"{count} worker(s) to register with {url}")


# --- round trips, pools ------------------------------------------------------------------------------


def test_url_round_trip_and_chunks(pool_url: str, start_workers: Callable[..., Supervisor]) -> None:
    start_workers(pool_url, 2)
    with RemoteExecutor(transport=pool_url) as ex:
        assert list(ex.map(pow, range(50), [2] * 50, chunksize=7)) == [i * i for i in range(50)]
        assert ex.submit(lambda: os.getpid()).result(timeout=30) != os.getpid()


def test_pools_share_one_gearmand(gearmand: GearmandProcess, start_workers: Callable[..., Supervisor]) -> None:
    a, b = f"{gearmand.url}/pool-a-{os.getpid()}", f"{gearmand.url}/pool-b-{os.getpid()}"
    pids_a = set(start_workers(a, 1).pids())
    pids_b = set(start_workers(b, 1).pids())
    with RemoteExecutor(transport=a) as ex_a, RemoteExecutor(transport=gearmand.url, pool=b.rsplit("/", 1)[1]) as ex_b:
        assert {ex_a.submit(os.getpid).result(timeout=30) for _ in range(5)} <= pids_a
        assert {ex_b.submit(os.getpid).result(timeout=30) for _ in range(5)} <= pids_b


def test_bad_pool_name_is_a_clear_error(gearmand: GearmandProcess) -> None:
    with pytest.raises(TransportError, match="bad pool name"):
        RemoteExecutor(transport=f"{gearmand.url}/no spaces")


def test_unreachable_gearmand_is_a_clear_error() -> None:
    with pytest.raises(TransportError, match="cannot reach any gearmand"):
        RemoteExecutor(transport="gearman://127.0.0.1:1")


# --- worker loss and max_retries ------------------------------------------------------------------------


# The client-enforced cases (gearmand without -j) are fault scenarios of conformance/test_faults_gearman.py.


def test_sigkilled_worker_without_retries_runs_at_most_once_under_gearmand_j(
    start_workers: Callable[..., Supervisor], tmp_path: Path
) -> None:
    log = tmp_path / "pids"
    with GearmandProcess(threads=2, job_retries=1) as server:
        start_workers(server.url, 2)
        with Gate() as gate, RemoteExecutor(transport=server.url, max_retries=0) as ex:
            doomed = ex.submit(record_pid_then_wait, str(log), gate.address, "held")
            gate.wait_started(1)
            os.kill(pids_in(log)[0], signal.SIGKILL)
            with pytest.raises(WorkerLostError) as info:
                doomed.result(timeout=30)
            assert info.value.workers and "test-worker" in info.value.workers[0]
            gate.release()
            assert ex.submit(pow, 3, 3).result(timeout=30) == 27  # the executor goes on
            assert len(pids_in(log)) == 1  # with -j, at most once


def test_poison_call_fails_after_max_retries_on_the_embedded_gearmand_j() -> None:
    with RemoteExecutor(max_workers=2, transport="gearman", max_retries=2) as ex:
        with pytest.raises(WorkerLostError) as info:
            ex.submit(crash).result(timeout=60)
        assert len(info.value.workers) == 3  # ran three times, lost three workers
        assert "3 time(s)" in str(info.value)
        assert list(ex.map(abs, [-1, -2, -3])) == [1, 2, 3]  # the fleet was restored


# --- several job servers --------------------------------------------------------------------------------


def test_two_job_servers_one_stopped_mid_run(start_workers: Callable[..., Supervisor], tmp_path: Path) -> None:
    with GearmandProcess(threads=2) as first, GearmandProcess(threads=2) as second:
        url = f"gearman://127.0.0.1:{first.port},127.0.0.1:{second.port}"
        start_workers(url, 2)
        wait_for_workers(first.url, 2)
        wait_for_workers(second.url, 2)
        with RemoteExecutor(transport=url, max_retries=2) as ex:
            assert list(ex.map(pow, range(40), [2] * 40)) == [i * i for i in range(40)]
            futures = [ex.submit(pow, 2, i) for i in range(200)]
            first.stop()  # mid-run: its in-flight calls move to the other server
            more = [ex.submit(pow, 3, i) for i in range(50)]
            assert [f.result(timeout=60) for f in futures] == [2**i for i in range(200)]
            assert [f.result(timeout=60) for f in more] == [3**i for i in range(50)]
            first.restart()  # on the same port again: client and workers reconnect to it
            wait_for_workers(first.url, 2)
            assert list(ex.map(abs, range(-30, 0))) == list(range(30, 0, -1))


@contextlib.contextmanager
def stopped(gearmand: GearmandProcess) -> Iterator[None]:
    """gearmand frozen (SIGSTOP): its connections stay up, and nothing answers on them."""
    assert gearmand.pid is not None
    os.kill(gearmand.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(gearmand.pid, signal.SIGCONT)


QUICK = {"heartbeat_interval": 0.2, "heartbeat_timeout": 2.0, "connect_timeout": 2.0}


def test_calls_sent_to_a_stopped_gearmand_fail_over_to_the_other(start_workers: Callable[..., Supervisor]) -> None:
    """A frozen gearmand keeps its connections up: without an answer to its echo within the heartbeat
    timeout the client takes it as lost, and its calls run on the other one (they hung until it resumed)."""
    with GearmandProcess(threads=2) as first, GearmandProcess(threads=2) as second:
        url = f"gearman://127.0.0.1:{first.port},127.0.0.1:{second.port}"
        start_workers(url, 2)
        wait_for_workers(first.url, 2)
        wait_for_workers(second.url, 2)
        with RemoteExecutor(transport=url, max_retries=2, reconnect_timeout=60, **QUICK) as ex:  # type: ignore[arg-type]
            assert list(ex.map(abs, range(-6, 0))) == list(range(6, 0, -1))
            with stopped(first):
                futures = [ex.submit(pow, 2, i) for i in range(10)]  # some on the stopped one
                assert [f.result(timeout=60) for f in futures] == [2**i for i in range(10)]


def test_a_large_call_blocked_on_a_stopped_gearmand_fails_over_too(start_workers: Callable[..., Supervisor]) -> None:
    """A job larger than the socket buffers blocks its write to a frozen gearmand (with the client's lock
    held): the liveness watch needs neither, and cuts that connection all the same."""
    with GearmandProcess(threads=2) as first, GearmandProcess(threads=2) as second:
        url = f"gearman://127.0.0.1:{first.port},127.0.0.1:{second.port}"
        start_workers(url, 2)
        wait_for_workers(first.url, 2)
        wait_for_workers(second.url, 2)
        payload = bytes(16 << 20)
        with RemoteExecutor(transport=url, max_retries=2, reconnect_timeout=60, **QUICK) as ex:  # type: ignore[arg-type]
            assert ex.submit(len, b"warm").result(timeout=60) == 4
            with stopped(first):
                futures = [ex.submit(len, payload) for _ in range(2)]  # one of them to the stopped one
                assert [f.result(timeout=60) for f in futures] == [len(payload)] * 2


def test_calls_on_a_lone_stopped_gearmand_fail_once_reconnecting_has_timed_out(
        start_workers: Callable[..., Supervisor]) -> None:
    """Reconnecting to a frozen gearmand succeeds at the TCP level (its kernel accepts): only an answer
    counts, so the client gives up after reconnect_timeout (the calls hung until gearmand resumed)."""
    with GearmandProcess(threads=2) as alone:
        start_workers(alone.url, 1)
        wait_for_workers(alone.url, 1)
        with RemoteExecutor(transport=alone.url, reconnect_timeout=2, **QUICK) as ex:  # type: ignore[arg-type]
            assert ex.submit(abs, -1).result(timeout=60) == 1
            with stopped(alone):
                future = ex.submit(abs, -2)
                with pytest.raises(ServerUnavailableError, match="could not reconnect"):
                    future.result(timeout=60)


PROXY = Path(__file__).resolve().parent / "chaos" / "proxy.py"


@contextlib.contextmanager
def fault_proxy(target_port: int) -> Iterator[tuple[int, Callable[[str], str]]]:
    """Our fault proxy (tests/chaos/proxy.py) in front of 127.0.0.1:``target_port``: its port and a function
    that sends it a command and returns its answer."""
    for _ in range(5):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        proc = subprocess.Popen([sys.executable, str(PROXY), "--listen", f"127.0.0.1:{port}",
                                 "--target", f"127.0.0.1:{target_port}"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdin is not None and proc.stdout is not None
        if proc.stdout.readline().startswith("listening"):
            break
        proc.wait(30)  # the port was taken meanwhile: it exited
    else:
        raise AssertionError("the fault proxy did not start")
    stdin, stdout = proc.stdin, proc.stdout

    def command(text: str) -> str:
        stdin.write(text + "\n")
        stdin.flush()
        return stdout.readline().strip()

    try:
        yield port, command
    finally:
        with contextlib.suppress(OSError):
            stdin.close()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        stdout.close()


@contextlib.contextmanager
def abandoned_on_failure(ex: RemoteExecutor) -> Iterator[RemoteExecutor]:
    """Shut ``ex`` down after the block; if the block failed, without waiting for calls that may never run
    (so the test fails instead of hanging)."""
    try:
        yield ex
    except BaseException:
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    ex.shutdown()


WORKER_QUICK = ("--heartbeat-interval", "0.2", "--heartbeat-timeout", "1")


def test_an_idle_worker_whose_connection_went_silent_reconnects_and_gets_the_jobs(
        gearmand: GearmandProcess, start_workers: Callable[..., Supervisor]) -> None:
    """An idle worker hears nothing until there is work, so a connection that died without a word (a host
    gone, a NAT or firewall that dropped it: nothing answers on it, nothing closes it) looked like a quiet
    gearmand for ever, and the jobs queued for its pool were never run. The worker asks a silent gearmand
    for an echo, and reconnects when none comes."""
    pool = f"silent-{os.getpid()}-{next(_pools)}"
    with fault_proxy(gearmand.port) as (port, proxy):
        start_workers(f"gearman://127.0.0.1:{port}/{pool}", 1, worker_args=WORKER_QUICK)
        wait_for_workers(f"{gearmand.url}/{pool}", 1)
        with abandoned_on_failure(RemoteExecutor(transport=f"{gearmand.url}/{pool}")) as ex:
            assert ex.submit(abs, -1).result(timeout=60) == 1  # served through the proxy
            assert proxy("stall") == "stall 1"  # the worker's connection: up, and silent both ways
            assert ex.submit(abs, -2).result(timeout=30) == 2  # hung for ever before


def big_after_gate(address: tuple[str, int], token: str, size: int) -> bytes:
    wait_at_gate(address, token)
    return bytes(size)


def test_a_worker_whose_result_gearmand_stopped_taking_reconnects_and_serves(
        gearmand: GearmandProcess, start_workers: Callable[..., Supervisor]) -> None:
    """A result larger than the socket buffers blocks its write when gearmand stops reading (frozen, or the
    path cut with the connection up). The worker cuts a write that takes no bytes for its heartbeat timeout
    and reconnects; the client, no longer hearing from the call, runs it again there (the worker stayed
    blocked for ever before, and the call with it)."""
    pool = f"stuck-{os.getpid()}-{next(_pools)}"
    size = 48 << 20
    with Gate() as gate, fault_proxy(gearmand.port) as (port, proxy):
        start_workers(f"gearman://127.0.0.1:{port}/{pool}", 1, worker_args=WORKER_QUICK)
        wait_for_workers(f"{gearmand.url}/{pool}", 1)
        with abandoned_on_failure(RemoteExecutor(transport=f"{gearmand.url}/{pool}", max_retries=2,
                                                 **QUICK)) as ex:  # type: ignore[arg-type]
            future = ex.submit(big_after_gate, gate.address, "big", size)
            gate.wait_started(1)
            assert proxy("stall") == "stall 1"
            gate.release()
            assert len(future.result(timeout=60)) == size
            assert len(gate.started) == 2  # the first run's result never arrived: it ran again


def big_and_counted(path: str, size: int) -> bytes:
    with open(path, "a") as f:
        f.write("ran\n")
    return bytes(size)


def test_a_worker_sending_a_result_over_a_slow_link_is_not_taken_for_stuck(
        gearmand: GearmandProcess, start_workers: Callable[..., Supervisor], tmp_path: Path) -> None:
    """A write that makes progress, however slowly, is not cut: progress is seen every 64 KiB, so a 16 MB result
    over a 2 MB/s link (8 s, eight heartbeat timeouts of the worker's; more than the socket buffers hold)
    arrives, from one run of the call. (Progress was seen every 4 MiB: two seconds apart here, so the write
    was cut, and the call ran again and again.)"""
    pool = f"slow-{os.getpid()}-{next(_pools)}"
    runs = tmp_path / "runs"
    with fault_proxy(gearmand.port) as (port, proxy):
        start_workers(f"gearman://127.0.0.1:{port}/{pool}", 1, worker_args=WORKER_QUICK)
        wait_for_workers(f"{gearmand.url}/{pool}", 1)
        assert proxy("rate 2000000") == "rate 2e+06"
        with abandoned_on_failure(RemoteExecutor(transport=f"{gearmand.url}/{pool}")) as ex:
            assert len(ex.submit(big_and_counted, str(runs), 16_000_000).result(timeout=90)) == 16_000_000
    assert runs.read_text().count("ran") == 1


def test_a_draining_worker_does_not_wait_for_a_stopped_gearmand_to_answer(
        start_workers: Callable[..., Supervisor]) -> None:
    """A worker reconnecting to a stopped gearmand waits up to its connect timeout (10 s) for an answer; SIGTERM
    ends that wait at once instead of after it."""
    with GearmandProcess(threads=2) as first, GearmandProcess(threads=2) as second:
        url = f"gearman://127.0.0.1:{first.port},127.0.0.1:{second.port}/drain-{os.getpid()}-{next(_pools)}"
        worker = subprocess.Popen([sys.executable, "-m", "remote_executor.cli", "worker", url, "--processes", "1",
                                   *WORKER_QUICK], stderr=subprocess.PIPE, text=True)
        try:
            assert worker.stderr is not None
            pool = url.rsplit("/", 1)[1]
            wait_for_workers(f"{first.url}/{pool}", 1)  # registered with both before the first stops
            wait_for_workers(f"{second.url}/{pool}", 1)
            with stopped(first):
                for line in worker.stderr:  # silent for a heartbeat timeout: cut, then reconnecting (probing)
                    if "lost gearmand" in line and str(first.port) in line:
                        break
                time.sleep(0.5)  # into the probe of the reconnection, which lasts up to 10 s
                began = time.monotonic()
                worker.terminate()
                worker.wait(30)
                assert time.monotonic() - began < 5.0  # (it waited out the probe: up to 10 s)
                assert worker.returncode == 0
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait(30)
            if worker.stderr is not None:
                worker.stderr.close()


def test_an_address_that_closes_every_connection_at_once_is_a_clear_error() -> None:
    """(The connect probe read the end of the connection before the connection was set up: AttributeError.)"""
    with socket.socket() as closer:
        closer.bind(("127.0.0.1", 0))
        closer.listen()
        done = threading.Event()

        def close_them() -> None:
            closer.settimeout(0.1)
            while not done.is_set():
                with contextlib.suppress(OSError):
                    closer.accept()[0].close()

        thread = threading.Thread(target=close_them)
        thread.start()
        try:
            with pytest.raises(TransportError, match="cannot reach any gearmand"):
                RemoteExecutor(transport=f"gearman://127.0.0.1:{closer.getsockname()[1]}", connect_timeout=2)
        finally:
            done.set()
            thread.join()


def test_a_listener_that_never_answers_is_not_a_gearmand() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # its kernel completes the connect; nothing ever answers
        port = silent.getsockname()[1]
        with pytest.raises(TransportError, match="did not answer within 1s"):
            RemoteExecutor(transport=f"gearman://127.0.0.1:{port}", connect_timeout=1)
        # A worker neither: it would count itself as registered, and wait there for jobs that never come.
        with pytest.raises(GearmanConnectionError, match=r"did not answer within 0\.5s"):
            GearmanWorkerConnection("127.0.0.1", port, [b"remote_executor.default"], connect_timeout=0.5)


# --- keys -----------------------------------------------------------------------------------------------


class _Trap:
    """Unpickling this creates a file: proof that a payload was (or was not) unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


class _Outcomes(ClientCallbacks[int]):
    def __init__(self) -> None:
        self.done = threading.Event()
        self.data: list[bytes] = []
        self.outcome = ""
        self.result = b""

    def on_data(self, token: int, payload: bytes) -> None:
        self.data.append(payload)

    def on_complete(self, token: int, payload: bytes) -> None:
        self.outcome = "complete"
        self.result = payload
        self.done.set()

    def on_fail(self, token: int) -> None:
        self.outcome = "fail"
        self.done.set()

    def on_disconnect(self, exc: Exception, in_flight: list[int]) -> None:
        self.done.set()


@pytest.mark.parametrize("forger_key", [b"not the key", None], ids=["wrong-key", "unencrypted"])
def test_job_with_a_wrong_key_is_refused_before_unpickling(
    pool_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, forger_key: bytes | None
) -> None:
    key = os.urandom(32)  # any bytes: surrounding whitespace is never part of a key, on either side
    settings = WorkerSettings(url=pool_url, key=key, name="keyed-worker")
    worker = threading.Thread(target=GearmanWorker(settings, WorkerCore()).run, name="test-gearman-worker")
    trap = tmp_path / "unpickled"
    with caplog.at_level(logging.INFO, logger="remote_executor.gearman"):
        worker.start()
        try:
            (host, port), pool = parse_url(pool_url)[0][0], parse_url(pool_url)[1]
            function = f"remote_executor.{pool}".encode()
            forged = Frame(Kind.TASK, a=1, b=7, parts=[pickle.dumps(_Trap(str(trap)))])
            if forger_key is None:
                payload: bytes | bytearray = encode_bytes(forged)
            else:  # a well-formed encrypted job, under another key
                call = Call(1, forged.parts)
                payload = JobCodec(forger_key, function).encode_job(call, Session(7, None, 0), time.time() + 60).payload
            outcomes = _Outcomes()
            with GearmanClientConnection(host, port, outcomes) as rogue:
                rogue.submit(1, function, payload)
                assert outcomes.done.wait(30)
            assert outcomes.outcome == "fail"
            assert outcomes.data and outcomes.data[0].startswith(b"refused by keyed-worker")
            assert "refused a job it cannot authenticate" in caplog.text
            expected = "does not verify" if forger_key else "the job is not encrypted"
            assert expected in caplog.text
            assert not trap.exists()
            with RemoteExecutor(transport=pool_url, key=key) as ex:  # the worker serves the rightful client
                assert ex.submit(pow, 2, 8).result(timeout=30) == 256
        finally:
            settings.drain.set()
            worker.join(30)
    assert not worker.is_alive()


def test_an_authenticated_call_of_the_wrong_shape_gets_an_error_and_the_worker_serves_on(pool_url: str) -> None:
    """A job under the right key whose pickle is not a call (another program's, another version's): the
    worker answers that job with a clear error and goes on serving (it raised out of its loop before)."""
    key = os.urandom(32).hex().encode()
    settings = WorkerSettings(url=pool_url, key=key, name="shape-worker")
    worker = threading.Thread(target=GearmanWorker(settings, WorkerCore()).run, name="test-gearman-worker")
    worker.start()
    try:
        (host, port), pool = parse_url(pool_url)[0][0], parse_url(pool_url)[1]
        function = f"remote_executor.{pool}".encode()
        codec = JobCodec(key, function)
        for task_id, shape in enumerate([5, ("call", pow), ("chunk", pow, 5), ("call", pow, [2, 3], {})], 1):
            sealed = codec.encode_job(Call(task_id, [pickle.dumps(shape)]), Session(7, None, 0), time.time() + 60)
            outcomes = _Outcomes()
            with GearmanClientConnection(host, port, outcomes) as client:
                client.submit(task_id, function, sealed.payload)
                assert outcomes.done.wait(30), f"no answer to {shape!r}"
            assert outcomes.outcome == "complete", (shape, outcomes.data)
            frame = codec.decode_result(outcomes.result, JobIdentity(function, 7, task_id, sealed.job_id))
            ok, error = decode_outcome(frame.parts)
            assert frame.kind == Kind.RESULT and not ok and isinstance(error, SerializationError), (shape, error)
            assert "the worker received no call it can run" in str(error)
            assert worker.is_alive()
        with RemoteExecutor(transport=pool_url, key=key) as ex:  # the same (only) worker serves on
            assert ex.submit(pow, 2, 8).result(timeout=30) == 256
    finally:
        settings.drain.set()
        worker.join(30)
    assert not worker.is_alive()


def test_client_with_another_key_gets_a_clear_rejection(
    pool_url: str, start_workers: Callable[..., Supervisor]
) -> None:
    start_workers(pool_url, 1, env={"REMOTE_EXECUTOR_KEY_HEX": os.urandom(32).hex()})
    with RemoteExecutor(transport=pool_url, key=b"another key") as ex, pytest.raises(
        BrokenExecutor, match="refused a job it cannot authenticate"
    ):
        ex.submit(pow, 2, 2).result(timeout=30)


@pytest.mark.parametrize("key", [None, b"job-format-key"], ids=["plain", "sealed"])
def test_job_format_carries_limits_and_start_reports_and_still_reads_old_jobs(key: bytes | None) -> None:
    codec = JobCodec(key, b"remote_executor.default")
    session = Session(7, [b"init"], 0)
    expiry = time.time() + 60
    # A job as clients before time limits wrote it: flags = the initializer's part count, nothing else.
    old = Frame(Kind.TASK, a=3, b=7, flags=1, parts=[b"init", b"call"])
    if key is None:
        opened = codec.decode_job(encode_bytes(old))
    else:  # the same frame, sealed as before: the format inside the seal did not change for it
        sealed = codec.encode_job(Call(3, [b"call"]), session, expiry)
        opened = codec.decode_job(sealed.payload)
    assert (opened.limit, opened.report_start, opened.frame.flags, opened.frame.parts) == (None, True, 1,
                                                                                         [b"init", b"call"])
    limited = codec.decode_job(codec.encode_job(Call(4, [b"call"], limit=0.5), session, expiry,
                                                report_start=False).payload)
    # A limit always asks for the start report: it starts the client's clock.
    assert (limited.limit, limited.report_start, limited.frame.flags) == (0.5, True, 1)
    assert [bytes(p) for p in limited.frame.parts] == [b"init", b"call"] and limited.frame.a == 4
    quiet = codec.decode_job(codec.encode_job(Call(5, [b"call"]), session, expiry, report_start=False).payload)
    assert (quiet.limit, quiet.report_start, quiet.frame.flags) == (None, False, 1)
    if key is None:  # a flag this version does not know is a clear refusal, not a misread job
        with pytest.raises(ProtocolError, match="unknown flags 0x2000"):
            codec.decode_job(encode_bytes(Frame(Kind.TASK, a=3, b=7, flags=0x2001, parts=[b"init", b"call"])))
        with pytest.raises(ProtocolError, match="cannot hold 3 initializer parts"):
            codec.decode_job(encode_bytes(Frame(Kind.TASK, a=3, b=7, flags=3, parts=[b"init", b"call"])))


def test_a_quiet_job_costs_no_start_report_unless_it_runs_past_a_heartbeat(pool_url: str) -> None:
    """Where gearmand's -j bounds retries the client marks its jobs QUIET: a short call sends no WORK_DATA at
    all; a longer one is named by its first heartbeat; a job with a time limit always reports its start."""
    settings = WorkerSettings(url=pool_url, name="quiet-worker", heartbeat_interval=0.5)
    worker = threading.Thread(target=GearmanWorker(settings, WorkerCore()).run, name="test-gearman-worker")
    worker.start()
    try:
        (host, port), pool = parse_url(pool_url)[0][0], parse_url(pool_url)[1]
        function = f"remote_executor.{pool}".encode()
        codec = JobCodec(None, function)
        cases = [(Call(1, encode_call(abs, (-1,), {})), False),  # quick and quiet
                 (Call(2, encode_call(time.sleep, (1.2,), {})), False),  # quiet, past a heartbeat
                 (Call(3, encode_call(abs, (-3,), {}), limit=30.0), False),  # a limit: reported all the same
                 (Call(4, encode_call(abs, (-4,), {})), True)]  # a client that wants the report
        data = []
        for call, report_start in cases:
            payload = codec.encode_job(call, Session(7, None, 0), time.time() + 60, report_start=report_start).payload
            outcomes = _Outcomes()
            with GearmanClientConnection(host, port, outcomes) as client:
                client.submit(call.task_id, function, payload)
                assert outcomes.done.wait(30) and outcomes.outcome == "complete", call
            data.append(outcomes.data)
        started = b"started by quiet-worker"
        assert data[0] == []  # (it would take a stall of a whole heartbeat interval in the call to get one)
        assert data[1] and data[1][0] == started and set(data[1][1:]) <= {b"alive"}, data[1]
        assert data[2][0] == started and data[3][0] == started
    finally:
        settings.drain.set()
        worker.join(30)
    assert not worker.is_alive()


def test_result_encrypted_with_another_key_is_refused() -> None:
    identity = JobIdentity(b"remote_executor.default", 7, 1, bytes(16))
    payload = JobCodec(b"rogue", identity.function).encode_result(Frame(Kind.RESULT, a=1, parts=[b"x"]), identity)
    with pytest.raises(AuthenticationError, match="does not verify"):
        JobCodec(b"rightful", identity.function).decode_result(payload, identity)


# --- initializer, embedded cluster, CLI ----------------------------------------------------------------------


def test_initializer_failure_breaks_the_executor_with_the_remote_cause(pool_url: str,
                                                                      start_workers: Callable[..., Supervisor]) -> None:
    start_workers(pool_url, 1)
    with RemoteExecutor(transport=pool_url, initializer=fail_to_initialize, initargs=("no setup",)) as ex:
        future = ex.submit(pow, 2, 2)
        error = future.exception(timeout=30)
        assert isinstance(error, InitializerFailed)
        assert isinstance(error.__cause__, ValueError) and "no setup" in str(error.__cause__)
        with pytest.raises(BrokenExecutor):
            ex.submit(pow, 2, 3)


def test_missing_gearmand_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(gearmand_module, "SBIN_DIRS", ())
    with pytest.raises(TransportError, match="gearman-job-server"):
        RemoteExecutor(transport="gearman")


def test_embedded_cluster_is_keyed_and_leaves_nothing_behind() -> None:
    script = textwrap.dedent(
        """
        import sys
        from remote_executor import RemoteExecutor
        ex = RemoteExecutor(max_workers=2, transport="gearman")
        assert ex.submit(pow, 2, 2).result() == 4
        cluster = ex.transport.cluster
        assert cluster.server.key and len(bytes.fromhex(cluster.server.key.decode())) == 32  # generated: hex
        print(cluster.server.gearmand.pid, *cluster.supervisor.pids(), flush=True)
        sys.stdin.read()
        """
    )
    client = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert client.stdout is not None
        pids = [int(p) for p in client.stdout.readline().split()]
        assert len(pids) == 3 and all(pid_alive(p) for p in pids)
        client.kill()
        client.wait()
        wait_for(lambda: not any(pid_alive(p) for p in pids), what="gearmand and orphaned workers to exit")
    finally:
        client.kill()
        client.wait()
        assert client.stdin is not None and client.stdout is not None
        client.stdin.close()
        client.stdout.close()


def test_cli_status_and_ping(pool_url: str, start_workers: Callable[..., Supervisor]) -> None:
    start_workers(pool_url, 2)
    wait_for_workers(pool_url, 2)
    run = [sys.executable, "-m", "remote_executor.cli", "--log-level", "WARNING"]
    status = subprocess.run([*run, "status", pool_url], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    pool = parse_url(pool_url)[1]
    assert f'"function": "remote_executor.{pool}"' in status.stdout
    assert status.stdout.count("test-worker") >= 2 and '"workers": 2' in status.stdout
    typed = cluster_status(pool_url)  # the pool by its own name, as on tcp and zmq
    assert typed.queued == {pool: 0} and [w.pool for w in typed.workers] == [pool, pool]
    ping = subprocess.run([*run, "ping", pool_url], capture_output=True, text=True, timeout=60)
    assert ping.returncode == 0 and "answered in" in ping.stdout
    down = subprocess.run([*run, "ping", "gearman://127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and "refused" in down.stderr.lower()


def test_status_lists_every_server_and_survives_one_down(gearmand: GearmandProcess) -> None:
    from remote_executor.transports import get_backend
    from remote_executor.transports.base import Options

    def status(url: str) -> dict[str, object]:
        return get_backend("gearman").status(url, Options(connect_timeout=5))

    info = status(f"gearman://127.0.0.1:{gearmand.port},127.0.0.1:1")
    servers = info["servers"]
    assert isinstance(servers, list) and len(servers) == 2
    assert "status" in servers[0] and "error" in servers[1]
    with pytest.raises(TransportError, match="refused"):
        status("gearman://127.0.0.1:1")
