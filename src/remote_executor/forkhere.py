"""``start_method="fork"``: the first local workers forked from the executor's own process, where safe.

A cold ``RemoteExecutor()`` otherwise waits for its fork server (:mod:`.forkserver`), a fresh interpreter,
to import the worker before the first worker exists; the executor's process has imported all of it already.
So, as ``ProcessPoolExecutor`` does on Linux, the embedded cluster can fork its first workers from the
executor's process itself, but only where that is safe:

- the process runs exactly one thread, counted by the kernel (native threads too: a BLAS pool, a ZeroMQ
  context), so no lock can be held by a thread that does not exist in the child;
- no module is being imported (the child would hold a half-made module and an import lock);
- the job server listens already and its loop thread has not started yet (the workers wait in its
  listen backlog);
- the process has less than :data:`MAX_RESIDENT` resident (see there).

Anything else (a restarted worker, a process with threads) is forked by the fork server, or spawned.

The child keeps the caller's imported modules and their state, as a forked ``ProcessPoolExecutor`` worker
does, but not what would tie it to the caller: its sockets and pipes (ours included: the job server's
listening socket, other workers' lifelines) are pointed at the null device, never closed, so no object of
the caller can later close or write to a descriptor number the worker reuses; standard input reads the null
device and the standard streams are the real ones; the caller's exit functions, finalizers, executors' exit
hooks, logging handlers, signal handlers, tracer and profiler are dropped; its objects are frozen for the
garbage collector, so they stay shared with the caller instead of being copied by the first collection.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import selectors
import signal
import stat
import subprocess
import sys
import threading
import types
import weakref
from collections.abc import Mapping, Sequence

from . import deathsig, forkserver


def pidfds_work() -> bool:
    """pidfd_open exists and is allowed (a kernel before 5.3, or a seccomp profile, refuses it at run time)."""
    try:
        os.close(os.pidfd_open(os.getpid()))  # type: ignore[attr-defined,unused-ignore]
    except (AttributeError, OSError):
        return False
    return True


SUPPORTED = forkserver.SUPPORTED and pidfds_work()
# Above this, the fork server forks instead: a fork copies the process's page tables, and every page the
# caller changes afterwards is copied while a worker still holds the original (for the cluster's lifetime).
MAX_RESIDENT = 512 << 20


def possible() -> bool:
    """True if this process may fork a worker now: Linux, no thread but the calling one, no module being
    imported, its children's exit statuses kept (SIGCHLD not ignored: a supervisor tells a refused or timed-out
    worker by them), and less than :data:`MAX_RESIDENT` bytes resident."""
    return (SUPPORTED and forkserver.thread_count() == 1 and not _importing()
            and signal.getsignal(signal.SIGCHLD) != signal.SIG_IGN and _resident() < MAX_RESIDENT)


def _importing() -> bool:
    """True while a module is being imported (a ``RemoteExecutor()`` at a module's top level): a worker
    forked now would hold that half-made module, and the import lock of a thread it does not have."""
    modules: list[object] = list(sys.modules.values())  # not always modules, whatever typeshed says
    for module in modules:
        if not isinstance(module, types.ModuleType):  # a placeholder some library put there: no import
            continue
        try:
            # Read without attribute hooks: a lazily loaded module (importlib.util.LazyLoader) would run.
            namespace = object.__getattribute__(module, "__dict__")
        except AttributeError:  # a C extension's stand-in without one (cffi's Lib): never being imported
            continue
        try:
            spec = namespace.get("__spec__")
            if getattr(spec, "_initializing", False) is True:  # (not a stand-in spec, a mock)
                return True
        except Exception:  # a module that cannot say: assume the worst, do not fork
            return True
    return False


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
            if (code := self.poll()) is not None:  # reaped before the pidfd: the pid may be another's now
                return code
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
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):  # else written twice
        with contextlib.suppress(Exception):
            stream.flush()  # type: ignore[union-attr]
    # Frozen, the caller's objects are never visited by the worker's garbage collector, which would
    # otherwise write to (and so copy) most of the caller's memory pages on its first full collection.
    # (A caller that froze them itself keeps them frozen.) Ctrl-C waits until the child ignores it.
    frozen = gc.get_freeze_count()
    gc.freeze()
    # The only thread here (see possible()) is the one that will exit with this process.
    die_with_parent = deathsig.prepare()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        pid = os.fork()
        if pid == 0:
            if die_with_parent is not None:
                die_with_parent()
            _child(argv, env, fds, quiet, mask)  # never returns
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if not frozen:
            gc.unfreeze()
    return ForkedChild(pid, ["remote_executor.worker", *argv])


def _child(argv: Sequence[str], env: Mapping[str, str], fds: tuple[int, int], quiet: bool,
           mask: set[int | signal.Signals]) -> None:
    code = 1
    try:
        _forget_caller(keep=fds)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        code = forkserver.run_worker(argv, env, fds, quiet=quiet)
    except BaseException:
        import traceback

        traceback.print_exc(file=sys.__stderr__)  # the real one: not a capture the caller had set up
    finally:
        os._exit(code)


def _forget_caller(keep: Sequence[int]) -> None:
    """Drop what the child must not share with the executor's process (see the module's docstring)."""
    _forget_exit_functions()
    _forget_signals()
    sys.settrace(None)  # a debugger's or a profiler's: the caller's breakpoints are not the worker's
    sys.setprofile(None)
    threading.settrace(None)
    threading.setprofile(None)
    sys.excepthook, sys.unraisablehook = sys.__excepthook__, sys.__unraisablehook__
    threading.excepthook = threading.__excepthook__
    for logger in [logging.root, *logging.Logger.manager.loggerDict.values()]:
        if isinstance(logger, logging.Logger):
            _kept.extend(logger.handlers)  # neither closed nor collected (which would close their files)
            logger.handlers.clear()  # the caller's: the worker configures its own
            logger.disabled = False  # (dictConfig's disable_existing_loggers)
    logging.root.setLevel(logging.WARNING)
    logging.disable(logging.NOTSET)
    tracker = getattr(sys.modules.get("multiprocessing.resource_tracker"), "_resource_tracker", None)
    if tracker is not None and hasattr(tracker, "_fd"):  # the caller's, whose pipe is about to be null
        tracker._fd = tracker._pid = None  # the worker starts its own when it needs one
    forkserver.redirect(0, os.O_RDONLY)
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in _descriptors():
            if fd > 2 and fd != devnull and fd not in keep and _is_connection(fd):
                os.dup2(devnull, fd, inheritable=False)
    finally:
        os.close(devnull)
    sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 (its read-ahead is the caller's)
    if sys.__stdout__ is not None and sys.__stderr__ is not None:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__  # a replacement (a file, a capture) is the caller's


_kept: list[object] = []  # in a forked worker: the caller's logging handlers, kept as they were


def _forget_exit_functions() -> None:
    """What the caller's exit would run, which the worker's must not: its ``atexit`` functions, the
    ``weakref.finalize`` objects registered with them, and the hooks threading runs when a program ends
    (its executors', ours among them) but ``ThreadPoolExecutor``'s own, which a pool the worker's code
    starts needs so that the worker can exit."""
    atexit._clear()
    weakref.finalize._registry.clear()  # type: ignore[attr-defined]
    weakref.finalize._registered_with_atexit = False  # type: ignore[attr-defined]
    hooks = getattr(threading, "_threading_atexits", None)
    if hooks is not None:
        pools = getattr(sys.modules.get("concurrent.futures.thread"), "_python_exit", None)
        hooks[:] = [hook for hook in hooks if pools is not None and _calls(hook, pools)]


def _calls(hook: object, target: object) -> bool:
    """True if a threading exit hook calls ``target``: stored as itself, a ``functools.partial`` of it
    (3.10, 3.11) or a lambda closing over it (3.12+)."""
    cells = getattr(hook, "__closure__", None) or ()
    return hook is target or getattr(hook, "func", None) is target or any(
        cell.cell_contents is target for cell in cells)


def _forget_signals() -> None:
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    for signum in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError):
            if callable(signal.getsignal(signum)):
                signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as the worker sets it: Ctrl-C is for the executor's process


def _descriptors() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        return []


def _is_connection(fd: int) -> bool:
    """A socket or pipe (beyond the standard streams): one a spawned worker would not have."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:  # the listing's own descriptor, closed by now
        return False
    return stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode)
