"""The worker loop of our job-server protocol, whatever carries it (tcp, zmq): one TASK/INIT/DRAIN loop.

Threading::

    main thread: connect (with backoff) → HELLO → take TASK / INIT / DRAIN frames, run them, reply
    heartbeat thread: while a call runs, HEARTBEAT (and DRAIN once SIGTERM asked for it), so a long call is
        not taken for a dead worker; while idle the main thread keeps the connection alive itself

The channel is shared under one lock: the main thread holds it while it waits for a frame (in slices of
:data:`POLL_SLICE`, so a drain or a due heartbeat is never late) and releases it while a call runs.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar, cast

from ..errors import ConnectionFailedError, FrameTooLargeError, KeyRejectedError, RemoteExecutorError
from ..logsafe import printable
from ..netio import retry_with_backoff
from ..pools import pool_of_url
from ..transports.base import EXIT_STOPPED, EXIT_UNREACHABLE, WorkerCore, WorkerSettings
from ..wire.frames import FAILED, LIMITED, Frame, Kind, Status, frame_size
from ..wire.messages import announced_limit, hello, rejection, split_limit, too_large_message
from ..wire.serialization import error_outcome
from .client import POLL_SLICE, Channel, Connector, open_session

log = logging.getLogger("remote_executor.worker")

FOREVER = float("inf")
REFUSAL_GRACE = 5.0  # seconds of key rejections (unsigned, so maybe forged) before a worker believes them
# How long a drained worker waits for a job server that has said nothing at all since the DRAIN: a live one
# answers at once. Over zmq, nothing else tells a worker that its server is gone before its heartbeat timeout.
DRAIN_ANSWER_WAIT = 2.0
_T = TypeVar("_T")


def run_worker(servers: Sequence[tuple[str, Connector]], settings: WorkerSettings, core: WorkerCore) -> int:
    """Serve the job servers of a URL until drained (0), unreachable for ``reconnect_timeout`` (1) or
    refused (2), reconnecting in between. SIGTERM (``settings.drain``) ends it whether connected or not.

    With several servers (``tcp://h1:p,h2:p``) the worker serves every one of them, each connection on a
    thread of its own; the calls still run one at a time on the main thread (a worker process is one
    slot, and user code may expect the main thread: signal handlers, some GUI and C libraries)."""
    if len(servers) == 1:
        url, connect = servers[0]
        return _serve(url, connect, settings, core, _run_here)
    runner = _MainThreadRunner()
    codes: list[int | None] = [None] * len(servers)

    def serve(index: int) -> None:
        url, connect = servers[index]
        try:
            codes[index] = _serve(url, connect, settings, core, runner)
        finally:
            runner.wake()

    threads = [threading.Thread(target=serve, args=(i,), name=f"remote-executor-server {url}", daemon=True)
               for i, (url, _) in enumerate(servers)]
    for thread in threads:
        thread.start()
    runner.run_until(lambda: all(code is not None for code in codes))
    for thread in threads:
        thread.join()
    return next((code for code in codes if code), 0)


Runner = Callable[..., Any]  # runner(work, *args) -> work(*args), on whichever thread runs calls


def _run_here(work: Callable[..., Any], *args: Any) -> Any:
    return work(*args)


class _MainThreadRunner:
    """Runs the calls that the server threads receive, one at a time, on the thread of :meth:`run_until`."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue())

    def __call__(self, work: Callable[..., Any], *args: Any) -> Any:
        done: Future[Any] = Future()
        self._queue.put((done, work, args))
        return done.result()

    def wake(self) -> None:
        self._queue.put(None)

    def run_until(self, finished: Callable[[], bool]) -> None:
        while not finished():
            item = self._queue.get()
            if item is None:
                continue
            done, work, args = item
            try:
                done.set_result(work(*args))
            except BaseException as exc:  # WorkerCore never raises; this is for KeyboardInterrupt and bugs
                done.set_exception(exc)


def _serve(url: str, connect: Connector, settings: WorkerSettings, core: WorkerCore, runner: Runner) -> int:
    """Serve one job server: connect with backoff, run a session, reconnect; the exit code at the end."""
    first = hello("worker", {"name": settings.name, "slots": 1, "pool": pool_of_url(settings.url, settings.pool),
                             "host": socket.gethostname(), "pid": os.getpid()})
    refused = _Refusals(min(REFUSAL_GRACE, settings.reconnect_timeout))

    def attempt() -> Channel:
        try:
            channel = open_session(connect, settings.key, first, settings.connect_timeout, settings.drain)
        except KeyRejectedError as exc:
            refused.check(exc)  # a transient error until the refusals have lasted the grace period
            raise
        refused.clear()
        return channel

    while True:
        log.info("connecting to %s", url)
        try:
            channel = retry_with_backoff(attempt, settings.reconnect_timeout, settings.drain,
                                         lambda exc, delay: log.info("connecting to %s: %s", url, exc),
                                         transient=(ConnectionFailedError,))
        except _Refused as exc:  # refused until --reconnect-timeout ran out
            log.error("%s refused this worker: %s", url, printable(exc.__cause__ or exc))
            return 2
        except ConnectionFailedError as exc:
            log.error("cannot reach %s: %s", url, exc)
            return EXIT_UNREACHABLE
        except RemoteExecutorError as exc:
            log.error("%s refused this worker: %s", url, printable(exc))
            return 2
        if channel is None:
            log.info("drained while not connected to %s; exiting", url)
            return 0
        if not settings.serving.is_set():
            log.info("serving %s", url)  # only now: a worker that never got in never said it serves
            settings.serving.set()
        code = _Session(url, channel, settings, core, runner).run()
        if code is not None:
            return code


class _Refused(ConnectionFailedError):
    """A key rejection not believed yet (see :class:`_Refusals`)."""


class _Refusals:
    """How long the job server's address has refused our key. The refusal is unsigned (the server shares no
    key with us), so one alone proves nothing: anyone answering there while the server restarts could send
    it. A worker believes it, and exits, once every attempt for ``grace`` seconds was refused."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._since: float | None = None

    def check(self, exc: KeyRejectedError) -> None:
        """Raise :class:`_Refused` (retried) while the refusals are younger than the grace period."""
        now = time.monotonic()
        if self._since is None:
            self._since = now
        if now - self._since < self.grace:
            raise _Refused(f"{exc} (retrying for {self.grace:g}s: an unsigned refusal could be forged)") from exc

    def clear(self) -> None:
        self._since = None


class _Session:
    """One connection's life: None from :meth:`run` means reconnect, a number is the exit code."""

    def __init__(self, url: str, channel: Channel, settings: WorkerSettings, core: WorkerCore,
                 runner: Runner) -> None:
        self.url = url
        self.runner = runner
        self.channel = channel
        self.settings = settings
        self.core = core
        self.lock = threading.Lock()
        self.busy = False
        self.stopped = threading.Event()
        self.last_send = self.last_recv = time.monotonic()
        self.drain_sent: float | None = None  # when, once SIGTERM asked for it
        self.keyed = settings.key is not None
        self.max_frame = announced_limit(channel.welcome)  # the largest frame the job server takes

    def run(self) -> int | None:
        beat = threading.Thread(target=self._beat_while_busy, name="remote-executor-heartbeat", daemon=True)
        beat.start()
        try:
            return self._work()
        except RemoteExecutorError as exc:  # the connection failed or the server sent garbage
            log.warning("lost %s: %s; reconnecting", self.url, printable(exc))
            return None
        finally:
            self.stopped.set()
            beat.join()
            self.channel.close()

    def _work(self) -> int | None:
        settings = self.settings
        while True:
            with self.lock:
                frame = self.channel.next_frame(POLL_SLICE)
                now = time.monotonic()
                if frame is None:
                    if now - self.last_recv > settings.heartbeat_timeout:
                        log.warning("no heartbeat from %s for %.1fs; reconnecting", self.url, now - self.last_recv)
                        return None
                    if (waited := self._unanswered_drain(now)) is not None:
                        log.info("%s has not answered this worker's drain in %.1fs; exiting", self.url, waited)
                        return 0
                    self._keep_alive()
                    continue
                self.last_recv = now
                if frame.kind == Kind.HEARTBEAT:
                    # A server that beats as often as we poll leaves no empty poll to send ours after.
                    self._keep_alive()
                    continue
            if frame.kind == Kind.TASK:
                self._task(frame)
            elif frame.kind == Kind.INIT:
                self._initialize(frame)
            elif frame.kind == Kind.DRAIN:
                if frame.b:  # remote-executor stop --workers
                    log.info("the job server %s was stopped with its workers; exiting for good", self.url)
                    return EXIT_STOPPED
                log.info("drained; exiting")
                return 0
            elif frame.kind == Kind.REJECT:
                log.error("%s closed this worker: %s", self.url, printable(rejection(frame, self.url)))
                return 2

    def _task(self, frame: Frame) -> None:
        """Run a TASK and answer it with its RESULT, FAILED if the outcome is an error (status counts it)."""
        limit, parts = split_limit(frame) if frame.flags & LIMITED else (None, frame.parts)
        on_timeout = None if limit is None else (lambda tid=frame.a: self._report_timeout(tid))
        outcome, failed = self._run(self.core.run_reporting, frame.b, parts, limit, on_timeout)
        self._answer(Frame(Kind.RESULT, a=frame.a, parts=outcome, flags=FAILED if failed else 0), "the result")

    def _initialize(self, frame: Frame) -> None:
        """Run an INIT; answer INIT_FAILED with its error outcome if the initializer raised (or had)."""
        failure = self._run(self.core.initialize, frame.a, frame.parts)
        if failure is not None:
            self._answer(Frame(Kind.INIT_FAILED, a=frame.a, parts=failure), "the initializer's error")

    def _run(self, work: Callable[..., _T], *args: Any) -> _T:
        """``work(*args)`` on the thread that runs calls, with the heartbeat thread covering for us."""
        self.busy = True
        try:
            if self.runner is _run_here:  # one server: no runner layer on every call's path
                return work(*args)
            return cast(_T, self.runner(work, *args))
        finally:
            with self.lock:
                self.busy = False

    def _answer(self, reply: Frame, what: str) -> None:
        """Send ``reply`` (DRAIN first, if SIGTERM asked for it), or an error outcome in its place if it is
        larger than the job server takes."""
        if self.max_frame is not None:
            size = frame_size(reply, self.keyed)
            if size > self.max_frame:  # sent, it would only cost this connection, and the call its retries
                error = FrameTooLargeError(too_large_message(what, size, self.max_frame))
                log.warning("%s", error)
                reply.parts = error_outcome(error)
                reply.flags |= FAILED if reply.kind == Kind.RESULT else 0
        with self.lock:
            if self.settings.drain.is_set() and self.drain_sent is None:
                # DRAIN before the result: the server marks us draining before our slot frees, so no
                # queued call can be handed to a worker that is about to exit.
                self._send_drain()
            self._send(reply)

    def _report_timeout(self, tid: int) -> None:
        """From the watchdog thread, just before this process exits: the call ``tid`` ran out of time."""
        if self.lock.acquire(timeout=1.0):  # the main thread is in the call, the lock is free but briefly
            try:
                self.channel.send(Frame(Kind.RESULT, a=tid, b=Status.TIMED_OUT), 1.0)
                self.channel.deliver_before_exit(1.0)  # the process ends next, without closing anything
            finally:
                self.lock.release()

    def _send(self, frame: Frame) -> None:
        """Lock held."""
        self.channel.send(frame, FOREVER)
        self.last_send = time.monotonic()

    def _send_drain(self) -> None:
        """Lock held."""
        self._send(Frame(Kind.DRAIN))
        self.drain_sent = time.monotonic()

    def _unanswered_drain(self, now: float) -> float | None:
        """The seconds since the DRAIN if it was sent long enough ago and nothing at all came since: the job
        server is gone (a TASK it sent before it saw the DRAIN would have come first). Lock held."""
        sent = self.drain_sent
        if sent is None or self.last_recv >= sent:
            return None
        wait = min(self.settings.heartbeat_timeout, max(DRAIN_ANSWER_WAIT, 2 * self.settings.heartbeat_interval))
        return now - sent if now - sent > wait else None

    def _keep_alive(self) -> None:
        """DRAIN once if SIGTERM asked for it, else a HEARTBEAT when one is due. Lock held."""
        if self.settings.drain.is_set() and self.drain_sent is None:
            self._send_drain()
        elif time.monotonic() - self.last_send >= self.settings.heartbeat_interval:
            self._send(Frame(Kind.HEARTBEAT))

    def _beat_while_busy(self) -> None:
        while not self.stopped.wait(min(self.settings.heartbeat_interval, POLL_SLICE)):
            if not self.busy:  # a racy peek, so an idle worker's main thread is not disturbed
                continue
            with self.lock:
                try:
                    if self.busy:  # again under the lock: the main thread may just have taken the channel back
                        self._keep_alive()
                except RemoteExecutorError:
                    return  # the main thread sees the broken connection when it next uses it
