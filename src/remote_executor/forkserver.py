"""A fork server for local worker processes: one clean interpreter that forks a worker on request.

Starting a worker as ``python -m remote_executor.worker`` costs a fresh interpreter and its imports for
every process; forking one from an interpreter that has already imported the worker costs a few
milliseconds. The executor's own process cannot be forked safely (it runs threads once its job server does,
and it holds the user's state), so the fork server is a separate process, started before anything asks it
for a worker, that never runs a thread, a call or user code itself: each fork starts from the same clean
state, with the worker modules already imported.

::

    executor's process                              fork server (python -m remote_executor.forkserver)
    ForkServer.spawn(argv, env, fds) --request-->   fork() -> child: worker.main(argv)
    ForkedProcess (pid, returncode)  <--started--
                                     <--exited---   waitpid() on SIGCHLD

The requests travel over a private Unix socket pair (never a command line): the worker's arguments, its
environment (the cluster key among it, as for a spawned worker), the current directory and import path,
and the worker's lifeline and readiness pipes as passed file descriptors. The fork server reports each
worker's exit status, so its supervisor restarts it exactly as it would a spawned one. It exits when the
socket closes, that is when the process that started it exits, and its workers with it: each asks the kernel
for a SIGKILL when its parent exits (:mod:`.deathsig`), so even one stuck in C code, which cannot read its
lifeline, does not outlive the executor's process. Linux only; elsewhere, or if the fork server
cannot start, :func:`shared` returns None and workers are spawned as before.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import logging
import os
import pickle
import selectors
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import deathsig

log = logging.getLogger("remote_executor.supervisor")

SUPPORTED = sys.platform.startswith("linux") and hasattr(socket, "send_fds") and hasattr(os, "fork")
REPLY_TIMEOUT = 30.0  # seconds a request may wait for its fork (the server may still be importing)
_MAX_MESSAGE = 1 << 20
# The worker loop of a scheme, when its backend module does not import it already.
_WORKER_MODULES: Mapping[str, tuple[str, ...]] = {
    "tcp": ("remote_executor.jobserver.worker",),
    "zmq": ("remote_executor.jobserver.worker",),
    "gearman": ("remote_executor.transports.gearman.worker",),
}


_die_with_parent: Callable[[], None] | None = None  # in the fork server: see deathsig


class ForkServerError(OSError):
    """The fork server could not start a worker (it is gone, or did not answer): spawn one instead."""


class ForkedProcess:
    """A worker forked by the fork server: the part of :class:`subprocess.Popen` a supervisor uses."""

    def __init__(self, pid: int, args: Sequence[str]) -> None:
        self.pid = pid
        self.args = list(args)
        self.returncode: int | None = None
        self.on_exit: Callable[[], None] | None = None
        self._exited = threading.Event()

    def _set_exit(self, code: int) -> None:
        self.returncode = code
        self._exited.set()
        if self.on_exit is not None:
            self.on_exit()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:  # once reaped, the pid may be someone else's
            with contextlib.suppress(ProcessLookupError):  # it has just ended: its exit is on its way
                os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The executor's end of one fork server process."""

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme
        self.executable = sys.executable
        # A process forked from ours (os.fork, multiprocessing's "fork") inherits this object and its socket,
        # which it must neither use (replies would go to either process) nor shut down (that ends it for us).
        self.owner = os.getpid()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "remote_executor.forkserver", str(theirs.fileno()), scheme],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=_server_env())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        self._lock = threading.Lock()
        self._next_id = 0
        self._replies: dict[int, tuple[threading.Event, list[Any], Sequence[str]]] = {}
        self._children: dict[int, ForkedProcess] = {}
        self.alive = True
        self._reading = False  # a reader thread runs only while a request or a worker awaits an answer

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], fds: Sequence[int], *,
              quiet: bool = False) -> ForkedProcess:
        """Fork ``python -m remote_executor.worker ARGV`` with ``env``; ``fds`` (lifeline, serving pipe) are
        passed to the worker, whose environment names them by their numbers there. The worker's standard
        output and error are this process's as they are now (as a spawned worker's would be)."""
        done = threading.Event()
        box: list[Any] = []
        with self._lock:
            if not self.alive:
                raise ForkServerError("the fork server has exited")
            self._next_id += 1
            request_id = self._next_id
            self._replies[request_id] = (done, box, argv)
            if not self._reading:
                self._reading = True
                threading.Thread(target=self._read, name="remote-executor-forkserver", daemon=True).start()
            stdio = [fd for fd in (1, 2) if _is_open(fd)]
            request = {"id": request_id, "argv": list(argv), "env": dict(env), "cwd": os.getcwd(),
                       "path": [os.getcwd(), *python_path().split(os.pathsep)], "quiet": quiet, "stdio": stdio}
            try:
                socket.send_fds(self._sock, [pickle.dumps(request)], [*fds, *stdio])
            except OSError as exc:
                del self._replies[request_id]
                raise ForkServerError(f"cannot reach the fork server: {exc}") from exc
        if not done.wait(REPLY_TIMEOUT) or not box:
            with self._lock:
                self._replies.pop(request_id, None)
            raise ForkServerError("the fork server did not answer")
        answer = box[0]
        if not isinstance(answer, ForkedProcess):
            raise ForkServerError(f"the fork server could not fork: {answer}")
        return answer

    def _read(self) -> None:
        """Take the fork server's answers until none is awaited (so an executor that has shut down leaves
        no thread behind; the next request starts another reader) or the fork server is gone."""
        try:
            while data := self._sock.recv(_MAX_MESSAGE):
                self._handle(pickle.loads(data))  # from our own child, over a socket pair nobody else holds
                with self._lock:
                    if not self._replies and not self._children:
                        self._reading = False
                        return
        except OSError:
            pass
        self._lost()

    def _handle(self, message: tuple[str, int, Any]) -> None:
        kind, key, value = message
        if kind == "exited":
            with self._lock:
                proc = self._children.pop(key, None)
            if proc is not None:
                proc._set_exit(value)
            return
        with self._lock:
            waiter = self._replies.pop(key, None)
            if waiter is None:
                return
            done, box, argv = waiter
            if kind == "started":  # watched from now on, even if its spawn() has given up waiting
                proc = ForkedProcess(value, ["remote_executor.worker", *argv])
                self._children[proc.pid] = proc
                value = proc
        box.append(value)
        done.set()

    def _lost(self) -> None:
        """The fork server is gone: its workers' exit statuses with it. A worker still running is reported
        as ended (status -SIGKILL) once it has, checked through a pidfd, so its supervisor still replaces it."""
        with self._lock:
            self.alive = False
            self._reading = False
            waiters = list(self._replies.values())
            self._replies.clear()
            orphans = list(self._children.values())
            self._children.clear()
        for done, _, _ in waiters:
            done.set()
        for proc in orphans:
            threading.Thread(target=_await_orphan, args=(proc,), daemon=True,
                             name="remote-executor-forked-worker").start()

    def close(self, timeout: float = 5.0) -> None:
        """Close the socket (the fork server exits) and reap it. Idempotent."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _await_orphan(proc: ForkedProcess) -> None:
    try:
        fd = os.pidfd_open(proc.pid)  # type: ignore[attr-defined,unused-ignore]
    except OSError:  # already gone
        proc._set_exit(-signal.SIGKILL)
        return
    try:
        selector = selectors.DefaultSelector()
        selector.register(fd, selectors.EVENT_READ)
        selector.select()
        selector.close()
    finally:
        os.close(fd)
    proc._set_exit(-signal.SIGKILL)


def python_path() -> str:
    """The parent's import path, so functions pickled by reference import in the children too."""
    entries = [p or os.getcwd() for p in sys.path]
    return os.pathsep.join(dict.fromkeys(entries))


