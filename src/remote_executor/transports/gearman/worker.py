"""The worker side of the gearman transport: grab jobs from every gearmand of the URL, run them, reply.

Threading::

    main thread: grab from whichever server has work, verify, run, reply (one job at a time)
    one connector thread per server: (re)connects with backoff, registers ``CAN_DO remote_executor.<pool>``
    a write watcher: cuts a connection whose write made no progress for ``heartbeat_timeout`` (the writer is stuck)

The main thread grabs only while idle, so a worker never holds a job it cannot start (gearmand hands a
queued job to the next idle worker instead). With one server it blocks in ``grab_job`` (a quarter second at
a time, to notice a drain); with several it sends a grab to each (``grab_job(0)`` advances each
connection's grab/sleep state without blocking) and waits on all their sockets at once, so a job on any
server wakes it at once. Between grabs it asks a gearmand it has heard nothing from for a heartbeat interval
for an echo, and reconnects to one that leaves it unanswered for ``heartbeat_timeout``: a connection that died
without a word (a host gone, a NAT that dropped it) would otherwise look like a quiet gearmand for ever.

Before running a job the worker sends ``WORK_DATA "started by <name>"`` (the client counts starts to enforce
``max_retries``, names lost workers and starts a time limit's clock), unless the job says its client does not
need it (``QUIET``: a gearmand that bounds retries itself, no limit): then the first heartbeat of a call that
runs that long says it instead of ``alive``. A job with a time limit runs under the same watchdog as on
tcp and zmq: at the limit the worker answers ``RESULT(b=TIMED_OUT)`` and its process exits, so its
supervisor starts a fresh one. A job that does not verify with the key (or is not encrypted while
the worker has one) is refused before anything is parsed or unpickled, and so is an authenticated job that
expired or whose job id this process has already accepted (a replay, :mod:`.replay`): ``WORK_DATA "refused
by <name>: ..."``, then ``WORK_FAIL``, and a log line. The result is sealed for exactly the job it answers.
SIGTERM drains: no new grabs, the running call finishes, then ``CANT_DO`` and exit 0 (not ``CANT_DO`` at
once: gearmand 1.1.20 would take the running job away from the worker).
"""

from __future__ import annotations

import contextlib
import logging
import select
import threading
import time
from collections.abc import Callable, Iterator

from ...errors import AuthenticationError, FrameTooLargeError, ProtocolError
from ...logsafe import limited, owner, printable
from ...netio import retry_with_backoff
from ...security import check_connect, is_loopback
from ...wire.frames import Frame, Kind, Status
from ...wire.messages import timed_out_parts, too_large_message
from ...wire.serialization import Buffer, error_outcome
from ..base import EXIT_UNREACHABLE, WorkerCore, WorkerSettings
from .codec import GearmanError
from .connection import GearmanConnectionError, GearmanWorkerConnection, Job
from .jobs import (
    ALIVE,
    MAX_JOB_SIZE,
    REFUSED,
    STARTED,
    JobCodec,
    JobIdentity,
    OpenedJob,
    function_name,
    parse_url,
)
from .replay import ReplayGuard
from .siblings import SiblingStarts
from .tlssocket import tls_context

log = logging.getLogger("remote_executor.gearman")

IDLE_WAIT = 0.25  # how long one wait for work lasts before the drain flag is looked at again
DRAIN_GRAB = 0.05  # at drain, how long to wait for a job gearmand may already have assigned


