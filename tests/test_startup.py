"""Start-up: what ``import remote_executor`` loads, the public names it still offers, and the fork server
that starts the embedded cluster's workers (forked, never spawned where it can; spawned where it cannot)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import remote_executor
from remote_executor import RemoteExecutor, forkserver
from remote_executor.supervisor import Supervisor
from remote_executor.transports.gearman import gearmand as gearmand_module
from remote_executor.transports.gearman.gearmand import GearmandProcess
from remote_executor.transports.tcp.server import TcpServer
from tests.conftest import FAST_HEARTBEAT, pid_alive, wait_for

SRC = Path(__file__).resolve().parents[1] / "src"
KEY = bytes(range(32))

COUNT = "import sys; n = len(sys.modules); {statement}; print(len(sys.modules) - n)"


def modules_loaded(statement: str) -> int:
    """How many modules ``statement`` loads in a fresh interpreter (a count: it does not depend on load)."""
    result = subprocess.run([sys.executable, "-c", COUNT.format(statement=statement)], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(SRC)}, check=True)
    return int(result.stdout)


def test_import_loads_little_more_than_concurrent_futures() -> None:
    """``import remote_executor`` is concurrent.futures, pickle and our exceptions: typing, the executor,
    the transports and the wire format wait until they are used (now 9 more modules)."""
    baseline = modules_loaded("import concurrent.futures")
    assert modules_loaded("import remote_executor") <= baseline + 12


def test_importing_the_executor_stays_bounded() -> None:
    """``from remote_executor import RemoteExecutor`` (what its constructor needs comes later: the embedded
    cluster's job server and transport); now about 75 modules more than concurrent.futures."""
    baseline = modules_loaded("import concurrent.futures")
    assert modules_loaded("from remote_executor import RemoteExecutor") <= baseline + 90


def test_every_public_name_resolves() -> None:
    for name in remote_executor.__all__:
        assert getattr(remote_executor, name) is not None, name
    assert set(remote_executor.__all__) <= set(dir(remote_executor))
    assert callable(remote_executor.progress)  # the function, not the module of the same name
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        remote_executor.nonexistent  # noqa: B018


def test_star_import_in_a_fresh_interpreter() -> None:
    script = ("from remote_executor import *\n"
              "import remote_executor\n"
              "assert callable(progress) and RemoteExecutor.__name__ == 'RemoteExecutor'\n"
              "assert all(hasattr(remote_executor, n) for n in remote_executor.__all__)\n"
              "print('ok')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    assert result.stdout.strip() == "ok", result.stderr


# --- the fork server ----------------------------------------------------------------------------------------


def cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def environ(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


def test_embedded_workers_are_forked_by_the_fork_server() -> None:
    with RemoteExecutor(max_workers=2, key=KEY) as ex:
        server = forkserver.shared("tcp")
        assert server is not None and server.alive
        parents = set(ex.map(_parent_pid, range(20)))
        assert parents == {server.proc.pid}  # not this process: not spawned
        supervisor = ex.transport.cluster.supervisor  # type: ignore[attr-defined]
        for pid in supervisor.pids():
            # The key travels in the worker's environment, over the fork server's socket: never on a command
            # line, and the fork server's own environment never holds it.
            assert KEY.hex().encode() not in cmdline(pid)
            assert b"local-worker" not in cmdline(pid)  # the fork server's command line, as forked
        assert KEY.hex().encode() not in cmdline(server.proc.pid) + environ(server.proc.pid)
        assert ex.submit(_key_in_environ).result(timeout=30) is False  # and the worker dropped it


def test_no_thread_is_left_once_the_executor_has_shut_down() -> None:
    """The fork server stays for the next executor, but reading its answers takes a thread only while a
    worker it forked runs."""
    before = set(threading.enumerate())
    with RemoteExecutor(max_workers=2) as ex:
        assert ex.submit(abs, -1).result(timeout=30) == 1
        assert any(t.name == "remote-executor-forkserver" for t in threading.enumerate())
    wait_for(lambda: set(threading.enumerate()) <= before, what="the executor's threads to end")
    server = forkserver.shared("tcp")
    assert server is not None and server.alive


def test_a_forked_worker_that_is_killed_is_replaced_and_its_status_reported() -> None:
    with RemoteExecutor(max_workers=1) as ex:
        supervisor = ex.transport.cluster.supervisor  # type: ignore[attr-defined]
        (victim,) = supervisor.pids()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: bool(supervisor.exits), what="the fork server to report the worker's exit")
        assert supervisor.exits == [("local-worker-0", -signal.SIGKILL)]
        assert ex.submit(os.getpid).result(timeout=30) not in (victim, os.getpid())
        assert ex.submit(_parent_pid, 0).result(timeout=30) == forkserver.shared("tcp").proc.pid  # type: ignore[union-attr]


def test_a_forked_worker_writes_to_the_executors_standard_error_as_it_is_now(
        capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Not to the one the fork server inherited when it started (as a spawned worker would not)."""
    with capfd.disabled():  # a fork server whose own standard error is not this test's
        monkeypatch.setattr(forkserver, "_shared", None)
        server = forkserver.shared("tcp")
    assert server is not None
    try:
        with RemoteExecutor(max_workers=1) as ex:
            assert ex.submit(_parent_pid, 0).result(timeout=30) == server.proc.pid
            ex.submit(os.write, 2, b"written by a forked worker\n").result(timeout=30)
        assert "written by a forked worker" in capfd.readouterr().err
    finally:
        server.close()


def test_workers_are_spawned_where_they_cannot_be_forked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forkserver, "SUPPORTED", False)
    with RemoteExecutor(max_workers=2) as ex:
        assert set(ex.map(_parent_pid, range(10))) == {os.getpid()}


def test_a_fork_server_that_died_is_replaced_and_meanwhile_workers_are_spawned() -> None:
    with RemoteExecutor(max_workers=1) as ex:
        dead = forkserver.shared("tcp")
        assert dead is not None
        supervisor = ex.transport.cluster.supervisor  # type: ignore[attr-defined]
        (worker,) = supervisor.pids()
        dead.proc.kill()
        wait_for(lambda: not dead.alive, what="the fork server's loss to be noticed")
        os.kill(worker, signal.SIGKILL)  # its exit status went with the fork server: still replaced, spawned
        wait_for(lambda: bool(supervisor.exits), what="the orphaned worker's exit")
        assert ex.submit(_parent_pid, 0).result(timeout=30) == os.getpid()
    with RemoteExecutor(max_workers=1) as ex:  # the next cluster has a new fork server
        fresh = forkserver.shared("tcp")
        assert fresh is not None and fresh is not dead and fresh.alive
        assert ex.submit(_parent_pid, 0).result(timeout=30) == fresh.proc.pid


def test_the_fork_server_exits_with_the_process_that_started_it() -> None:
    script = ("import os, sys\n"
              "from remote_executor import RemoteExecutor, forkserver\n"
              "ex = RemoteExecutor(max_workers=1)\n"
              "print(forkserver.shared('tcp').proc.pid, *ex.transport.cluster.supervisor.pids(), flush=True)\n"
              "sys.stdin.read()\n"
              "os._exit(0)\n")  # no shutdown, no atexit: as if it had crashed
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        assert proc.stdout is not None and proc.stdin is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        proc.stdin.close()
        assert proc.wait(timeout=30) == 0
        for pid in pids:
            wait_for(lambda pid=pid: not pid_alive(pid), what=f"process {pid} to exit")  # type: ignore[misc]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def _parent_pid(_: int) -> int:
    return os.getppid()


def _key_in_environ() -> bool:
    return any(KEY.hex() in value for value in os.environ.values())


# --- the embedded gearmand starts while its workers do --------------------------------------------------------


def test_the_embedded_gearmands_workers_start_before_it_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    """gearmand is not ready until its workers were started: a cluster that waited for gearmand first
    would never start them (this waits 30 s at most, then fails)."""
    workers_started = threading.Event()
    start_workers = Supervisor.start
    wait_until_accepting = GearmandProcess._wait_until_accepting

    def start(self: Supervisor) -> None:
        start_workers(self)
        workers_started.set()

    def held_until_workers_start(self: GearmandProcess, proc: subprocess.Popen[bytes]) -> None:
        workers_started.wait(30)
        wait_until_accepting(self, proc)

    monkeypatch.setattr(Supervisor, "start", start)
    monkeypatch.setattr(GearmandProcess, "_wait_until_accepting", held_until_workers_start)
    started = time.monotonic()
    with RemoteExecutor(max_workers=2, transport="gearman") as ex:
        assert time.monotonic() - started < 30 and workers_started.is_set()
        assert list(ex.map(abs, [-1, -2, -3])) == [1, 2, 3]


def test_workers_follow_an_embedded_gearmand_that_moved_to_another_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first port gearmand is launched on turns out to be taken (by another gearmand): it moves to a
    second one, and the workers started for the first are replaced by workers of the second."""
    with GearmandProcess(threads=1) as other:
        ports = iter([other.port])
        pick_free_port = gearmand_module._free_loopback_port
        monkeypatch.setattr(gearmand_module, "_free_loopback_port",
                            lambda host: next(ports, None) or pick_free_port(host))
        supervisors: list[Supervisor] = []
        start_workers = Supervisor.start

        def start(self: Supervisor) -> None:
            supervisors.append(self)
            start_workers(self)

        monkeypatch.setattr(Supervisor, "start", start)
        with RemoteExecutor(max_workers=1, transport="gearman") as ex:
            assert [s.url for s in supervisors] == [f"gearman://127.0.0.1:{other.port}", ex.transport.cluster.url]  # type: ignore[attr-defined]
            assert supervisors[0].pids() == []  # stopped
            assert ex.submit(abs, -5).result(timeout=30) == 5


def test_the_startup_benchmark_prints_every_row() -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "startup_cost.py"
    result = subprocess.run([sys.executable, str(script), "--runs", "1"], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert result.returncode == 0, result.stderr
    for row in ("import concurrent.futures", "import remote_executor", "cold, ProcessPoolExecutor(2)",
                "warm, RemoteExecutor(tcp, 2)"):
        assert row in result.stdout, result.stdout


FORKED_CHILD = """
import os, sys, threading
from remote_executor import RemoteExecutor, forkserver
# A thread of its own: the workers come from the fork server (a single-threaded process forks its own).
threading.Thread(target=threading.Event().wait, daemon=True).start()
with RemoteExecutor(1) as executor:
    executor.submit(abs, 1).result(timeout=60)
server = forkserver.shared("tcp")
pid = os.fork()  # a plain fork of the executor's process (a daemonizing helper, multiprocessing's "fork")
if pid == 0:
    sys.exit(0)  # ends normally: its exit handlers run
os.waitpid(pid, 0)
print("alive", server.proc.poll() is None)
with RemoteExecutor(1) as executor:
    forked = executor.submit(os.getppid).result(timeout=60) == server.proc.pid
print("forked", forked, "same", forkserver.shared("tcp") is server)
"""


def test_a_plain_fork_of_the_executors_process_leaves_its_fork_server_alone() -> None:
    # The child inherits the fork server's socket: ending it there must not end the parent's fork server,
    # whose next workers are still forked by it.
    result = subprocess.run([sys.executable, "-c", FORKED_CHILD], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["alive", "True", "forked", "True", "same", "True"], result.stdout


@pytest.mark.parametrize("scheme", ["tcp", pytest.param("zmq", marks=pytest.mark.zmq)])
def test_a_worker_loads_no_job_server(scheme: str) -> None:
    """What the fork server imports for a worker (all a worker needs) leaves out the job server and its
    scheduler: a worker never runs one, and every worker process would pay for them."""
    script = (f"import sys\nfrom remote_executor import forkserver\nforkserver._preload({scheme!r})\n"
              "print(sorted(m for m in sys.modules if m.startswith('remote_executor') and (m.endswith('.server') "
              "or m.endswith('.scheduler') or m.endswith('.embedded'))))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(SRC)}, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
    # ... while a backend still hands out its server class when a server is made.
    backend = remote_executor.transports.get_backend(scheme)
    assert backend.server_class.__name__ == f"{scheme.capitalize()}Server"


def test_a_worker_parses_its_arguments_without_importing_shutil() -> None:
    """argparse's own formatter imports shutil (with zlib, bz2 and lzma) on every worker's start; ours sizes
    the help to $COLUMNS, or the terminal, as argparse does."""
    script = ("import sys\nimport remote_executor.worker as worker\n"
              "try:\n    worker.main(['--log-level', 'NOT-A-LEVEL', 'tcp://127.0.0.1:1'])\n"
              "except SystemExit as exc:\n    print(exc.code, 'shutil' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(SRC)}, check=True)
    assert result.stdout.split() == ["2", "False"], result.stdout + result.stderr
    assert "invalid choice: 'NOT-A-LEVEL'" in result.stderr
    narrow = subprocess.run([sys.executable, "-m", "remote_executor.worker", "--help"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "50"},
                            check=True)
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 48


def test_the_supervisor_announces_each_first_handshake_and_each_exit(tcp_server: TcpServer) -> None:
    """What the embedded cluster's start waits on, instead of looking every few milliseconds."""
    supervisor = Supervisor(tcp_server.url, 1, name="announced", restart=False)  # only the exit can follow
    supervisor.start()
    try:
        assert supervisor.changed.wait(30), "the worker's first handshake was not announced"
        assert supervisor.serving.is_set() and not supervisor.exits
        supervisor.changed.clear()
        (victim,) = supervisor.pids()
        os.kill(victim, signal.SIGKILL)
        assert supervisor.changed.wait(30), "the worker's exit was not announced"
        assert supervisor.exits == [("announced-0", -signal.SIGKILL)]
    finally:
        supervisor.stop()


def test_a_stopped_child_ends_with_its_lifeline_not_after_the_kill_timeout(
        tcp_server: TcpServer, caplog: pytest.LogCaptureFixture) -> None:
    """A child frozen with SIGSTOP could not read its closed lifeline: stop() sends SIGCONT with it, so
    the child ends on its own at once instead of being killed once the timeout has passed."""
    supervisor = Supervisor(tcp_server.url, 1, name="frozen", worker_args=FAST_HEARTBEAT)
    supervisor.start()
    try:
        assert supervisor.serving.wait(30)
        (child,) = supervisor.pids()
        os.kill(child, signal.SIGSTOP)
    finally:
        supervisor.stop(timeout=30)
    assert not pid_alive(child)
    assert not [r for r in caplog.records if "did not exit in time" in r.getMessage()]


def test_a_supervisor_that_cannot_start_every_child_stops_those_it_started(
        tcp_server: TcpServer, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[int] = []
    real = Supervisor._start_child

    def start_one_then_fail(self: Supervisor, lifeline: int, index: int) -> object:
        if started:
            raise OSError(24, "Too many open files")
        proc, pidfd = real(self, lifeline, index)
        started.append(proc.pid)
        return proc, pidfd

    monkeypatch.setattr(Supervisor, "_start_child", start_one_then_fail)
    supervisor = Supervisor(tcp_server.url, 2, name="half-started")
    with pytest.raises(OSError, match="Too many open files"):
        supervisor.start()
    assert len(started) == 1
    wait_for(lambda: not pid_alive(started[0]), what="the child it did start to be stopped")
    assert supervisor.pids() == []
