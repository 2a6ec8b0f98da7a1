"""Keeps N worker processes alive: starts them, replaces one that crashes, drains or stops them all.

Each child gets a lifeline pipe (it exits the moment the supervisor dies, unless it cannot run the thread
that reads it: stopped, or in a C call holding the interpreter lock; a supervisor that ends on purpose
kills those first, one killed outright leaves them until they can) and, on Linux, is watched through a
pidfd so a crash is noticed at once rather than by polling. With
``fork_server`` a child is forked by this process's fork server (:mod:`.forkserver`) instead of spawned as
a fresh interpreter, and a spawned one where that is not possible; with ``fork_here`` too, the first
children are forked from this process itself while it runs no other thread (:mod:`.forkhere`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from . import forkhere, forkserver, privatedirs
from .netio import Backoff
from .transports.base import (
    EXIT_STOPPED,
    EXIT_TIMED_OUT,
    EXIT_UNREACHABLE,
    LIFELINE_ENV,
    REFUSED,
    SERVING_ENV,
    SIBLINGS_DIR_ENV,
)

log = logging.getLogger("remote_executor.supervisor")

CRASH_WINDOW = 2.0  # a child that dies sooner than this after start counts as crash-looping
MAX_RESTART_DELAY = 5.0


class Process(Protocol):
    """What the supervisor uses of a child: a spawned :class:`subprocess.Popen` or a forked worker."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, signum: int) -> None: ...

    def kill(self) -> None: ...


@dataclass
class Child:
    index: int
    proc: Process
    lifeline: int  # write end; closing it makes the child exit
    started: float
    pidfd: int | None

    def cut_lifeline(self) -> None:
        if self.lifeline >= 0:
            _close(self.lifeline)
            self.lifeline = -1


