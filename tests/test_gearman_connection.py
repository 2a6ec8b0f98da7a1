"""Gearman connections, admin commands and GearmandProcess against a real gearmand on loopback."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from remote_executor.transports.gearman import gearmand as gearmand_module
from remote_executor.transports.gearman.codec import AdminError, GearmanError
from remote_executor.transports.gearman.connection import (
    ClientCallbacks,
    GearmanClientConnection,
    GearmanConnectionClosed,
    GearmanConnectionError,
    GearmanServerError,
    GearmanWorkerConnection,
    Job,
    Priority,
    admin_command,
    admin_status,
    admin_workers,
    cancel_job,
)
from remote_executor.transports.gearman.gearmand import GearmandNotFoundError, GearmandProcess

pytestmark = pytest.mark.gearman

_names = itertools.count()


def fresh_function() -> bytes:
    """A function name no other test uses, so queued leftovers of one test never reach another."""
    return f"fn-{os.getpid()}-{next(_names)}".encode()


@pytest.fixture(scope="module")
def gearmand() -> Iterator[GearmandProcess]:
    with GearmandProcess(threads=2) as server:
        yield server


class Recorder(ClientCallbacks[int]):
    """Records every callback; tests wait on its condition."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.handles: dict[int, bytes] = {}
        self.outcomes: dict[int, list[tuple[str, bytes | None]]] = {}
        self.disconnects: list[tuple[GearmanError, list[int]]] = []
        self.statuses: list[tuple[int, bool, bool]] = []

    def on_created(self, token: int, handle: bytes) -> None:
        with self.cond:
            self.handles[token] = handle
            self.cond.notify_all()

    def on_complete(self, token: int, payload: bytes) -> None:
        self._settle(token, "complete", payload)

    def on_fail(self, token: int) -> None:
        self._settle(token, "fail", None)

    def on_error(self, token: int, error: GearmanServerError) -> None:
        self._settle(token, "error", error.code)

    def on_status(self, token: int, known: bool, running: bool) -> None:
        with self.cond:
            self.statuses.append((token, known, running))
            self.cond.notify_all()

    def on_disconnect(self, exc: GearmanError, in_flight: list[int]) -> None:
        with self.cond:
            self.disconnects.append((exc, in_flight))
            self.cond.notify_all()

    def _settle(self, token: int, kind: str, payload: bytes | None) -> None:
        with self.cond:
            self.outcomes.setdefault(token, []).append((kind, payload))
            self.cond.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float = 60.0) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), "timed out waiting for gearman callbacks"

    def wait_settled(self, tokens: range | list[int]) -> None:
        self.wait(lambda: all(t in self.outcomes for t in tokens))


class WorkerThread:
    """A worker connection served by a thread until stop() closes it."""

    def __init__(
        self,
        server: GearmandProcess,
        function: bytes,
        handle_job: Callable[[GearmanWorkerConnection, Job], None],
        client_id: bytes | None = None,
    ) -> None:
        self.conn = GearmanWorkerConnection(*server.address, [function], client_id=client_id)
        self.handle_job = handle_job
        self.error: GearmanConnectionError | None = None
        self.jobs = 0
        self.thread = threading.Thread(target=self._run, name=f"test-worker {function!r}")
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                job = self.conn.grab_job()
                assert job is not None  # no timeout given
                self.jobs += 1  # before the result leaves: the client may check as soon as it arrives
                self.handle_job(self.conn, job)
        except GearmanConnectionError as exc:
            self.error = exc

    def stop(self) -> None:
        self.conn.close()
        self.thread.join()


def echo(conn: GearmanWorkerConnection, job: Job) -> None:
    conn.complete(job.handle, b"echo:" + job.payload)


@pytest.fixture
def client(gearmand: GearmandProcess) -> Iterator[tuple[GearmanClientConnection[int], Recorder]]:
    recorder = Recorder()
    conn: GearmanClientConnection[int] = GearmanClientConnection(*gearmand.address, recorder)
    yield conn, recorder
    conn.close()


@pytest.fixture
def start_worker(gearmand: GearmandProcess) -> Iterator[Callable[..., WorkerThread]]:
    workers: list[WorkerThread] = []

    def start(function: bytes, handle_job: Callable[[GearmanWorkerConnection, Job], None] = echo) -> WorkerThread:
        workers.append(WorkerThread(gearmand, function, handle_job))
        return workers[-1]

    yield start
    for worker in workers:
        worker.stop()


# ----------------------------------------------------------------------------------- client + worker


