"""The embedded cluster's first workers forked from the executor's own process while it runs no other thread
(as ``ProcessPoolExecutor`` forks on Linux), and what such a worker keeps and drops of its caller.

Each scenario runs in a fresh interpreter: this test process runs pytest's timeout thread, so here the
workers always come from the fork server (tests/test_startup.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from tests.conftest import pid_alive, wait_for

SRC = Path(__file__).resolve().parents[1] / "src"


def run_script(body: str, tmp_path: Path) -> tuple[dict[str, object], str]:
    """Run ``body`` in a fresh interpreter (warnings are errors: forking a process with threads warns on
    3.12+); the last JSON line it prints, and everything it printed."""
    script = tmp_path / "caller.py"
    script.write_text(textwrap.dedent(body))
    result = subprocess.run([sys.executable, "-W", "error", str(script)], capture_output=True, text=True,
                            timeout=90, stdin=subprocess.PIPE, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(SRC.parent)])})
    assert result.returncode == 0, result.stderr
    reports = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return json.loads(reports[-1]), result.stdout


def test_a_single_threaded_caller_forks_its_workers_and_keeps_its_state_to_itself(tmp_path: Path) -> None:
    report, output = run_script(
        """
        import atexit, io, json, logging, os, signal, socket, sys, threading, time, weakref
        print("printed before the executor, still in the buffer")  # stdout is a pipe: block-buffered
        atexit.register(print, "the caller's atexit function ran")
        threading._register_atexit(print, "the caller's exit hook ran")  # as executors register theirs
        class Kept:
            pass
        kept = Kept()
        weakref.finalize(kept, print, "the caller's finalizer ran")
        logging.basicConfig(filename="caller.log", level=logging.INFO)
        logging.disable(logging.CRITICAL)  # the caller's choice, not its workers'
        sys.excepthook = lambda *exc_info: None
        import gc
        gc.freeze()  # the caller's own pre-fork recipe: stays frozen after the executor forks
        from concurrent.futures import ThreadPoolExecutor  # registers its exit hook, which workers need too
        signal.signal(signal.SIGUSR1, lambda signum, frame: None)
        ours, theirs = socket.socketpair()
        r, w = os.pipe()
        inherited_r, inherited_w = os.pipe()
        os.set_inheritable(inherited_w, True)  # as pass_fds would leave it
        log = open("log.txt", "w")

        from remote_executor import RemoteExecutor, reusable

        def probe(fds):
            import gc, logging, os, signal, stat, sys
            from remote_executor import reusable
            kinds = {fd: stat.S_IFMT(os.fstat(fd).st_mode) for fd in fds}
            lock_free = reusable._lock.acquire(blocking=False)
            if lock_free:
                reusable._lock.release()
            return (os.getpid(), os.getppid(), kinds, stat.S_ISCHR(os.fstat(0).st_mode),
                    signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL, sys.getprofile() is None,
                    sys.stdout is sys.__stdout__, lock_free,
                    not any(isinstance(h, logging.FileHandler) for h in logging.root.handlers),
                    gc.get_freeze_count() > 1000,  # the caller's objects: never collected, so never copied
                    logging.root.manager.disable == 0, sys.excepthook is sys.__excepthook__)

        def leave_running():  # what a worker's exit must still clean up, as a spawned worker's does
            import concurrent.futures, os, weakref
            concurrent.futures.kept = pool = concurrent.futures.ThreadPoolExecutor(1)  # never shut down
            pool.submit(abs, 1).result()
            weakref.finalize(pool, os.write, 1, b"the worker's finalizer ran\\n")
            return os.getpid()

        fds = [ours.fileno(), r, w, inherited_w, log.fileno()]
        sys.setprofile(lambda frame, event, arg: None)  # a profiler's, or a debugger's (settrace)
        captured, sys.stdout = sys.stdout, io.StringIO()  # a capture, or a file
        with reusable._lock:  # the caller holds a lock of ours while it forks (get_reusable_executor)
            ex = RemoteExecutor(max_workers=2, start_method="fork")
        sys.setprofile(None)
        sys.stdout = captured
        assert gc.get_freeze_count() > 0, "the caller's own freeze was undone"
        with ex:
            probes = [ex.submit(probe, fds).result(timeout=30) for _ in range(20)]
            assert len({pid for pid, *_ in probes}) == 2  # both workers answered
            drained = ex.submit(leave_running).result(timeout=30)
            os.kill(drained, signal.SIGTERM)  # drained: its main returns, as a program's end would
            deadline = time.monotonic() + 30
            while not ex.transport.cluster.supervisor.exits:  # no event announces another process's exit
                assert time.monotonic() < deadline, "the drained worker did not exit"
                time.sleep(0.01)
        ours.sendall(b"still ours")
        assert theirs.recv(100) == b"still ours"
        for closing in (ours, theirs, log):
            closing.close()
        for fd in (r, w, inherited_r, inherited_w):
            os.close(fd)
        print(json.dumps({"caller": os.getpid(), "probes": probes}))
        """, tmp_path)
    import stat

    for pid, parent, kinds, stdin_is_null, *checks in report["probes"]:  # type: ignore[attr-defined]
        assert parent == report["caller"], "not forked from the caller"
        assert not pid_alive(pid)
        *connections, logfile = kinds.values()
        assert all(stat.S_ISCHR(kind) for kind in connections), "the caller's socket or pipe reached a worker"
        assert stat.S_ISREG(logfile), "the caller's open file is the worker's too, as in a forked process"
        assert stdin_is_null
        assert checks == [True] * 8, "signal handler, profiler, stdout, lock, log handler, gc, logging.disable, " \
                                     "excepthook: the caller's"
    for once in ("printed before the executor", "the caller's atexit function ran", "the caller's exit hook ran",
                 "the caller's finalizer ran", "the worker's finalizer ran"):
        assert output.count(once) == 1, once
    assert "connecting to" not in (tmp_path / "caller.log").read_text()  # the worker logs to its own stderr


def test_without_fork_the_workers_come_from_the_fork_server_or_a_fresh_interpreter(tmp_path: Path) -> None:
    report, _ = run_script(
        """
        import json, os
        from remote_executor import RemoteExecutor

        def started_as():
            with open("/proc/self/cmdline", "rb") as cmdline:
                return os.getppid(), b"remote_executor.worker" in cmdline.read()

        found = {}
        for method in (None, "forkserver", "spawn"):
            with RemoteExecutor(max_workers=1, start_method=method) as ex:
                found[str(method)] = ex.submit(started_as).result(timeout=60)
        print(json.dumps({"caller": os.getpid(), "found": found}))
        """, tmp_path)
    found = report["found"]
    assert isinstance(found, dict)
    for method in ("None", "forkserver"):
        assert found[method][0] != report["caller"], method  # the fork server's child
    assert found["spawn"] == [report["caller"], True]  # spawned: our child, running remote_executor.worker


def test_start_method_is_checked() -> None:
    from remote_executor import RemoteExecutor

    with pytest.raises(ValueError, match="start_method must be one of 'forkserver', 'spawn', 'fork'"):
        RemoteExecutor(start_method="vfork")
    with pytest.raises(ValueError, match="start_method is for an embedded cluster"):
        RemoteExecutor(transport="tcp://127.0.0.1:1", start_method="fork")
    from remote_executor.transports.memory import MemoryTransport

    with pytest.raises(ValueError, match="a transport object has no local workers"):
        RemoteExecutor(transport=MemoryTransport(1), start_method="spawn")


def test_a_module_level_executor_is_not_forked_mid_import(tmp_path: Path) -> None:
    (tmp_path / "tasks.py").write_text(textwrap.dedent(
        """
        import os
        from remote_executor import RemoteExecutor
        with RemoteExecutor(max_workers=1, start_method="fork") as ex:
            PARENT = ex.submit(os.getppid).result(timeout=60)
        """))
    report, _ = run_script(
        """
        import json, os
        import tasks
        print(json.dumps({"caller": os.getpid(), "parent": tasks.PARENT}))
        """, tmp_path)
    assert report["parent"] != report["caller"]


def test_a_restarted_worker_comes_from_the_fork_server_and_calls_go_on(tmp_path: Path) -> None:
    report, _ = run_script(
        """
        import json, os, signal, time
        from remote_executor import RemoteExecutor

        def ids():
            return os.getpid(), os.getppid()

        with RemoteExecutor(max_workers=1, start_method="fork") as ex:
            first, parent = ex.submit(ids).result(timeout=30)
            os.kill(first, signal.SIGKILL)
            deadline = time.monotonic() + 60
            while (found := ex.submit(ids).result(timeout=60))[0] == first:  # a call may still find it
                assert time.monotonic() < deadline
            print(json.dumps({"caller": os.getpid(), "first_parent": parent, "second_parent": found[1],
                              "restarts": ex.transport.cluster.supervisor.restarts}))
        """, tmp_path)
    assert report["first_parent"] == report["caller"]
    assert report["second_parent"] != report["caller"], "forked from a process that runs threads"
    assert report["restarts"] == 1


def test_a_caller_that_runs_a_thread_is_never_forked(tmp_path: Path) -> None:
    report, _ = run_script(
        """
        import json, os, threading
        from remote_executor import RemoteExecutor

        stop = threading.Event()
        waiter = threading.Thread(target=stop.wait)
        waiter.start()
        with RemoteExecutor(max_workers=2, start_method="fork") as ex:
            parents = {ex.submit(os.getppid).result(timeout=30) for _ in range(10)}
        stop.set()
        waiter.join()
        print(json.dumps({"caller": os.getpid(), "parents": sorted(parents)}))
        """, tmp_path)
    assert report["caller"] not in report["parents"]  # type: ignore[operator]


def test_forked_workers_exit_when_their_caller_is_killed(tmp_path: Path) -> None:
    script = tmp_path / "caller.py"
    script.write_text(textwrap.dedent(
        """
        import os, sys
        from remote_executor import RemoteExecutor
        ex = RemoteExecutor(max_workers=2, start_method="fork")
        assert ex.submit(os.getppid).result(timeout=30) == os.getpid()
        print(*ex.transport.cluster.supervisor.pids(), flush=True)
        sys.stdin.read()
        """))
    caller = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        assert caller.stdout is not None
        pids = [int(p) for p in caller.stdout.readline().split()]
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        caller.send_signal(signal.SIGKILL)
        caller.wait()
        wait_for(lambda: not any(pid_alive(p) for p in pids), what="the forked workers to exit")
    finally:
        caller.kill()
        caller.wait()
        for stream in (caller.stdin, caller.stdout):
            assert stream is not None
            stream.close()


@pytest.mark.parametrize("start_method", ["forkserver", "fork"])
def test_a_forked_worker_stuck_in_c_code_dies_with_its_caller(tmp_path: Path, start_method: str) -> None:
    """A call that holds the GIL starves the thread that reads the worker's lifeline: the kernel's
    parent-death signal ends the worker all the same when the caller (and so the fork server) is killed."""
    script, running = tmp_path / "caller.py", tmp_path / "running"
    script.write_text(textwrap.dedent(
        f"""
        import os, sys
        from remote_executor import RemoteExecutor

        def stuck(path):
            with open(path + ".partial", "w") as f:
                f.write(f"{{os.getpid()}} {{os.getppid()}}")
            os.replace(path + ".partial", path)
            return sum(range(10**13))  # holds the GIL for hours

        ex = RemoteExecutor(max_workers=1, start_method={start_method!r})
        ex.submit(stuck, {str(running)!r})
        sys.stdin.read()
        """))
    caller = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(SRC)})
    worker = 0
    try:
        wait_for(running.exists, 60, "the call to start")
        worker, parent = map(int, running.read_text().split())
        assert (parent == caller.pid) == (start_method == "fork")  # forked from the caller, or the fork server
        caller.send_signal(signal.SIGKILL)
        caller.wait()
        wait_for(lambda: not pid_alive(worker), what="the stuck worker to die with its caller")
    finally:
        caller.kill()
        caller.wait()
        assert caller.stdin is not None
        caller.stdin.close()
        if worker and pid_alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_the_cluster_knows_which_built_in_schemes_fork_their_first_workers_here() -> None:
    """The executor decides whether to start the fork server early before it imports the backend, from a
    table that must say what each backend says."""
    from remote_executor import cluster
    from remote_executor.transports import get_backend

    for scheme, listens_first in cluster._FORKED_SCHEMES.items():
        assert get_backend(scheme).embedded_listens_first is listens_first, scheme


PARENTS = """
import errno, json, os
from remote_executor import RemoteExecutor, forkhere
{setup}
with RemoteExecutor(max_workers=2, start_method="fork") as ex:
    parents = sorted({{ex.submit(os.getppid).result(timeout=30) for _ in range(10)}})