class Supervisor:
    """Start, restart and stop ``processes`` children running ``python -m remote_executor.worker URL``."""

    def __init__(
        self,
        url: str,
        processes: int,
        *,
        env: Mapping[str, str] | None = None,
        worker_args: tuple[str, ...] = (),
        name: str = "worker",
        restart: bool = True,
        capture_output: bool = False,
        fork_server: str | None = None,
        fork_here: bool = False,
        sibling_records: bool = False,
    ) -> None:
        """``fork_server``: the scheme whose workers a fork server should prepare (fork rather than spawn);
        ``fork_here``: fork the children :meth:`start` starts from this process, if it runs no other thread;
        ``sibling_records``: give the children a private directory to share (``Backend.sibling_records``)."""
        if processes < 1:
            raise ValueError("processes must be at least 1")
        self.url = url
        self.processes = processes
        self.name = name
        self.restart = restart
        self.restarts = 0
        self.exits: list[tuple[str, int | None]] = []  # (worker name, exit status) of every child that ended
        self._env = {**os.environ, **(env or {}), "PYTHONPATH": forkserver.python_path()}
        self._args = worker_args
        self._quiet = capture_output
        self._stderr = subprocess.DEVNULL if capture_output else None
        self._fork_scheme = fork_server
        self._fork_server: forkserver.ForkServer | None = None  # asked for when first needed
        self._fork_here = fork_here
        self._children: dict[int, Child] = {}
        self._crash_backoff: dict[int, Backoff] = {}  # per child index, while it crash-loops
        self._restart_at: dict[int, float] = {}  # child index -> when its crash backoff ends (watcher thread)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._serving_r, self._serving_w = os.pipe()  # each child writes a byte here once it serves
        os.set_blocking(self._serving_r, False)
        self._selector.register(self._serving_r, selectors.EVENT_READ, None)
        self._refused: set[int] = set()  # indexes of children the job server refused: not restarted
        self._stopped: set[int] = set()  # indexes of children whose job server was stopped with its workers
        self._unreachable: set[int] = set()  # indexes of children that gave up reaching their job server
        self.unreachable = threading.Event()  # set once every child has ended for good, some unreachable
        self.stopped = threading.Event()  # set once every child exited for good (remote-executor stop --workers)
        self.serving = threading.Event()  # set once any child has completed its first handshake
        self.changed = threading.Event()  # set whenever a child first serves or ends (for waiters to clear)
        self.refused = threading.Event()  # set once every child was refused (a wrong key, other versions)
        self._thread: threading.Thread | None = None
        self._sibling_records = sibling_records
        self._siblings_dir: privatedirs.PrivateDir | None = None
        self._cpu_seen: dict[int, int] = {}  # pid -> CPU ticks at computing()'s last look

    # --- public ------------------------------------------------------------------------------------

    def start(self) -> None:
        self._env.pop(SIBLINGS_DIR_ENV, None)  # (a supervisor's own: never its parent's, if it had one)
        if self._sibling_records:
            self._siblings_dir = _make_siblings_dir()
            if self._siblings_dir is not None:
                self._env[SIBLINGS_DIR_ENV] = self._siblings_dir.path
        try:
            for index in range(self.processes):
                self._spawn(index)
        except BaseException:  # (out of file descriptors, a fork refused): none of them is left behind
            self.stop()
            raise
        finally:
            self._fork_here = False  # a child started later has the watcher thread (at least) beside it
        self._thread = threading.Thread(target=self._watch, name="remote-executor-supervisor", daemon=True)
        self._thread.start()

    def pids(self) -> list[int]:
        with self._lock:
            return [c.proc.pid for c in self._children.values()]

    def computing(self, pid: int) -> bool:
        """True if ``pid`` is a worker of ours on a CPU (running, or it used CPU time since the last look): a
        call holding the interpreter lock in C code lets no heartbeat out, yet is not hung. False for one
        stopped (SIGSTOP), asleep without using the CPU, gone, or where ``/proc`` cannot say."""
        if pid not in self.pids():
            return False
        try:
            with open(f"/proc/{pid}/stat", "rb") as file:
                stat = file.read()
        except OSError:
            return False
        fields = stat[stat.rindex(b")") + 2:].split()  # (the name before it may hold spaces)
        state, cpu = fields[0], int(fields[11]) + int(fields[12])  # state; utime + stime, in clock ticks
        before, self._cpu_seen[pid] = self._cpu_seen.get(pid), cpu
        return state == b"R" or (state not in (b"T", b"t", b"Z", b"X") and before is not None and cpu > before)

    def kill_hung(self, worker: int | str, running_since: float | None = None) -> None:
        """SIGKILL the child ``worker`` (its pid, or the name this supervisor gave it), if it is one of ours
        and still runs: its job server gave it up as hung, and a process stuck (in C code, or stopped) would
        never notice. The watcher replaces it as any child that died. Nothing if ``worker`` is not a child of
        ours (a worker announces its pid and name itself), nor if it started after ``running_since`` (a
        ``time.monotonic()``): a replacement has the name of the child it replaced, not its hang."""
        with self._lock:
            child = next((c for c in self._children.values()
                          if worker in (c.proc.pid, f"{self.name}-{c.index}")
                          and (running_since is None or c.started <= running_since)), None)
        if child is not None:
            log.warning("worker process %d was given up as hung; killing it (another one replaces it)",
                        child.proc.pid)
            _signal(child.proc, signal.SIGKILL)  # (only if it still runs)

    def drain(self, timeout: float | None = None) -> None:
        """SIGTERM every child (finish the running call, then exit) and wait for them."""
        self._halt_watcher()
        for child in self._snapshot():
            _signal(child.proc, signal.SIGTERM)
            _signal(child.proc, signal.SIGCONT)  # a stopped child (SIGSTOP) drains too, rather than never
        self._reap_all(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """End every child now (lifeline closed, then SIGKILL after ``timeout``). Idempotent."""
        self._halt_watcher()
        for child in self._snapshot():
            child.cut_lifeline()
            _signal(child.proc, signal.SIGCONT)  # a stopped child (SIGSTOP) reads its lifeline too, at once
        self._reap_all(timeout)

    # --- internals -----------------------------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        if self._stopping.is_set():
            return
        read_end, write_end = os.pipe()
        try:
            proc, pidfd = self._start_child(read_end, index)
        except BaseException:
            os.close(write_end)  # a child that started all the same ends with its lifeline
            raise
        finally:
            os.close(read_end)
        child = Child(index, proc, write_end, time.monotonic(), pidfd)
        with self._lock:
            self._children[index] = child
        if pidfd is not None:
            self._selector.register(pidfd, selectors.EVENT_READ, index)
        os.write(self._wake_w, b"x")  # re-arm the watcher's wait

    def _start_child(self, lifeline: int, index: int) -> tuple[Process, int | None]:
        """Fork the child if the fork server can, else spawn it; the pidfd to watch, if any (a forked
        child's exit is reported by the fork server instead, which also gives its exit status)."""
        args = [self.url, f"--name={self.name}-{index}", *self._args]  # (one argument: a name may start with -)
        if self._fork_here and forkhere.possible():
            try:
                here = forkhere.fork_worker(args, self._env, (lifeline, self._serving_w), quiet=self._quiet)
            except OSError as exc:  # EAGAIN, or ENOMEM under strict overcommit: the fork server's fork is small
                log.info("forking worker %s-%d from the fork server: %s", self.name, index, exc)
                self._fork_here = False
            else:
                return here, _pidfd(here.pid)
        if self._fork_server is None and self._fork_scheme is not None:
            self._fork_server = forkserver.shared(self._fork_scheme)
            self._fork_scheme = None  # asked once: None means spawn from now on
        if self._fork_server is not None:
            try:
                forked = self._fork_server.spawn(args, self._env, (lifeline, self._serving_w), quiet=self._quiet)
            except forkserver.ForkServerError as exc:
                log.info("spawning worker %s-%d: %s", self.name, index, exc)
                self._fork_server = None
            else:
                forked.on_exit = self._wake
                return forked, None
        proc = subprocess.Popen(
            [sys.executable, "-m", "remote_executor.worker", *args],
            env={**self._env, LIFELINE_ENV: str(lifeline), SERVING_ENV: str(self._serving_w)},
            pass_fds=(lifeline, self._serving_w),
            stdin=subprocess.DEVNULL,
            stderr=self._stderr,
        )
        return proc, _pidfd(proc.pid)

    def _wake(self) -> None:
        """Re-arm the watcher's wait (a forked child ended), unless the supervisor has closed its pipes."""
        with self._lock:
            if self._wake_w >= 0:
                with contextlib.suppress(OSError):
                    os.write(self._wake_w, b"x")

    def _snapshot(self) -> list[Child]:
        with self._lock:
            return list(self._children.values())

    def _watch(self) -> None:
        while not self._stopping.is_set():
            self._selector.select(timeout=self._wait_timeout())
            _drain_pipe(self._wake_r)
            if _drain_pipe(self._serving_r):
                self.serving.set()
                self.changed.set()
            for child in self._snapshot():
                if child.proc.poll() is not None and not self._stopping.is_set():
                    self._replace(child)
            now = time.monotonic()
            for index in [i for i, due in self._restart_at.items() if due <= now]:
                del self._restart_at[index]
                if not self._stopping.is_set():
                    self.restarts += 1
                    self._spawn(index)

    def _wait_timeout(self) -> float | None:
        """Until the next crash backoff ends, at most (without pidfds, exits are polled for every 0.2 s)."""
        timeout = None if _HAVE_PIDFD else 0.2
        if self._restart_at:
            until = max(min(self._restart_at.values()) - time.monotonic(), 0.0)
            timeout = until if timeout is None else min(timeout, until)
        return timeout

    def _replace(self, child: Child) -> None:
        self._forget(child)
        code = child.proc.returncode
        self.exits.append((f"{self.name}-{child.index}", code))
        self.changed.set()
        if code == REFUSED:  # restarting cannot help: its log says why (the key, the versions)
            log.error("worker %s-%d was refused by the job server; not restarting it", self.name, child.index)
            self._refused.add(child.index)
            if len(self._refused) == self.processes:
                self.refused.set()
            return
        if code == EXIT_STOPPED:  # its job server was stopped with its workers: for good, not a crash
            log.info("worker %s-%d exited: its job server was stopped with its workers", self.name, child.index)
            self._stopped.add(child.index)
            if len(self._stopped | self._refused) == self.processes:
                self.stopped.set()
            return
        if code == EXIT_UNREACHABLE:  # it gave up reaching its job server (--reconnect-timeout), as asked
            log.error("worker %s-%d gave up reaching its job server; not restarting it", self.name, child.index)
            self._unreachable.add(child.index)
            if len(self._unreachable | self._refused | self._stopped) == self.processes:
                self.unreachable.set()
            return
        if not self.restart:
            log.warning("worker %s-%d exited with %s", self.name, child.index, code)
            return
        if code == EXIT_TIMED_OUT:  # it stopped a call at its time limit, as asked: no crash, no backoff
            log.info("worker %s-%d (pid %d) stopped a call at its time limit; restarting it",
                     self.name, child.index, child.proc.pid)
            self.restarts += 1
            self._spawn(child.index)
            return
        lived = time.monotonic() - child.started
        delay = self._backoff(child.index, lived)
        log.warning("worker %s-%d (pid %d) exited with %s; restarting in %.1fs",
                    self.name, child.index, child.proc.pid, code, delay)
        if delay:  # (not waited for here: the other children's exits are seen and answered meanwhile)
            self._restart_at[child.index] = time.monotonic() + delay
            return
        self.restarts += 1
        self._spawn(child.index)

    def _backoff(self, index: int, lived: float) -> float:
        if lived >= CRASH_WINDOW:
            self._crash_backoff.pop(index, None)
            return 0.0
        return self._crash_backoff.setdefault(index, Backoff(0.1, MAX_RESTART_DELAY)).next()

    def _forget(self, child: Child) -> None:
        with self._lock:
            if self._children.get(child.index) is child:
                del self._children[child.index]
        self._cpu_seen.pop(child.proc.pid, None)
        if child.pidfd is not None:
            self._selector.unregister(child.pidfd)
            os.close(child.pidfd)
            child.pidfd = None
        child.cut_lifeline()

    def _halt_watcher(self) -> None:
        """Stop restarting children; once this returns no child can be spawned any more."""
        self._stopping.set()
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _reap_all(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for child in self._snapshot():
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.01)
            try:
                child.proc.wait(remaining)
            except subprocess.TimeoutExpired:
                log.warning("worker %s-%d did not exit in time; killing it", self.name, child.index)
                child.proc.kill()
                child.proc.wait()
            self._forget(child)
        self._close_selector()
        if self._siblings_dir is not None:
            self._siblings_dir.remove()
            self._siblings_dir = None

    def _close_selector(self) -> None:
        if self._wake_r < 0:
            return
        self._selector.close()
        with self._lock:  # a forked child's exit may be reported meanwhile (_wake)
            for fd in (self._wake_r, self._wake_w, self._serving_r, self._serving_w):
                os.close(fd)
            self._wake_r = self._wake_w = self._serving_r = self._serving_w = -1


def _make_siblings_dir() -> privatedirs.PrivateDir | None:
    """A directory only this supervisor's children use (a gearman worker's start records of time-limited
    jobs); None, logged, if it cannot be made (the children do without)."""
    try:
        return privatedirs.make("siblings")
    except OSError as exc:
        log.warning("cannot make a directory for the workers' start records (%s): a time-limited gearman call "
                    "stuck in C code may run once more after its limit", exc)
        return None


def _pidfd(pid: int) -> int | None:
    if not _HAVE_PIDFD:
        return None
    try:
        return int(os.pidfd_open(pid))  # type: ignore[attr-defined,unused-ignore]
    except OSError:
        return None


_HAVE_PIDFD = sys.platform.startswith("linux") and forkhere.pidfds_work()  # else: poll for exits


def _signal(proc: Process, signum: int) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _drain_pipe(fd: int) -> bool:
    """Read all that is there; True if anything was."""
    got = False
    try:
        while os.read(fd, 4096):
            got = True
    except (BlockingIOError, OSError):
        pass
    return got