class _ServerLink:
    """One job server: its live connection (or None) and the thread that (re)connects it."""

    def __init__(self, worker: GearmanWorker, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.address = f"{host}:{port}"
        self.conn: GearmanWorkerConnection | None = None
        self.pinged_at: float | None = None  # when the echo gearmand has not answered yet was asked (main thread)
        self.wanted = threading.Event()  # set: the connector should (re)connect
        self.wanted.set()
        self._worker = worker
        self.thread = threading.Thread(target=self._connector, name=f"gearman-connector {self.address}",
                                       daemon=True)

    def _connector(self) -> None:
        worker = self._worker
        while True:
            self.wanted.wait()
            if worker.stop.is_set():
                return
            conn = retry_with_backoff(self._attempt, float("inf"), worker.stop,
                                      lambda exc, delay: log.info("connecting to gearmand %s: %s", self.address, exc))
            if conn is None:  # stopping
                return
            with worker.changed:
                self.conn, self.pinged_at = conn, None
                self.wanted.clear()
                worker.changed.notify_all()
            log.info("registered %s with gearmand %s", worker.function.decode(), self.address)
            worker.settings.serving.set()

    def _attempt(self) -> GearmanWorkerConnection:
        worker = self._worker
        return GearmanWorkerConnection(self.host, self.port, [worker.function], client_id=worker.client_id,
                                       connect_timeout=worker.settings.connect_timeout, tls=worker.tls,
                                       cancelled=worker.stop.is_set)

    def lost(self, exc: BaseException) -> None:
        """The connection broke (main thread): close it and have the connector reconnect."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
            log.warning("lost gearmand %s: %s; reconnecting", self.address, printable(exc))
        self.wanted.set()


class GearmanWorker:
    def __init__(self, settings: WorkerSettings, core: WorkerCore) -> None:
        addresses, pool = parse_url(settings.url, settings.pool)
        self.settings = settings
        self.core = core
        self.function = function_name(pool)
        self.tls = tls_context(settings.extra)
        self.codec = JobCodec(settings.key, self.function)  # with a key: fails here without cryptography
        self.replays = ReplayGuard()
        self.siblings = SiblingStarts.from_env()  # set by a supervisor: see :mod:`.siblings`
        self.client_id = "".join(c if c.isprintable() and not c.isspace() else "_" for c in settings.name).encode()
        self.stop = threading.Event()
        self.changed = threading.Condition()
        self.servers = [_ServerLink(self, host, port) for host, port in addresses]
        self._turn = 0
        check_connect([host for host, _ in addresses], settings.key, settings.insecure, "worker")
        if settings.key is None and not all(is_loopback(host) for host, _ in addresses):
            log.warning("no key (insecure): anyone who can reach gearmand at %s can make this worker run code",
                        ", ".join(s.address for s in self.servers))

    def run(self) -> int:
        """Serve until drained (0) or no server was reachable for ``reconnect_timeout`` (1)."""
        for server in self.servers:
            server.thread.start()
        watchers = [threading.Thread(target=self._watch_drain, name="gearman-drain-watcher", daemon=True),
                    threading.Thread(target=self._watch_writes, name="gearman-write-watcher", daemon=True)]
        for watcher in watchers:
            watcher.start()
        self.alive = _Alive(self.settings.heartbeat_interval)
        try:
            return self._serve()
        finally:
            self.alive.stop()
            self.stop.set()
            for server in self.servers:
                server.wanted.set()
                if server.conn is not None:
                    server.conn.close()
            for server in self.servers:
                server.thread.join()
            for watcher in watchers:
                watcher.join()

    def _watch_drain(self) -> None:
        """Say at once that SIGTERM arrived. Unregistering must wait until the running call is done: on
        gearmand 1.1.20 a CANT_DO takes the running job away from the worker (its WORK_COMPLETE then gets
        JOB_NOT_FOUND)."""
        while not self.stop.wait(0.05):
            if self.settings.drain.is_set():
                log.info("SIGTERM: draining (the running call finishes, no new ones start)")
                return

    def _watch_writes(self) -> None:
        """Cut a connection whose write has made no progress for ``heartbeat_timeout``: gearmand stopped reading
        (stopped, hung, or cut off with the connection up), and the writer (the main thread replying, or a
        heartbeat) would wait for it for ever. The cut wakes the writer, and the server is reconnected to
        like a lost one. A thread of its own, because the writer is blocked."""
        timeout = self.settings.heartbeat_timeout
        while not self.stop.wait(self.settings.heartbeat_interval / 2):
            now = time.monotonic()
            for server in self.servers:
                conn = server.conn
                if conn is not None and (stalled := conn.stalled_for(now)) > timeout:
                    conn.cut(f"a write to gearmand made no progress for {stalled:.1f}s")

    def _check_silence(self, polled: list[_ServerLink]) -> None:
        """(main thread, right after reading all that ``polled`` had sent: only those are judged) An idle
        worker hears nothing from gearmand until there is work, so after a heartbeat interval of silence it
        asks each gearmand for an echo. One that leaves it unanswered for ``heartbeat_timeout`` is stopped,
        hung, or cut off with the connection still up (a host gone, a NAT or firewall that dropped the idle
        connection): the worker would wait on it for ever and never get its jobs, so it reconnects, which
        takes an answer."""
        now = time.monotonic()
        interval, timeout = self.settings.heartbeat_interval, self.settings.heartbeat_timeout
        for server in polled:
            conn = server.conn
            if conn is None:
                continue
            if server.pinged_at is not None and conn.last_heard >= server.pinged_at:
                server.pinged_at = None  # it answered, or said something else meanwhile
            try:
                if server.pinged_at is None:
                    if now - conn.last_heard >= interval and conn.ping():
                        server.pinged_at = now
                elif now - server.pinged_at > timeout:
                    server.lost(GearmanConnectionError(f"it has not answered for {now - server.pinged_at:.1f}s"))
            except (GearmanError, OSError) as exc:
                server.lost(exc)

    def _serve(self) -> int:
        down_since: float | None = None
        while not self.settings.drain.is_set():
            live = [s for s in self.servers if s.conn is not None]
            if not live:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > self.settings.reconnect_timeout:
                    log.error("no gearmand of %s reachable for %.1fs; exiting", self.settings.url,
                              self.settings.reconnect_timeout)
                    return EXIT_UNREACHABLE
                with self.changed:
                    if not any(s.conn is not None for s in self.servers):
                        self.changed.wait(IDLE_WAIT)
                continue
            down_since = None
            if len(live) == 1:
                found, polled = self._grab_one(live[0], IDLE_WAIT), live
            else:
                found, polled = self._grab_any(live)
            self._check_silence(polled)
            if found is not None:
                self._run_job(*found)
        return self._drain()

    def _grab_one(self, server: _ServerLink, timeout: float) -> tuple[_ServerLink, Job] | None:
        assert server.conn is not None
        try:
            job = server.conn.grab_job(timeout)
        except (GearmanError, OSError) as exc:
            server.lost(exc)
            return None
        return (server, job) if job is not None else None

    def _grab_any(self, live: list[_ServerLink]) -> tuple[tuple[_ServerLink, Job] | None, list[_ServerLink]]:
        """A job from whichever server has one, and the servers whose packets were all read meanwhile."""
        self._turn += 1
        start = self._turn % len(live)
        turn = live[start:] + live[:start]  # a fair turn: each server gets to go first in turn
        for polled, server in enumerate(turn, 1):
            found = self._grab_one(server, 0)
            if found is not None:
                return found, turn[:polled - 1]  # (the last may have more waiting behind its job)
        socks = [s.conn._sock for s in live if s.conn is not None]  # the connection has no fileno()
        with contextlib.suppress(OSError, ValueError):  # a socket closed under us: the next grab says so
            select.select(socks, [], [], IDLE_WAIT)
        return None, turn

    def _run_job(self, server: _ServerLink, job: Job) -> None:
        conn = server.conn
        assert conn is not None
        try:
            self._reply(conn, job)
        except (GearmanError, OSError) as exc:  # the reply is lost; gearmand requeues the job if it still can
            server.lost(exc)

    def _reply(self, conn: GearmanWorkerConnection, job: Job) -> None:
        try:
            opened = self.codec.decode_job(job.payload)
        except AuthenticationError as exc:
            self._refuse(conn, job, "refused a job it cannot authenticate (another key, or a rogue client)", exc)
            return
        except ProtocolError as exc:
            self._refuse(conn, job, "refused a malformed job", exc)
            return
        refusal = self._admit(opened)
        if refusal is not None:
            self._refuse(conn, job, refusal, None)
            return
        identity = opened.identity(self.function)
        siblings = self.siblings if opened.limit is not None and opened.job_id else None
        if siblings is not None:
            assert opened.limit is not None
            earlier = siblings.earlier(opened.job_id)
            if earlier is not None and time.monotonic() - earlier[0] >= opened.limit:
                # A sibling ran it past its limit and was killed before it could answer: never run it again.
                log.warning("job %s: a sibling worker (%s) ran it past its limit of %gs; answering it as timed "
                            "out without running it", printable(job.handle), printable(earlier[1]), opened.limit)
                conn.complete(job.handle, self._timed_out(opened, identity, earlier[1]))
                siblings.forget(opened.job_id)
                return
            siblings.record(opened.job_id, self.settings.name)
        try:
            self._run_and_reply(conn, job, opened, identity)
        finally:
            if siblings is not None:
                siblings.forget(opened.job_id)

    def _run_and_reply(self, conn: GearmanWorkerConnection, job: Job, opened: OpenedJob,
                       identity: JobIdentity) -> None:
        started = STARTED + self.settings.name.encode()
        if opened.report_start:
            conn.send_data(job.handle, started)
        with self.alive.beating(conn, job.handle, ALIVE if opened.report_start else started):
            reply = self._run(opened, lambda: self._report_timeout(conn, job.handle, opened, identity))
        payload = self.codec.encode_result(reply, identity)
        if (size := memoryview(payload).nbytes) > MAX_JOB_SIZE:  # it could never reach the client
            error = FrameTooLargeError(too_large_message("the result", size, MAX_JOB_SIZE))
            log.warning("%s", error)
            payload = self.codec.encode_result(Frame(reply.kind, a=reply.a, parts=error_outcome(error)), identity)
        conn.complete(job.handle, payload)

    def _admit(self, opened: OpenedJob) -> str | None:
        """Why an authenticated job must not run (expired, or a copy of one this process accepted), or None.
        Jobs without a key carry no id: whoever reaches gearmand can submit anything anyway."""
        if opened.expiry is None:
            return None
        return self.replays.admit(opened.job_id, opened.expiry, time.time())

    def _run(self, opened: OpenedJob, on_timeout: Callable[[], object]) -> Frame:
        """The initializer (once per executor) and the call: the RESULT frame, or BROKEN."""
        frame = opened.frame
        executor_id, init = frame.b, frame.flags
        if init:
            failure = self.core.initialize(executor_id, frame.parts[:init])
            if failure is not None:
                return Frame(Kind.BROKEN, a=executor_id, parts=failure)
        parts = self.core.run(executor_id, frame.parts[init:], opened.limit, on_timeout)
        return Frame(Kind.RESULT, a=frame.a, parts=parts)

    def _report_timeout(self, conn: GearmanWorkerConnection, handle: bytes, opened: OpenedJob,
                        identity: JobIdentity) -> None:
        """From the watchdog thread, just before this process exits: the job's answer is TIMED_OUT. The main
        thread is inside the call, so the connection is free (its sends are locked all the same)."""
        self.alive.stop_beating()  # no "alive" after the answer
        conn.complete(handle, self._timed_out(opened, identity, self.settings.name))
        if self.siblings is not None and opened.job_id:
            self.siblings.forget(opened.job_id)  # answered: gearmand will not hand it out again

    def _timed_out(self, opened: OpenedJob, identity: JobIdentity, worker: str) -> Buffer:
        """The sealed answer to a job whose call ran past its limit on ``worker``."""
        assert opened.limit is not None
        parts = timed_out_parts(worker, opened.limit)
        return self.codec.encode_result(Frame(Kind.RESULT, a=opened.frame.a, b=Status.TIMED_OUT, parts=parts),
                                        identity)

    def _refuse(self, conn: GearmanWorkerConnection, job: Job, what: str, exc: Exception | None) -> None:
        why = what if exc is None else f"{what}: {exc}"
        limited(log, logging.ERROR, (owner(self), "refused", what), "%s (job %s from gearmand %s)", printable(why),
                printable(job.handle), conn.address)
        conn.send_data(job.handle, REFUSED + f"{self.settings.name}: {why}".encode())
        conn.fail(job.handle)

    def _drain(self) -> int:
        """SIGTERM: unregister, run a job gearmand had already assigned (if any), exit 0."""
        log.info("draining: no new jobs")
        for server in self.servers:
            if server.conn is None:
                continue
            try:
                server.conn.cant_do(self.function)
            except (GearmanError, OSError) as exc:
                server.lost(exc)
                continue
            found = self._grab_one(server, DRAIN_GRAB)
            if found is not None:
                self._run_job(*found)
        log.info("drained; exiting")
        return 0


class _Alive:
    """While a job runs, WORK_DATA "alive" every ``interval`` through gearmand to its client: the client's
    liveness check for a worker that hangs (a deadlock, SIGSTOP) with its connection still up. One thread
    for the worker's life; a job only sets and clears what it beats for."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._current: tuple[GearmanWorkerConnection, bytes] | None = None
        self._first = ALIVE
        self._since = 0.0  # when the current job began
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="remote-executor-gearman-alive", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def beating(self, conn: GearmanWorkerConnection, handle: bytes, first: bytes = ALIVE) -> Iterator[None]:
        """Beat for ``handle`` while the block runs; the first beat says ``first`` (the start report of a
        job that had none, sent once the call has run for an interval), the others ``alive``."""
        with self._lock:
            self._current = (conn, handle)
            self._first = first
            self._since = time.monotonic()
        try:
            yield
        finally:
            self.stop_beating()

    def stop_beating(self) -> None:
        with self._lock:
            self._current = None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:  # held while sending, so no beat for a job follows its WORK_COMPLETE
                if self._current is None:
                    continue
                conn, handle = self._current
                if self._first != ALIVE and time.monotonic() - self._since < self._interval:
                    continue  # a start report only for a call that runs a whole interval: short ones cost none
                beat, self._first = self._first, ALIVE
                try:
                    conn.send_data(handle, beat)
                except (GearmanError, OSError):
                    pass  # the connection is gone; the main thread finds out when it replies