def test_1000_jobs_from_8_threads_over_one_connection(
    client: tuple[GearmanClientConnection[int], Recorder], start_worker: Callable[..., WorkerThread]
) -> None:
    conn, recorder = client
    function = fresh_function()
    workers = [start_worker(function), start_worker(function)]

    def submit_range(start: int) -> None:
        for token in range(start, 1000, 8):
            conn.submit(token, function, f"job {token}".encode())

    threads = [threading.Thread(target=submit_range, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recorder.wait_settled(range(1000))
    assert recorder.outcomes == {t: [("complete", f"echo:job {t}".encode())] for t in range(1000)}
    assert len(set(recorder.handles.values())) == 1000
    assert sum(w.jobs for w in workers) == 1000
    assert recorder.disconnects == []


def test_50_mb_payload_each_way(
    client: tuple[GearmanClientConnection[int], Recorder], start_worker: Callable[..., WorkerThread]
) -> None:
    conn, recorder = client
    function = fresh_function()
    payload = os.urandom(1024) * (50 * 1024)

    def reverse(worker: GearmanWorkerConnection, job: Job) -> None:
        worker.complete(job.handle, job.payload[::-1])

    start_worker(function, reverse)
    conn.submit(1, function, payload)
    recorder.wait_settled([1])
    assert recorder.outcomes[1] == [("complete", payload[::-1])]


def test_work_fail_and_work_exception_reach_on_fail(
    client: tuple[GearmanClientConnection[int], Recorder], start_worker: Callable[..., WorkerThread]
) -> None:
    conn, recorder = client
    function = fresh_function()

    def failing(worker: GearmanWorkerConnection, job: Job) -> None:
        if job.payload == b"fail":
            worker.fail(job.handle)
        else:
            # Without OPTION_REQ exceptions gearmand turns this into WORK_FAIL "handle\0data".
            worker.exception(job.handle, b"boom")

    start_worker(function, failing)
    conn.submit(1, function, b"fail")
    conn.submit(2, function, b"raise")
    recorder.wait_settled([1, 2])
    assert recorder.outcomes == {1: [("fail", None)], 2: [("fail", None)]}


def test_priorities_and_unique_coalescing(
    client: tuple[GearmanClientConnection[int], Recorder], start_worker: Callable[..., WorkerThread]
) -> None:
    conn, recorder = client
    function = fresh_function()
    conn.submit(1, function, b"first", unique=b"same")
    conn.submit(2, function, b"ignored", unique=b"same", priority=Priority.HIGH)
    conn.submit(3, function, b"low", priority=Priority.LOW)
    recorder.wait(lambda: len(recorder.handles) == 3)
    assert recorder.handles[1] == recorder.handles[2] != recorder.handles[3]
    start_worker(function)
    recorder.wait_settled([1, 2, 3])
    assert recorder.outcomes == {
        1: [("complete", b"echo:first")],
        2: [("complete", b"echo:first")],
        3: [("complete", b"echo:low")],
    }


def test_submit_refused_by_gearmand_goes_to_on_error(
    gearmand: GearmandProcess, client: tuple[GearmanClientConnection[int], Recorder]
) -> None:
    conn, recorder = client
    function = fresh_function()
    conn.submit(1, function, b"queued")  # maxqueue applies only to a function gearmand already knows
    recorder.wait(lambda: 1 in recorder.handles)
    assert admin_command(*gearmand.address, f"maxqueue {function.decode()} 1") == ["OK"]
    conn.submit(2, function, b"refused")
    recorder.wait_settled([2])
    assert recorder.outcomes[2] == [("error", b"QUEUE_ERROR")]
    assert cancel_job(*gearmand.address, recorder.handles[1])


def test_submit_validates_before_sending(client: tuple[GearmanClientConnection[int], Recorder]) -> None:
    conn, recorder = client
    with pytest.raises(ValueError, match="unique id of 65 bytes"):
        conn.submit(1, b"fn", b"", unique=b"u" * 65)
    with pytest.raises(ValueError, match="NUL"):
        conn.submit(2, b"f\0n", b"")
    conn.close()
    assert recorder.disconnects[0][1] == []


def test_close_reports_in_flight_jobs_once(gearmand: GearmandProcess) -> None:
    recorder = Recorder()
    conn: GearmanClientConnection[int] = GearmanClientConnection(*gearmand.address, recorder)
    function = fresh_function()
    conn.submit(1, function, b"never run")
    conn.submit(2, function, b"never run")
    recorder.wait(lambda: len(recorder.handles) == 2)
    conn.close()
    conn.close()
    ((exc, in_flight),) = recorder.disconnects
    assert isinstance(exc, GearmanConnectionClosed)
    assert sorted(in_flight) == [1, 2]
    with pytest.raises(GearmanConnectionClosed):
        conn.submit(3, function, b"too late")


def test_connect_refused_is_a_clear_error() -> None:
    with GearmandProcess() as server:
        address = server.address
    with pytest.raises(GearmanConnectionError, match="cannot connect to gearmand"):
        GearmanClientConnection(*address, Recorder())
    with pytest.raises(GearmanConnectionError, match="cannot connect to gearmand"):
        GearmanWorkerConnection(*address, [b"fn"])


# ---------------------------------------------------------------------------------------------- worker


def test_grab_job_timeout_keeps_waiting_state(
    gearmand: GearmandProcess, client: tuple[GearmanClientConnection[int], Recorder]
) -> None:
    conn, recorder = client
    function = fresh_function()
    with GearmanWorkerConnection(*gearmand.address, [function]) as worker:
        assert worker.grab_job(timeout=0.05) is None
        conn.submit(1, function, b"late")
        job = worker.grab_job(timeout=30)
        assert job is not None
        assert (job.function, job.unique, job.payload) == (function, b"", b"late")
        worker.complete(job.handle, b"ok")
        recorder.wait_settled([1])
    assert recorder.outcomes[1] == [("complete", b"ok")]


def test_close_interrupts_a_blocked_grab_job(gearmand: GearmandProcess) -> None:
    worker = GearmanWorkerConnection(*gearmand.address, [fresh_function()])
    grabbing = threading.Event()
    errors: list[BaseException] = []

    def grab() -> None:
        grabbing.set()
        try:
            worker.grab_job()
        except GearmanError as exc:
            errors.append(exc)

    thread = threading.Thread(target=grab)
    thread.start()
    grabbing.wait()
    worker.close()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert len(errors) == 1
    assert isinstance(errors[0], GearmanConnectionClosed)
    with pytest.raises(GearmanConnectionClosed):
        worker.complete(b"H:x:1", b"")


def test_admin_status_and_workers(gearmand: GearmandProcess) -> None:
    function = fresh_function()
    with GearmanWorkerConnection(*gearmand.address, [function], client_id=b"test-worker-id") as worker:
        assert worker.grab_job(timeout=0.05) is None  # a round trip: CAN_DO has been processed
        status = {s.function: s for s in admin_status(*gearmand.address)}
        assert status[function.decode()].workers == 1
        workers = admin_workers(*gearmand.address)
        (mine,) = [w for w in workers if w.client_id == "test-worker-id"]
        assert mine.functions == (function.decode(),)
        assert mine.address == "127.0.0.1"
    assert admin_command(*gearmand.address, "version")[0].startswith("OK 1.1")
    with pytest.raises(AdminError, match="UNKNOWN_COMMAND"):
        admin_command(*gearmand.address, "no such command")
    with pytest.raises(ValueError, match="one line"):
        admin_command(*gearmand.address, "status\nworkers")


# ---------------------------------------------------------------------------------------------- cancel


def test_cancel_queued_job_gives_work_fail(
    gearmand: GearmandProcess, client: tuple[GearmanClientConnection[int], Recorder]
) -> None:
    conn, recorder = client
    conn.submit(1, fresh_function(), b"queued")
    recorder.wait(lambda: 1 in recorder.handles)
    assert cancel_job(*gearmand.address, recorder.handles[1])
    recorder.wait_settled([1])
    assert recorder.outcomes[1] == [("fail", None)]
    assert not cancel_job(*gearmand.address, b"H:no-such-host:1")


def test_cancel_running_job_settles_once(
    gearmand: GearmandProcess, client: tuple[GearmanClientConnection[int], Recorder]
) -> None:
    conn, recorder = client
    function = fresh_function()
    with GearmanWorkerConnection(*gearmand.address, [function]) as worker:
        conn.submit(1, function, b"running")
        job = worker.grab_job(timeout=30)
        assert job is not None
        assert cancel_job(*gearmand.address, job.handle)
        recorder.wait_settled([1])
        worker.complete(job.handle, b"late result")  # gearmand forwards it as WORK_COMPLETE
        # A second job over the same two connections is a barrier: gearmand forwards the worker's
        # packets in order, so its result arrives after the late WORK_COMPLETE of the first.
        conn.submit(2, function, b"barrier")
        job2 = worker.grab_job(timeout=30)
        assert job2 is not None
        worker.complete(job2.handle, b"second")
        recorder.wait_settled([2])
    assert recorder.outcomes == {1: [("fail", None)], 2: [("complete", b"second")]}


def test_get_status_tells_queued_from_running(
    gearmand: GearmandProcess, client: tuple[GearmanClientConnection[int], Recorder]
) -> None:
    conn, recorder = client
    function = fresh_function()
    conn.submit(1, function, b"job")
    recorder.wait(lambda: 1 in recorder.handles)
    conn.get_status(recorder.handles[1])
    recorder.wait(lambda: len(recorder.statuses) == 1)
    with GearmanWorkerConnection(*gearmand.address, [function]) as worker:
        job = worker.grab_job(timeout=30)
        assert job is not None and job.handle == recorder.handles[1]
        conn.get_status(job.handle)
        recorder.wait(lambda: len(recorder.statuses) == 2)
        worker.complete(job.handle, b"done")
        recorder.wait_settled([1])
    conn.get_status(job.handle)  # settled: gearmand no longer knows it, and the answer names no token
    conn.submit(2, function, b"barrier")  # answered in order: the status reply came before JOB_CREATED
    recorder.wait(lambda: 2 in recorder.handles)
    assert recorder.statuses == [(1, True, False), (1, True, True)]


# ------------------------------------------------------------------------------------- gearmand loss


def test_gearmand_stopped_mid_run() -> None:
    function = fresh_function()
    recorder = Recorder()
    with GearmandProcess(threads=1) as server:
        client: GearmanClientConnection[int] = GearmanClientConnection(*server.address, recorder)
        worker = GearmanWorkerConnection(*server.address, [function])
        try:
            for token in range(3):
                client.submit(token, function, b"in flight")
            assert worker.grab_job(timeout=30) is not None  # one running, two queued
            server.stop()
            recorder.wait(lambda: bool(recorder.disconnects))
            ((exc, in_flight),) = recorder.disconnects
            assert isinstance(exc, GearmanConnectionError)
            assert not isinstance(exc, GearmanConnectionClosed)
            assert "closed the connection" in str(exc)
            assert sorted(in_flight) == [0, 1, 2]
            with pytest.raises(GearmanConnectionError, match="closed the connection"):
                worker.grab_job(timeout=30)
            with pytest.raises(GearmanConnectionClosed):
                client.submit(9, function, b"after the end")
        finally:
            client.close()
            worker.close()
        assert len(recorder.disconnects) == 1


def test_restart_on_the_same_port() -> None:
    function = fresh_function()
    with GearmandProcess(threads=1) as server:
        port, first_pid = server.port, server.pid
        server.restart()
        assert (server.port, server.is_running()) == (port, True)
        assert server.pid != first_pid
        recorder = Recorder()
        with (
            GearmanClientConnection(*server.address, recorder) as client,
            GearmanWorkerConnection(*server.address, [function]) as worker,
        ):
            client.submit(1, function, b"after restart")
            job = worker.grab_job(timeout=30)
            assert job is not None
            worker.complete(job.handle, b"ok")
            recorder.wait_settled([1])
    assert not server.is_running()
    assert server.url == f"gearman://127.0.0.1:{port}"


# ------------------------------------------------------------------------------------ GearmandProcess


def test_missing_binary_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(gearmand_module, "SBIN_DIRS", ())
    with pytest.raises(GearmandNotFoundError) as info:
        GearmandProcess().start()
    assert "apt-get install -y --no-install-recommends gearman-job-server" in str(info.value)


def test_startup_failures_are_clear(gearmand: GearmandProcess) -> None:
    with pytest.raises(gearmand_module.GearmandError, match=f"already in use \\(by pid {gearmand.pid}\\)"):
        GearmandProcess(port=gearmand.port).start()
    with pytest.raises(gearmand_module.GearmandError, match="cannot run /dev/null"):
        GearmandProcess(executable="/dev/null").start()
    with pytest.raises(gearmand_module.GearmandError, match="exited with status 1") as info:
        GearmandProcess(extra_args=["--no-such-option"]).start()
    assert "no-such-option" in str(info.value)


def test_a_taken_port_is_retried_with_another(gearmand: GearmandProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    ports = iter([gearmand.port, 0])

    def pick(host: str) -> int:
        port = next(ports)
        return port or free_port(host)

    free_port = gearmand_module._free_loopback_port
    monkeypatch.setattr(gearmand_module, "_free_loopback_port", pick)
    with GearmandProcess(threads=1) as second:
        assert second.port != gearmand.port
        assert admin_command(*second.address, "getpid") == [f"OK {second.pid}"]
    assert gearmand.is_running()


def process_gone(pid: int) -> bool:
    """True once ``pid`` has exited; a zombie that init has not reaped yet counts as exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a condition nothing announces (another process's exit) with a deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_gearmand_dies_with_its_parent(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        from remote_executor.transports.gearman.gearmand import GearmandProcess
        server = GearmandProcess(threads=1).start()
        print(server.pid, server.log_path.parent, flush=True)
        sys.stdin.read()  # block until killed
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdin is not None
    try:
        pid_text, temp_dir = child.stdout.readline().split()
        gearmand_pid = int(pid_text)
        assert not process_gone(gearmand_pid)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        wait_until(lambda: process_gone(gearmand_pid), 30, f"gearmand {gearmand_pid} to exit")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdin.close()
        child.stdout.close()
    for path in sorted(Path(temp_dir).iterdir()):
        path.unlink()
    Path(temp_dir).rmdir()
