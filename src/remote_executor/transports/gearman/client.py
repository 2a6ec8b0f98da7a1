"""The client side of the gearman transport: each call is one foreground job on one of the job servers.

Threading::

    caller threads ── submit() ──▶ GearmanClientConnection.submit (written on the caller's thread)
    one reader thread per server ◀── JOB_CREATED / WORK_DATA / WORK_COMPLETE / WORK_FAIL ──▶ Listener
    one manager thread: reconnects lost servers with backoff, resubmits calls parked while no server was
        up, polls admin ``status`` for the capacity (URL mode), sends admin ``cancel job``, gives up after
        ``reconnect_timeout`` without any server

A job is written on the submitting thread (one ``sendall`` into the socket buffer, no thread hop: the
sequential latency is what Gearman users notice). Jobs go round-robin to the servers that are up; a server
that goes away has its calls resubmitted to the others (a call some worker had started counts as one loss of
that worker, bounded by ``max_retries``) and is reconnected in the background.

``max_retries``: workers send ``WORK_DATA "started by <name>"`` as they start a job, so the client knows who
ran it and how often. Where gearmand runs without ``-j`` it requeues a job whose worker died, for ever; the
client settles the call as worker-lost at the start beyond ``max_retries + 1`` and drops the job with the
admin ``cancel job``. Where gearmand has ``-j`` (the embedded cluster, ``gearmand_retries``), its WORK_FAIL
ends the call first, so the client does not ask for start reports there (``QUIET`` jobs): the worker's first
heartbeat names it instead, for a call that runs that long. A QUIET job silent for two heartbeat intervals
is asked about (GET_STATUS): if gearmand says a worker runs it, the silence clock starts an interval later,
so a worker that hung before its first heartbeat is given up as any silent one.

Time limits: a call with one always asks for the start report, which starts the executor's fallback clock
(``Listener.on_started``); its worker answers ``RESULT(b=TIMED_OUT)`` at the limit and exits. A call whose
worker vanished after its limit without that answer (gearmand requeues the job: a second start, a silent
worker, a lost gearmand) is settled as timed out, never run again.

With a key every submission is sealed anew (:mod:`.jobs`): a new job id, expiring ``job_ttl`` seconds
(``RemoteExecutor(..., job_ttl=...)``, default 300) from now, so a worker never takes a resubmission for a
replay; a result is accepted only if it opens as the answer to the current submission of its call, and is
refused unread (that future fails, nothing is unpickled) otherwise. A worker that refuses this very
submission as a replay means gearmand handed the job out again after losing that worker's connection: the
call is resubmitted as after any lost worker, within ``max_retries``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ...errors import (
    AuthenticationError,
    FrameTooLargeError,
    ProtocolError,
    ServerUnavailableError,
    TransportError,
)
from ...logsafe import limited, owner, printable
from ...netio import Backoff
from ...security import check_connect, is_loopback
from ...wire.frames import FrameSizeError, Kind, Status
from ...wire.messages import initializer_failed, timed_out_parts, too_large_message, worker_lost_parts
from ...wire.serialization import Parts, error_outcome
from ..base import Call, ClientTransport, Listener, Options, Session
from .codec import GearmanError
from .connection import (
    ClientCallbacks,
    GearmanClientConnection,
    GearmanConnectionError,
    GearmanServerError,
    admin_status,
    cancel_job,
)
from .jobs import (
    ALIVE,
    DEFAULT_JOB_TTL,
    MAX_JOB_SIZE,
    REFUSED,
    STARTED,
    JobCodec,
    JobIdentity,
    SealedJob,
    check_job_ttl,
    function_name,
    parse_url,
)
from .replay import REPLAYED
from .tlssocket import tls_context

log = logging.getLogger("remote_executor.gearman")

POLL_INTERVAL = 1.0  # admin status poll for the capacity (URL mode)
POLL_INTERVAL_EMPTY = 0.1  # ... while no worker is registered, so the first calls do not wait a second

# A QUIET job silent this many heartbeat intervals after it was sent: ask gearmand whether a worker runs it
# (a healthy worker names itself one interval into the call).
ASK_AFTER_INTERVALS = 2
UNNAMED_WORKER = "unnamed (gearmand reported the job running; its worker never said a word)"

Ticket = tuple[int, int]  # (task id, submission number): callbacks about an older submission are stale
# A silent worker's job to cancel, and its name and when it said it started (None: it never named itself).
_Silent = tuple["tuple[_Server, bytes] | None", "tuple[str, float] | None"]


@dataclass(eq=False)
class _Job:
    call: Call
    prepared: SealedJob | None  # the payload for the next submission, if made already (off the lock)
    job_id: bytes = b""  # the id the current submission carries: its result must name it
    submission: int = 0
    server: int = -1
    handle: bytes | None = None
    started_here: bool = False  # a worker started the current submission
    last_heard: float = 0.0  # when its worker last said it started or is alive (monotonic)
    started_at: float | None = None  # when a worker last said it started it (monotonic)
    starts: list[str] = field(default_factory=list)  # every worker that started it, over all submissions
    refusal: str | None = None  # a worker refused it (bad HMAC, malformed) before a WORK_FAIL
    # QUIET jobs (no start report): when the current submission was written and when gearmand was last
    # asked whether a worker runs it; ``unnamed`` while its start is known from gearmand only
    sent_at: float = 0.0
    asked_at: float = 0.0
    unnamed: bool = False


@dataclass(eq=False)
class _Server:
    index: int
    host: str
    port: int
    conn: GearmanClientConnection[Ticket] | None = None
    generation: int = 0
    retry_at: float = 0.0
    backoff: Backoff = field(default_factory=Backoff)
    dead: list[GearmanClientConnection[Ticket]] = field(default_factory=list)  # to close (join) off-thread
    pinged_at: float | None = None  # when it was asked for an echo it has not answered yet (monotonic)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class GearmanClientTransport(ClientTransport):
    """Connects an executor to one or more gearmand; ``capacity`` fixes the window (embedded cluster)."""

    time_limits = True

    def __init__(self, url: str, options: Options, *, capacity: int | None = None,
                 gearmand_retries: int | None = None,
                 on_hung: Callable[[str, float], object] | None = None) -> None:
        self.url = url
        addresses, pool = parse_url(url, options.extra.get("pool"))
        check_connect([host for host, _ in addresses], options.key, options.insecure, "client")
        if options.key is None and not all(is_loopback(host) for host, _ in addresses):
            log.warning("no key (insecure): anyone who can reach gearmand at %s can hand this process a pickle "
                        "to run", url)
        self.function = function_name(pool)
        self._options = options
        self._tls = tls_context(options.extra)  # loads the files now: a bad one fails the construction
        self._job_ttl = check_job_ttl(options.extra.get("job_ttl", DEFAULT_JOB_TTL))
        self._codec = JobCodec(options.key, self.function, limits=options.limits())  # fails early without cryptography
        # gearmand announces no limit of its own: a job must fit the packets a worker (and, for its
        # result, this client) accepts, or the limit a user set with limits={"max_frame": N}.
        self._max_job = min(options.limits().max_frame, MAX_JOB_SIZE)
        self._too_large: list[tuple[int, FrameTooLargeError]] = []  # settled by the manager thread
        self._fixed_capacity = capacity
        # gearmand's own -j (the embedded one): it fails a job after this many lost workers, so the client
        # needs no start reports to bound retries (None: a gearmand we did not start; assume no -j).
        self._gearmand_retries = gearmand_retries
        # Told the name of a worker given up as silent and when it said it started (the embedded cluster kills it).
        self._on_hung = on_hung
        self._servers = [_Server(i, host, port) for i, (host, port) in enumerate(addresses)]
        self._session: Session | None = None
        self._listener: Listener | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._jobs: dict[int, _Job] = {}
        self._newest = 0  # the highest task id ever submitted
        self._parked: list[_Job] = []  # accepted while no server was up
        self._cancels: list[tuple[_Server, bytes]] = []
        self._round_robin = itertools.count()
        self._capacity = -1
        self._all_down_since: float | None = None
        self._closing = False
        self._gave_up = False
        self._thread: threading.Thread | None = None
        # The liveness of each gearmand is watched on a thread of its own that never takes self._lock: a
        # submit blocked on a stopped gearmand holds it (see _check_servers).
        self._watchdog: threading.Thread | None = None
        self._unwatched = threading.Event()

    # --- ClientTransport ------------------------------------------------------------------------------

    def start(self, session: Session, listener: Listener) -> None:
        self._session, self._listener = session, listener
        errors = []
        for server in self._servers:
            try:
                self._connect(server)
            except GearmanConnectionError as exc:
                errors.append(str(exc))
                server.retry_at = time.monotonic() + server.backoff.next()
        if len(errors) == len(self._servers):
            raise TransportError(f"cannot reach any gearmand of {self.url}: {'; '.join(errors)}")
        for error in errors:
            log.warning("%s; retrying in the background", error)
        if self._fixed_capacity is not None:
            self._report_capacity(self._fixed_capacity)
        else:
            self._poll_capacity()
        self._thread = threading.Thread(target=self._run, name="remote-executor-gearman-client", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch_servers, name="remote-executor-gearman-liveness",
                                          daemon=True)
        self._watchdog.start()

    def broadcast_targets(self, timeout: float) -> list[str]:
        raise NotImplementedError(
            f"broadcast is not available on gearman:// ({self.url}): gearmand hands each job to whichever "
            f"worker of its function asks first and cannot address one worker; use tcp:// or zmq://, or an "
            f"initializer for what every worker must run")

    def submit(self, calls: Sequence[Call]) -> None:
        jobs = [_Job(call, self._prepare(call)) for call in calls]
        refused = [(job.call.task_id, error) for job in jobs if (error := self._oversize(job)) is not None]
        if refused:
            jobs = [job for job in jobs if job.call.task_id not in dict(refused)]
        with self._lock:
            if refused:
                self._too_large.extend(refused)
                self._wake.notify_all()
            # Recorded in one step (see reconcile): a submit cut short by Ctrl-C recorded all or none.
            self._jobs.update({job.call.task_id: job for job in jobs})
            if calls and calls[-1].task_id > self._newest:  # (task ids grow; a resubmission is older)
                self._newest = calls[-1].task_id
            for job in jobs:
                self._send(job)

    def reconcile(self, calls: Sequence[Call]) -> None:
        with self._lock:
            if self._closing:
                return
            # Not recorded, and newer than any recorded (a call settled since is no longer recorded either).
            unknown = [call for call in calls if call.task_id not in self._jobs and call.task_id > self._newest]
            for call in calls:
                job = self._jobs.get(call.task_id)
                if job is not None and job.handle is None and not self._sent(job):
                    self._send(job)  # recorded, but its SUBMIT never reached a connection
        if unknown:
            self.submit(unknown)

    def _sent(self, job: _Job) -> bool:
        """Whether ``job``'s submission is gearmand's or its connection's to report (lock held): it is
        parked, or was written on a connection (one cut short mid-write ends, and reports it)."""
        if job.server < 0:  # (_send names the server before it writes)
            return job in self._parked
        conn = self._servers[job.server].conn
        # A connection that ended has reported what it held (on_disconnect, under this lock, clears conn):
        # a job it held was sent again, parked or settled since, so one still naming it was never written.
        return conn is not None and conn.holds((job.call.task_id, job.submission))

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._wake.notify_all()
        self._unwatched.set()
        for thread in (self._thread, self._watchdog):
            if thread is not None and thread is not threading.current_thread():
                thread.join()
        for server in self._servers:
            conns = [*server.dead, *([server.conn] if server.conn is not None else [])]
            server.conn, server.dead = None, []
            for conn in conns:
                conn.close()

    # --- submitting (lock held) -------------------------------------------------------------------------

    def _prepare(self, call: Call) -> SealedJob:
        """The payload of one submission: a new job id, expiring ``job_ttl`` seconds from now."""
        assert self._session is not None
        return self._codec.encode_job(call, self._session, time.time() + self._job_ttl,
                                      report_start=self._gearmand_retries is None)

    def _oversize(self, job: _Job) -> FrameTooLargeError | None:
        """The error for a job gearmand's workers could not take: it fails at once and is not retried."""
        assert job.prepared is not None
        size = memoryview(job.prepared.payload).nbytes
        if size <= self._max_job:
            return None
        return FrameTooLargeError(too_large_message("the call (its function and arguments)", size, self._max_job))

    def _send(self, job: _Job) -> None:
        """Write ``job`` to the next live server; park it if there is none. A resubmission is sealed anew
        here (under the lock: resubmissions are rare): a new job id, so workers do not take it for a replay."""
        live = [s for s in self._servers if s.conn is not None]
        sealed, job.prepared = job.prepared or self._prepare(job.call), None
        while live:
            server = live[next(self._round_robin) % len(live)]
            job.submission += 1
            job.server, job.handle, job.started_here, job.job_id = server.index, None, False, sealed.job_id
            job.started_at, job.unnamed = None, False
            job.sent_at = job.asked_at = time.monotonic() if self._quiet(job) else 0.0
            assert server.conn is not None
            try:
                server.conn.submit((job.call.task_id, job.submission), self.function, sealed.payload)
                return
            except GearmanConnectionError:  # ended under us: its reader reports it; try another
                live.remove(server)
        # On no server now: nothing to hear from, nothing to ask about, until it is sent again.
        job.server, job.handle, job.started_here, job.sent_at = -1, None, False, 0.0
        self._parked.append(job)  # sealed again when it leaves: it may wait past its expiry

    # --- connection events (reader threads) ----------------------------------------------------------------

    def _connect(self, server: _Server) -> None:
        server.generation += 1
        callbacks = _Callbacks(self, server, server.generation)
        conn = GearmanClientConnection[Ticket](server.host, server.port, callbacks,
                                               connect_timeout=self._options.connect_timeout, tls=self._tls)
        with self._lock:
            if conn.ended:  # reset before we took it (a proxy in front of a dead gearmand): its report came
                dead = GearmanConnectionError(f"gearmand {server.address} closed the connection at once")
                server.dead.append(conn)  # while it was not ours yet, so it is retried like a failed connect
                raise dead
            server.conn, server.pinged_at = conn, None
            server.backoff.reset()
            self._all_down_since = None
            parked, self._parked = self._parked, []
            for job in parked:
                self._send(job)
        if parked:
            log.info("gearmand %s is up; resubmitted %d call(s)", server.address, len(parked))

    def job_for(self, ticket: Ticket) -> _Job | None:
        """The live job a callback is about (lock held); None for a stale or settled one."""
        job = self._jobs.get(ticket[0])
        return job if job is not None and job.submission == ticket[1] else None

    def on_created(self, ticket: Ticket, handle: bytes) -> None:
        with self._lock:
            job = self.job_for(ticket)
            if job is not None:
                job.handle = handle

    def on_data(self, server: _Server, ticket: Ticket, payload: bytes) -> None:
        lost: tuple[list[str], int] | None = None
        timed_out: Parts | None = None
        with self._lock:
            job = self.job_for(ticket)
            if job is None:
                return
            job.last_heard = time.monotonic()
            if payload == ALIVE:
                return
            # What a worker says is any peer's of gearmand's (unauthenticated): escaped and cut wherever it
            # goes into a log line or an error (printable), read as it came.
            if payload.startswith(REFUSED):
                job.refusal = payload[len(REFUSED):].decode(errors="replace")
                return
            if not payload.startswith(STARTED):
                return
            now = time.monotonic()
            past = self._past_limit(job, now)
            if job.unnamed:  # gearmand told us a worker runs it: this is that start, with a name now
                job.starts.pop()
                job.unnamed = False
            job.starts.append(printable(payload[len(STARTED):]))  # a name: only ever shown
            job.started_here = True
            job.started_at = now
            assert self._session is not None
            if past is not None:
                # Its worker ran it past its limit and vanished without saying so; gearmand handed the job
                # out again: a timed-out call is never run again.
                del self._jobs[job.call.task_id]
                if job.handle is not None:
                    self._cancels.append((server, job.handle))
                    self._wake.notify_all()
                timed_out = past
            elif len(job.starts) > self._session.max_retries + 1:
                # gearmand (without -j) requeued it after worker deaths: stop it here.
                del self._jobs[job.call.task_id]
                if job.handle is not None:
                    self._cancels.append((server, job.handle))
                    self._wake.notify_all()
                lost = (job.starts[:-1], len(job.starts) - 1)
        if timed_out is not None:
            self._settle(ticket[0], Status.TIMED_OUT, timed_out)
        elif lost is not None:
            self._settle(ticket[0], Status.WORKER_LOST, worker_lost_parts(*lost))
        elif job.call.limit is not None:
            assert self._listener is not None
            self._listener.on_started(ticket[0])  # the executor's own clock, should no answer ever come

    def on_status(self, ticket: Ticket, running: bool) -> None:
        """gearmand says whether a worker runs a QUIET job nobody reported starting: if one does, its
        silence counts from now, as if it had reported the start (a healthy worker names itself with its
        first heartbeat, one ``heartbeat_interval`` into the call)."""
        with self._lock:
            job = self.job_for(ticket)
            if job is None or job.started_here or not running:
                return
            job.starts.append(UNNAMED_WORKER)
            job.started_here, job.unnamed = True, True
            # Its silence counts from an interval from now: a healthy worker names itself with its first
            # heartbeat, which comes one to two intervals into the call (beats are on the worker's own clock).
            job.last_heard = time.monotonic() + self._options.heartbeat_interval

    def _past_limit(self, job: _Job, now: float) -> Parts | None:
        """The TIMED_OUT body for a call with a limit whose last start is older than that limit (lock held);
        None otherwise (no limit, not started, or still within it)."""
        if job.call.limit is None or job.started_at is None or now - job.started_at < job.call.limit:
            return None
        return timed_out_parts(job.starts[-1] if job.starts else "", job.call.limit)

    def on_complete(self, ticket: Ticket, payload: bytes) -> None:
        with self._lock:
            job = self.job_for(ticket)
            if job is None:
                return
            del self._jobs[job.call.task_id]
            identity = self._identity(job)
        try:
            frame = self._codec.decode_result(payload, identity)
        except FrameSizeError as exc:  # larger than this client takes (limits={"max_frame": N}), unread
            error = FrameTooLargeError(too_large_message("the result", exc.total, exc.limit))
            self._settle(ticket[0], Status.DONE, error_outcome(error))
            return
        except (AuthenticationError, ProtocolError) as exc:
            limited(log, logging.ERROR, (owner(self), "refused result"), "refused the result of call %d: %s", ticket[0],
                    printable(exc))
            reason = (f"the result of this call was refused, unread: it does not verify as the answer to the job "
                      f"this client submitted (a rogue worker, the result of another job, tampering, or "
                      f"another key): {exc}")
            self._settle(ticket[0], Status.REJECTED, [reason.encode()])
            return
        if frame.kind == Kind.RESULT and frame.a == ticket[0] and frame.b in (Status.DONE, Status.TIMED_OUT):
            self._settle(ticket[0], Status(frame.b), frame.parts)
        elif frame.kind == Kind.BROKEN:
            assert self._listener is not None
            self._listener.on_broken(initializer_failed(frame.parts))
        else:
            reason = f"unexpected {frame.kind.name} frame (a={frame.a}) as the result of call {ticket[0]}"
            log.error("%s", reason)
            self._settle(ticket[0], Status.REJECTED, [reason.encode()])

    def _identity(self, job: _Job) -> JobIdentity:
        assert self._session is not None
        return JobIdentity(self.function, self._session.executor_id, job.call.task_id, job.job_id)

    def on_fail(self, ticket: Ticket, why: str) -> None:
        with self._lock:
            job = self.job_for(ticket)
            if job is None:
                return
            if job.refusal is not None and REPLAYED in job.refusal and self._replayed(job):
                return
            del self._jobs[job.call.task_id]
        if job.refusal is not None and REPLAYED in job.refusal:
            self._settle(ticket[0], Status.WORKER_LOST, worker_lost_parts(job.starts, len(job.starts)))
        elif job.refusal is not None:
            self._settle(ticket[0], Status.REJECTED, [f"a worker would not run this call: refused by "
                                                      f"{printable(job.refusal)}".encode()])
        elif why:
            self._settle(ticket[0], Status.REJECTED, [why.encode()])
        elif (timed_out := self._past_limit(job, time.monotonic())) is not None:  # lost after its limit
            self._settle(ticket[0], Status.TIMED_OUT, timed_out)
        else:  # gearmand's -j retries exhausted (or an admin cancel by someone): the workers were lost
            # Under our own -j the job ran that often, though QUIET jobs name only the workers that ran it
            # for a heartbeat interval or more.
            attempts = max(len(job.starts), self._gearmand_retries or 1)
            unnamed = "unknown (no worker reported starting the job)"
            workers = [*job.starts, *[unnamed] * (attempts - len(job.starts))]
            self._settle(ticket[0], Status.WORKER_LOST, worker_lost_parts(workers, attempts))

    def on_disconnect(self, server: _Server, generation: int, exc: GearmanError, in_flight: list[Ticket]) -> None:
        lost: list[tuple[int, Parts]] = []
        lost_timed_out: list[tuple[int, Parts]] = []
        with self._lock:
            if server.generation == generation and server.conn is not None:
                server.dead.append(server.conn)
                server.conn = None
                server.retry_at = time.monotonic() + server.backoff.next()
                if self._all_down_since is None and all(s.conn is None for s in self._servers):
                    self._all_down_since = time.monotonic()
                self._wake.notify_all()
            if self._closing:
                return
            for ticket in in_flight:
                job = self.job_for(ticket)
                if job is None:
                    continue
                if not job.started_here:  # a worker's "started by" report may have died with gearmand
                    job.starts.append(f"a worker of gearmand {server.address} (its start report was lost)")
                if (timed_out := self._past_limit(job, time.monotonic())) is not None:
                    del self._jobs[job.call.task_id]
                    lost_timed_out.append((job.call.task_id, timed_out))
                elif self._may_resubmit(job):
                    self._send(job)
                else:
                    del self._jobs[job.call.task_id]
                    workers = [*job.starts[:-1], f"{job.starts[-1]} (with gearmand {server.address})"]
                    lost.append((job.call.task_id, worker_lost_parts(workers, len(job.starts))))
        if not self._closing:
            log.warning("lost gearmand %s (%s); %d call(s) in flight there", server.address, printable(exc),
                        len(in_flight))
        for task_id, parts in lost:
            self._settle(task_id, Status.WORKER_LOST, parts)
        for task_id, parts in lost_timed_out:
            self._settle(task_id, Status.TIMED_OUT, parts)

    def _replayed(self, job: _Job) -> bool:
        """This very submission was refused as a copy of a job its worker had accepted before: gearmand
        handed it out again after losing that worker's connection (the worker may have run it). A loss of
        that worker, not an error of the call: resubmitted (sealed anew) within ``max_retries``, and True;
        False when the call must fail as lost (lock held)."""
        assert self._session is not None and job.refusal is not None
        if not job.started_here:  # the worker accepted it unseen by us: count that start
            job.starts.append(printable(job.refusal[: job.refusal.find(f": {REPLAYED}")]))  # "<worker>: <REPLAYED> ..."
        if len(job.starts) > self._session.max_retries:
            return False
        limited(log, logging.WARNING, (owner(self), "refused as a replay"), "call %d: refused by %s; resubmitting it",
                job.call.task_id, printable(job.refusal))
        job.refusal = None
        self._send(job)
        return True

    def _quiet(self, job: _Job) -> bool:
        """The job carries no start report (see :mod:`.jobs`): gearmand's ``-j`` bounds its retries."""
        return self._gearmand_retries is not None and job.call.limit is None

    def _may_resubmit(self, job: _Job) -> bool:
        """After a server loss every job that was there counts as possibly run (a start report can die with
        gearmand): resubmitted while within ``max_retries``."""
        assert self._session is not None
        return len(job.starts) <= self._session.max_retries

    def _settle(self, task_id: int, status: Status, parts: Parts) -> None:
        assert self._listener is not None
        self._listener.on_result(task_id, status, parts)

    # --- the manager thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        next_poll = time.monotonic() + POLL_INTERVAL_EMPTY
        try:
            while True:
                with self._lock:
                    if self._closing:
                        return
                    cancels, self._cancels = self._cancels, []
                    too_large, self._too_large = self._too_large, []
                    dead = [(s, s.dead) for s in self._servers if s.dead]
                    for server, _ in dead:
                        server.dead = []
                    due = [s for s in self._servers if s.conn is None and s.retry_at <= time.monotonic()]
                for _, conns in dead:
                    for conn in conns:
                        conn.close()  # joins its reader thread: never on that thread itself
                for server, handle in cancels:
                    self._cancel(server, handle)
                for task_id, error in too_large:
                    self._settle(task_id, Status.DONE, error_outcome(error))
                for server in due:
                    self._reconnect(server)
                self._give_up_silent()
                if self._fixed_capacity is None and time.monotonic() >= next_poll:
                    self._poll_capacity()
                    next_poll = time.monotonic() + (POLL_INTERVAL if self._capacity > 0 else POLL_INTERVAL_EMPTY)
                if self._check_give_up():
                    return
                with self._lock:
                    if not (self._closing or self._cancels or self._too_large or any(s.dead for s in self._servers)):
                        self._wake.wait(self._next_wakeup(next_poll))
        except BaseException as exc:  # a bug here must fail the futures, not strand them
            log.exception("the gearman client thread for %s failed", self.url)
            assert self._listener is not None
            self._listener.on_broken(ServerUnavailableError(f"the gearman client of {self.url} failed: {exc!r}"))

    def _next_wakeup(self, next_poll: float) -> float:
        now = time.monotonic()
        times = [s.retry_at for s in self._servers if s.conn is None]
        if self._fixed_capacity is None:
            times.append(next_poll)
        if self._all_down_since is not None:
            times.append(self._all_down_since + self._options.reconnect_timeout)
        if any(job.started_here or job.sent_at for job in self._jobs.values()):
            times.append(now + self._options.heartbeat_interval)  # the next liveness check
        return max(min(times, default=now + POLL_INTERVAL) - now, 0.0)

    def _watch_servers(self) -> None:
        while not self._unwatched.wait(self._options.heartbeat_interval / 2):
            try:
                self._check_servers()
            except Exception:  # a bug here must not end the watch silently
                log.exception("checking the gearmand connections of %s failed", self.url)

    def _check_servers(self) -> None:
        """A gearmand with calls in flight that has sent nothing for a heartbeat interval is asked for an
        echo. One that leaves it unanswered for ``heartbeat_timeout`` (stopped, hung, or cut off with its
        connection up), while no write to it makes progress either, has its connection cut: its calls go
        the way of a lost server's (resubmitted to another gearmand within ``max_retries``), and it is
        reconnected to like one, which takes an answer. Never under the transport's lock: a submit may be
        blocked on that very gearmand, holding it."""
        now = time.monotonic()
        interval, timeout = self._options.heartbeat_interval, self._options.heartbeat_timeout
        for server in self._servers:
            conn = server.conn
            if conn is None:
                continue
            heard = max(conn.last_heard, conn.last_progress)
            if server.pinged_at is not None and heard >= server.pinged_at:
                server.pinged_at = None  # it answered, or said something else meanwhile
            if not conn.busy:
                continue
            if server.pinged_at is None:
                if now - heard >= interval:
                    server.pinged_at = now
                    with contextlib.suppress(GearmanConnectionError):  # ended: its reader reports it
                        conn.ping()
            elif now - server.pinged_at > timeout:
                log.warning("gearmand %s has not answered for %.1fs: taking it as lost", server.address,
                            now - server.pinged_at)
                conn.cut(f"gearmand stopped answering (nothing for {now - server.pinged_at:.1f}s, "
                         f"heartbeat_timeout {timeout:g}s)")

    def _give_up_silent(self) -> None:
        """Settle or resubmit the calls of silent workers, cancel their jobs, then have the embedded cluster
        kill those workers: in that order, and only once gearmand no longer has the job, or it would hand
        it to another worker as the job of a worker it lost (one run more than the call's attempts)."""
        settled, silent = self._check_liveness()
        cancelled = [job is None or self._cancel(*job) for job, _ in silent]
        for task_id, status, parts in settled:
            self._settle(task_id, status, parts)
        if self._on_hung is not None:
            for gone, (_, named) in zip(cancelled, silent, strict=True):
                if gone and named is not None:
                    self._on_hung(*named)

    def _check_liveness(self) -> tuple[list[tuple[int, Status, Parts]], list[_Silent]]:
        """Running jobs whose worker fell silent for ``heartbeat_timeout`` (hung, stopped, cut off with its
        connection to gearmand still up; for a QUIET job, silent since gearmand said a worker runs it):
        resubmitted while within ``max_retries`` (the old job is cancelled and its late result ignored), else
        settled as worker-lost, or as timed out if past a limit. Returns the settled ones, and for each
        silent worker its job to cancel and its name and start (None if it never named itself)."""
        assert self._session is not None
        now, timeout = time.monotonic(), self._options.heartbeat_timeout
        ask_after = ASK_AFTER_INTERVALS * self._options.heartbeat_interval
        lost: list[tuple[int, Status, Parts]] = []
        silent: list[_Silent] = []
        with self._lock:
            for job in list(self._jobs.values()):
                if not job.started_here and job.sent_at and now - job.asked_at >= ask_after:
                    self._ask_status(job, now)
                if not job.started_here or now - job.last_heard <= timeout:
                    continue
                worker = job.starts[-1] if job.starts else "unknown"
                cancel = (self._servers[job.server], job.handle) if job.handle is not None and job.server >= 0 else None
                named = None if job.unnamed or job.started_at is None else (worker, job.started_at)
                silent.append((cancel, named))
                log.warning("the worker %s running call %d has been silent for %.1fs: taking the call as lost",
                            printable(worker), job.call.task_id, now - job.last_heard)
                if (timed_out := self._past_limit(job, now)) is not None:
                    del self._jobs[job.call.task_id]
                    lost.append((job.call.task_id, Status.TIMED_OUT, timed_out))
                elif len(job.starts) <= self._session.max_retries:
                    self._send(job)  # a new submission: callbacks about the old one are stale from now on
                else:
                    del self._jobs[job.call.task_id]
                    lost.append((job.call.task_id, Status.WORKER_LOST,
                                 worker_lost_parts([*job.starts[:-1], f"{worker} (silent)"], len(job.starts))))
        return lost, silent

    def _ask_status(self, job: _Job, now: float) -> None:
        """Ask gearmand whether a worker runs a QUIET job that has said nothing (lock held): a worker that
        hung before its first heartbeat would otherwise never be noticed. Asked again every
        ``ASK_AFTER_INTERVALS`` heartbeat intervals while the job waits in gearmand's queue."""
        job.asked_at = now
        conn = self._servers[job.server].conn
        if conn is None or job.handle is None:
            return  # that server is lost: its reader reports the job in flight
        try:
            conn.get_status(job.handle)
        except GearmanConnectionError:
            pass  # ended under us: its reader reports the job in flight

    def _reconnect(self, server: _Server) -> None:
        try:
            self._connect(server)
            log.info("reconnected to gearmand %s", server.address)
        except GearmanConnectionError as exc:
            with self._lock:
                server.retry_at = time.monotonic() + server.backoff.next()
            log.info("reconnecting to gearmand %s: %s", server.address, exc)

    def _cancel(self, server: _Server, handle: bytes) -> bool:
        """Drop the job at gearmand; True if gearmand no longer has it (cancelled now, or gone already)."""
        try:
            cancel_job(server.host, server.port, handle, timeout=self._options.connect_timeout, tls=self._tls)
        except (GearmanError, OSError) as exc:
            log.warning("could not cancel job %s on gearmand %s: %s", printable(handle), server.address,
                        printable(exc))
            return False
        return True

    def _poll_capacity(self) -> None:
        counts = []
        for server in self._servers:
            if server.conn is None or server.pinged_at is not None:  # (an unanswered one would block us)
                continue
            try:
                statuses = admin_status(server.host, server.port, timeout=self._options.connect_timeout,
                                        tls=self._tls)
            except (GearmanError, OSError):
                continue  # the reader thread of that server will notice if it is gone
            counts.append(sum(s.workers for s in statuses if s.function.encode() == self.function))
        if counts:
            # Workers register with every server: the same workers are counted on each, so take the max.
            self._report_capacity(max(counts))

    def _report_capacity(self, slots: int) -> None:
        if slots != self._capacity:
            self._capacity = slots
            assert self._listener is not None
            self._listener.on_capacity(slots)

    def _check_give_up(self) -> bool:
        with self._lock:
            since = self._all_down_since
            if since is None or time.monotonic() - since < self._options.reconnect_timeout or self._gave_up:
                return False
            self._gave_up = True
        assert self._listener is not None
        self._listener.on_broken(ServerUnavailableError(
            f"lost every gearmand of {self.url} and could not reconnect within "
            f"{self._options.reconnect_timeout}s"))
        return True


class _Callbacks(ClientCallbacks[Ticket]):
    """Routes one connection's events to the transport, naming the server and connection generation."""

    def __init__(self, transport: GearmanClientTransport, server: _Server, generation: int) -> None:
        self._transport = transport
        self._server = server
        self._generation = generation

    def on_created(self, token: Ticket, handle: bytes) -> None:
        self._transport.on_created(token, handle)

    def on_complete(self, token: Ticket, payload: bytes) -> None:
        self._transport.on_complete(token, payload)

    def on_fail(self, token: Ticket) -> None:
        self._transport.on_fail(token, "")

    def on_exception(self, token: Ticket, payload: bytes) -> None:
        self._transport.on_fail(token, "")

    def on_error(self, token: Ticket, error: GearmanServerError) -> None:
        self._transport.on_fail(token, f"gearmand {self._server.address} refused the job: {error}")

    def on_data(self, token: Ticket, payload: bytes) -> None:
        self._transport.on_data(self._server, token, payload)

    def on_status(self, token: Ticket, known: bool, running: bool) -> None:
        self._transport.on_status(token, running)

    def on_disconnect(self, exc: GearmanError, in_flight: list[Ticket]) -> None:
        self._transport.on_disconnect(self._server, self._generation, exc, in_flight)