def _server_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": python_path()}


_shared: ForkServer | None = None
_retired: list[ForkServer] = []
_shared_lock = threading.Lock()


@atexit.register
def _close_all() -> None:
    """At exit, end the fork servers. The executors' exit hook has stopped their workers by now; any other
    ends with its fork server (its parent-death signal, :mod:`.deathsig`), or else by its lifeline."""
    with _shared_lock:
        for server in [*_retired, *([_shared] if _shared is not None else [])]:
            if server.owner == os.getpid():  # not one a forked child inherited: that is its parent's
                server.close()


def shared(scheme: str) -> ForkServer | None:
    """This process's fork server (started on first use, again if it has exited); None where workers cannot
    be forked (not Linux) or it cannot start. Kept for the process's lifetime, so a second executor's
    workers start as fast as its first's; a new one if ``sys.executable`` changed meanwhile."""
    global _shared
    if not SUPPORTED:
        return None
    with _shared_lock:
        current = _shared
        if current is not None and current.owner != os.getpid():
            current = _shared = None  # inherited by a fork of our process: its parent's, left alone
            _retired.clear()
        if current is None or not current.alive or current.executable != sys.executable:
            if current is not None and not current.alive:
                current.close()
            elif current is not None:  # another interpreter's: kept until exit, it reports its workers' exits
                _retired.append(current)
            try:
                _shared = ForkServer(scheme)
            except OSError as exc:
                log.debug("no fork server (%s): spawning workers", exc)
                _shared = None
        return _shared