print(json.dumps({{"caller": os.getpid(), "parents": parents}}))
"""


def test_a_process_that_cannot_fork_gets_its_workers_from_the_fork_server(tmp_path: Path) -> None:
    # The fork server is another interpreter: its os.fork is the real one.
    setup = 'os.fork = lambda: (_ for _ in ()).throw(OSError(errno.ENOMEM, "Cannot allocate memory"))'
    report, _ = run_script(PARENTS.format(setup=setup), tmp_path)
    assert report["caller"] not in report["parents"]  # type: ignore[operator]


def test_a_process_that_ignores_sigchld_is_not_forked(tmp_path: Path) -> None:
    """Its children's exit statuses are lost, and a supervisor tells a refused worker by its status."""
    setup = "import signal; signal.signal(signal.SIGCHLD, signal.SIG_IGN)"
    report, _ = run_script(PARENTS.format(setup=setup), tmp_path)
    assert report["caller"] not in report["parents"]  # type: ignore[operator]


def test_a_worker_that_fails_before_it_starts_says_why_on_the_real_stderr(tmp_path: Path) -> None:
    script = tmp_path / "caller.py"
    script.write_text(textwrap.dedent(
        """
        import contextlib, io
        from remote_executor import RemoteExecutor, TransportError, forkhere

        def broken(keep):
            raise RuntimeError("cannot forget the caller")

        forkhere._forget_caller = broken
        with contextlib.redirect_stderr(io.StringIO()):  # the caller's capture: not where that goes
            try:
                RemoteExecutor(max_workers=1, start_method="fork", connect_timeout=30)
            except TransportError as exc:
                print("refused:", exc)
        """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=90,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    assert "refused: the local tcp cluster's worker processes did not start" in result.stdout, result.stderr
    assert "RuntimeError: cannot forget the caller" in result.stderr


def test_a_lazily_loaded_module_is_not_loaded_by_the_fork_check(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from remote_executor import forkhere

    (tmp_path / "lazy_never_loaded.py").write_text("raise ImportError('the fork check loaded me')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = importlib.util.find_spec("lazy_never_loaded")
    assert spec is not None and spec.loader is not None
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    without = forkhere._importing()  # (whatever this test process is doing otherwise)
    monkeypatch.setitem(sys.modules, "lazy_never_loaded", module)
    spec.loader.exec_module(module)  # lazily: runs on first attribute access
    assert forkhere._importing() is without
    assert type(module) is not types.ModuleType  # still lazy: loading it turns it into a plain module


def test_a_large_process_is_not_forked(tmp_path: Path) -> None:
    report, _ = run_script(PARENTS.format(setup="forkhere.MAX_RESIDENT = 1"), tmp_path)
    assert report["caller"] not in report["parents"]  # type: ignore[operator]


def test_resident_memory_is_read_for_the_limit() -> None:
    from remote_executor import forkhere

    before = forkhere._resident()
    ballast = bytearray(64 << 20)  # zero-filled: every page touched
    assert forkhere._resident() - before >= 60 << 20
    del ballast


def test_cryptographys_module_stand_in_does_not_prevent_forking(tmp_path: Path) -> None:
    """cffi puts an object without a ``__dict__`` in ``sys.modules`` ('_openssl.lib'): not an import."""
    setup = "import cryptography.hazmat.primitives.ciphers.aead  # as TLS or the gearman transport do"
    report, _ = run_script(PARENTS.format(setup=setup), tmp_path)
    assert report["parents"] == [report["caller"]]
