"""Forking the first local workers from the executor's own process, while it runs no other thread.

A cold ``RemoteExecutor()`` otherwise waits for its fork server (:mod:`.forkserver`), a fresh interpreter,
to import the worker before the first worker exists; the executor's process has imported all of it already.
So, as ``ProcessPoolExecutor`` does on Linux, the embedded cluster forks its first workers from the
executor's process itself, but only where that is safe:

- the process runs exactly one thread, counted by the kernel (native threads too: a BLAS pool, a ZeroMQ
  context), so no lock can be held by a thread that does not exist in the child;
- the job server listens already and its loop thread has not started yet (the workers wait in its
  listen backlog);
- the process has less than :data:`MAX_RESIDENT` resident (see there).

Anything else (a restarted worker, a process with threads) is forked by the fork server, or spawned.

The child keeps the caller's imported modules and their state, as a forked ``ProcessPoolExecutor`` worker
does, but not what would tie it to the caller: its connections and pipes (every socket and pipe that
Python opened close-on-exec, as a spawned worker would not have them, ours included: the job server's
listening socket, other workers' lifelines) are pointed at the null device, never closed, so no object of
the caller can later close or write to a descriptor number the worker reuses; standard input reads the null
device; its ``atexit`` functions, the exit hooks of its executors and its Python signal handlers are dropped.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import selectors
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence

from . import forkserver

SUPPORTED = forkserver.SUPPORTED and hasattr(os, "pidfd_open")
# Above this, the fork server forks instead: a fork copies the process's page tables, and every page the
# caller changes afterwards is copied while a worker still holds the original (for the cluster's lifetime).
MAX_RESIDENT = 512 << 20


def possible() -> bool:
    """True if this process may fork a worker now: Linux, no thread but the calling one, and less than
    :data:`MAX_RESIDENT` bytes resident."""
    return SUPPORTED and forkserver.thread_count() == 1 and _resident() < MAX_RESIDENT


def _resident() -> int:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return MAX_RESIDENT  # unknown: do not fork here


class ForkedChild:
    """A worker forked from this process: the part of :class:`subprocess.Popen` a supervisor uses."""

    def __init__(self, pid: int, args: Sequence[str]) -> None:
        self.pid = pid
        self.args = list(args)
        self.returncode: int | None = None
        self._lock = threading.Lock()  # the supervisor's watcher and its stopping thread both poll

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:  # reaped by someone else (os.wait() in the caller's code)
                    self.returncode = 0  # what subprocess.Popen reports then
                else:
                    if pid != 0:
                        self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if (code := self.poll()) is not None:
            return code
        try:
            pidfd = os.pidfd_open(self.pid)  # type: ignore[attr-defined,unused-ignore]
        except ProcessLookupError:  # ended and reaped meanwhile
            return self.wait(timeout)
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(pidfd, selectors.EVENT_READ)
                if not selector.select(timeout):
                    raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        finally:
            os.close(pidfd)
        code = self.poll()
        assert code is not None
        return code

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:  # not reaped yet, so the pid is still this child's
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def fork_worker(argv: Sequence[str], env: Mapping[str, str], fds: tuple[int, int], *,
                quiet: bool = False) -> ForkedChild:
    """Fork ``python -m remote_executor.worker ARGV`` from this process (check :func:`possible` first);
    ``fds``, the lifeline and serving pipes, stay open in it."""
    for stream in (sys.stdout, sys.stderr):  # else what is buffered now would be written twice
        with contextlib.suppress(Exception):
            stream.flush()
    pid = os.fork()
    if pid == 0:
        _child(argv, env, fds, quiet)  # never returns
    return ForkedChild(pid, ["remote_executor.worker", *argv])


def _child(argv: Sequence[str], env: Mapping[str, str], fds: tuple[int, int], quiet: bool) -> None:
    code = 1
    try:
        _forget_caller(keep=fds)
        code = forkserver.run_worker(argv, env, fds, quiet=quiet)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def _forget_caller(keep: Sequence[int]) -> None:
    """Drop what the child must not share with the executor's process (see the module's docstring)."""
    atexit._clear()
    # The exit hooks of the caller's executors (ours, concurrent.futures'), which threading runs when a
    # program ends: they would shut down the caller's copies here.
    getattr(threading, "_threading_atexits", []).clear()
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    for signum in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError):
            if callable(signal.getsignal(signum)):
                signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    forkserver.redirect(0, os.O_RDONLY)
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in _descriptors():
            if fd > 2 and fd != devnull and fd not in keep and _is_private(fd):
                os.dup2(devnull, fd, inheritable=False)
    finally:
        os.close(devnull)


def _descriptors() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return []


def _is_private(fd: int) -> bool:
    """A socket or pipe opened close-on-exec: one a spawned worker would not have."""
    try:
        if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
            return False
        mode = os.fstat(fd).st_mode
    except OSError:  # the listing's own descriptor, closed by now
        return False
    return stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode)