# --- the fork server process ----------------------------------------------------------------------------


def serve(sock: socket.socket, scheme: str) -> None:
    """Fork a worker per request until the socket closes. Single-threaded: nothing else runs here."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the executor's process, which stops us
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(wake_w)
    _preload(scheme)
    global _die_with_parent
    _die_with_parent = deathsig.prepare()  # this process never runs a second thread: the caveat cannot bite
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    try:
        _loop(sock, selector, (wake_r, wake_w))
    except OSError:  # the executor's process is gone mid-reply
        return


def _loop(sock: socket.socket, selector: selectors.BaseSelector, private: tuple[int, int]) -> None:
    wake_r = private[0]
    while True:
        for key, _ in selector.select():
            if key.fileobj is sock:
                message, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 8)
                if not message:
                    return  # the executor's process is gone: its workers end with this process (deathsig)
                _fork(sock, pickle.loads(message), fds, private)
            else:
                with contextlib.suppress(OSError):
                    os.read(wake_r, 4096)
        _reap(sock)


def _preload(scheme: str) -> None:
    """Import what a worker imports, once, so no forked worker has to."""
    from .transports import get_backend
    from .worker import main  # noqa: F401

    # urllib.parse: the worker's URL (imported where used, not at start-up); encodings.idna: the first
    # connect to a host name given as text.
    for name in ("cloudpickle", "urllib.parse", "encodings.idna", "gc", *_WORKER_MODULES.get(scheme, ())):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    with contextlib.suppress(Exception):  # an unknown scheme or a missing extra: the worker says so itself
        get_backend(scheme)


def _fork(sock: socket.socket, request: dict[str, Any], fds: list[int], private: tuple[int, int]) -> None:
    threads = thread_count()
    try:
        if threads != 1:  # something imported here started one: forking now could deadlock the worker
            raise OSError(f"the fork server runs {threads} threads")
        pid = os.fork()
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        sock.send(pickle.dumps(("failed", request["id"], str(exc))))
        return
    if pid == 0:
        _child(sock, request, fds, private)  # never returns
    for fd in fds:
        os.close(fd)
    sock.send(pickle.dumps(("started", request["id"], pid)))


def thread_count() -> int:
    """The threads of this process, the kernel's count (native threads too, which ``threading`` misses)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sock.send(pickle.dumps(("exited", pid, os.waitstatus_to_exitcode(status))))


def _child(sock: socket.socket, request: dict[str, Any], fds: list[int], private: tuple[int, int]) -> None:
    """In the forked worker: undo the fork server's own settings, take the request's, run the worker."""
    code: int = 1
    try:
        if _die_with_parent is not None:  # stuck in C code, it would outlive us and the executor otherwise
            _die_with_parent()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sock.close()
        for fd in private:
            os.close(fd)
        os.chdir(request["cwd"])
        sys.path[:] = request["path"]
        lifeline, serving, *stdio = fds
        for target, fd in zip(request["stdio"], stdio, strict=True):  # the executor's, as it is now
            os.dup2(fd, target)
            os.close(fd)
        code = run_worker(request["argv"], request["env"], (lifeline, serving), quiet=request["quiet"])
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def run_worker(argv: Sequence[str], env: Mapping[str, str], fds: tuple[int, int], *, quiet: bool) -> int:
    """In a forked child: become ``python -m remote_executor.worker ARGV`` with ``env`` and the lifeline and
    serving pipes ``fds`` (named in its environment by their numbers); its exit status."""
    from .transports.base import LIFELINE_ENV, SERVING_ENV
    from .worker import main

    os.environ.clear()
    os.environ.update(env)
    for name, fd in zip((LIFELINE_ENV, SERVING_ENV), fds, strict=True):
        os.environ[name] = str(fd)
    if quiet:
        redirect(2, os.O_WRONLY)
    sys.argv = ["remote_executor.worker", *argv]
    return _run(main, argv)


def redirect(target: int, mode: int) -> None:
    """Point ``target`` at the null device."""
    devnull = os.open(os.devnull, mode)
    os.dup2(devnull, target)
    os.close(devnull)


def _run(main: Callable[[Sequence[str]], int], argv: Sequence[str]) -> int:
    """``main(argv)`` and what the interpreter does when a program ends: the exit status of ``sys.exit``,
    a traceback for an uncaught exception, non-daemon threads joined, ``atexit`` handlers, flushed output."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    with contextlib.suppress(BaseException):
        threading._shutdown()  # type: ignore[attr-defined]
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    return code


def _main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    try:
        serve(sock, sys.argv[2])
    finally:
        sock.close()


if __name__ == "__main__":
    _main()
