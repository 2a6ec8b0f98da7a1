"""The client side of our job-server protocol, whatever carries it: one handshake, one reconnecting loop.

A backend (tcp, zmq) supplies a :class:`Channel` (one connection that carries frames) and a function that
opens one; everything else lives here once::

    caller threads ── submit() ──▶ outbox ─┬──▶ (plain tcp, write side free: sent by the caller)
                                           ▼
    I/O thread: JobServerClient._run ── channel.wait / frames / flush ──▶ job server
        heartbeats both ways; on loss: reconnect with backoff, resubmit what was in flight (or fail it,
        with max_retries=0), give up after reconnect_timeout (ServerUnavailableError)

:class:`ClientSession` is the bookkeeping both this client and the embedded cluster's in-process link
share: the HELLO, SUBMIT frames, the calls in flight, and what each frame from the server means.
"""

from __future__ import annotations

import abc
import itertools
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeoutError
from operator import attrgetter
from typing import Any

from ..errors import (
    BrokenRemoteExecutor,
    ConnectionFailedError,
    HandshakeClosedError,
    KeyRejectedError,
    NotOurServerError,
    ProtocolError,
    RemoteExecutorError,
    ServerUnavailableError,
)
from ..logsafe import printable
from ..netio import Waker, retry_with_backoff
from ..pools import DEFAULT_POOL, pool_of_url
from ..transports.base import Call, ClientTransport, Listener, Options, Session
from ..wire.frames import LOST_ON, NOT_STARTED, PINNED, Frame, Kind, Status
from ..wire.messages import (
    announced_limit,
    call_frame,
    hello,
    initializer_failed,
    oversize,
    parse_json,
    pinned,
    rejection,
    with_earlier_losses,
    worker_lost_parts,
)
from ..wire.serialization import Parts, error_outcome
from ..wire.session import NONCE_SIZE, Mac, new_nonce, session_macs

log = logging.getLogger("remote_executor.client")
_TASK_ID = attrgetter("task_id")

# Status by value: a dict lookup, where calling the enum costs two Python calls on every result.
_STATUSES = {int(status): status for status in Status}
POLL_SLICE = 0.05  # the longest a blocking wait lasts before stop/drain flags are looked at again


class Channel(abc.ABC):
    """One connection to a job server that carries frames, used by one thread at a time.

    A backend implements the four primitives; :meth:`send` and :meth:`next_frame` are built on them.
    Every method raises :class:`ConnectionFailedError` when the connection is gone and
    :class:`~remote_executor.errors.ProtocolError` for bad input from the peer."""

    # True if queue() and flush() may run on one thread (under the caller's lock) while another thread
    # waits and receives: a plain socket's reads and writes share no state; a TLS or ZeroMQ socket's do.
    concurrent_send = False

    def __init__(self, peer: str) -> None:
        self.peer = peer
        self.ready: deque[Frame] = deque()  # received, not yet taken
        self.welcome: dict[str, Any] = {}  # the server's WELCOME, once the handshake is done

    @abc.abstractmethod
    def queue(self, frame: Frame) -> None:
        """Queue a frame for :meth:`flush`; never blocks."""

    @abc.abstractmethod
    def flush(self) -> bool:
        """Send what the connection takes now, without blocking; True when nothing is left queued."""

    @abc.abstractmethod
    def receive(self) -> list[Frame]:
        """The frames that have arrived, without blocking (maybe none)."""

    @abc.abstractmethod
    def wait(self, timeout: float, waker: Waker | None = None) -> None:
        """Block until input may be there, queued output may go on, ``waker`` fires, or ``timeout``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection; idempotent."""

    @abc.abstractmethod
    def authenticate(self, send: Mac | None, receive: Mac | None, *, proven: bool = False) -> None:
        """Sign the frames queued from now on with ``send``, verify the frames parsed from now on with
        ``receive`` (see :mod:`remote_executor.wire.session`). ``proven``: the server has proved it holds
        the key (its CHALLENGE answered this connection's nonce), so frames of the full size are taken from
        now on; until then only frames within ``PRE_SESSION_LIMITS``, whoever answers."""

    def deliver_before_exit(self, timeout: float) -> None:
        """Block (at most ``timeout``) until what was sent has left this process, which is about to end
        without closing anything: a plain socket's send returns once the kernel holds the bytes, so there
        is nothing to do; a ZeroMQ socket hands them to a thread of its own, which must get the time."""
        return None

    def frames(self) -> list[Frame]:
        """Everything received so far, without blocking."""
        frames = list(self.ready)
        self.ready.clear()
        frames.extend(self.receive())
        return frames

    def send(self, frame: Frame, timeout: float) -> None:
        """Queue ``frame`` and flush until it is sent."""
        self.queue(frame)
        deadline = time.monotonic() + timeout
        while not self.flush():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # Silence, as much as no answer is: a zmq peer whose CURVE handshake never completes (a
                # wrong server key, or none) takes nothing, and the hint to check the keys belongs here too.
                raise _Silent(f"{self.peer} took no data for {timeout:g}s")
            self.wait(min(remaining, POLL_SLICE))

    def next_frame(self, timeout: float) -> Frame | None:
        """The next frame, or None if none arrives within ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self.ready:
            self.ready.extend(self.receive())
            if self.ready:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.wait(remaining)
        return self.ready.popleft()


Connector = Callable[[float], Channel]  # opens a channel (connect, not yet HELLO) within a timeout


def handshake(channel: Channel, key: bytes | None, first: Frame, timeout: float,
              stop: threading.Event | None = None) -> dict[str, Any]:
    """Open a session: OPEN/CHALLENGE under the shared key, then HELLO and WELCOME under the session keys.

    A REJECT, a silent close or silence becomes a clear error. Frames the server sends right after
    WELCOME stay in ``channel.ready``. ``stop`` cuts the waits short.

    Until the CHALLENGE has verified, whatever answers may not be our server: anything but the unsigned
    "wrong key" REJECT (itself :class:`KeyRejectedError`, which callers retry before believing) is
    :class:`NotOurServerError`, a connection failure, never a reason to give up."""
    deadline = time.monotonic() + timeout
    nonce = new_nonce()
    proven = False
    try:
        channel.send(Frame(Kind.OPEN, parts=[nonce]), timeout)
        if key is not None:
            channel.authenticate(Mac(key), Mac(key, bind=nonce))  # the CHALLENGE must answer this OPEN
        challenge = _expect(channel, Kind.CHALLENGE, deadline, stop)
        if key is not None:
            server_nonce = bytes(challenge.parts[0]) if len(challenge.parts) == 1 else b""
            if len(server_nonce) != NONCE_SIZE:
                raise ConnectionFailedError(f"{channel.peer} sent a malformed CHALLENGE")
            channel.authenticate(*session_macs(key, nonce, server_nonce, server=False), proven=True)
        else:  # nothing to prove without a key
            channel.authenticate(None, None, proven=True)
        proven = True
        channel.send(first, timeout)
        welcome = _expect(channel, Kind.WELCOME, deadline, stop)
    except HandshakeClosedError:
        # A refusal the transport could read the reason of (a CURVE key not on the allow-list). First: it is
        # a ProtocolError too, and not a foreign answer.
        raise
    except ProtocolError as exc:
        if proven or isinstance(exc, KeyRejectedError):
            raise
        raise NotOurServerError(f"{channel.peer} answered with something no job server of ours sends ({exc}): "
                                f"another service on that port, or a forged answer") from exc
    except ConnectionFailedError as exc:
        if isinstance(exc, _Silent):
            raise ConnectionFailedError(
                f"no answer from the job server {channel.peer} within {timeout:g}s: is it running there, and "
                f"do this side's key (and CURVE server key) match the server's?") from None
        raise HandshakeClosedError(
            f"{channel.peer} closed the connection during the handshake without saying why ({exc}): it may "
            f"be refusing new connections for a while (too many from this address have not finished their "
            f"handshake), or not take this side's key or TLS settings") from exc
    return parse_json(welcome)


class _Silent(ConnectionFailedError):
    """No answer within the handshake's deadline."""


def _expect(channel: Channel, kind: Kind, deadline: float, stop: threading.Event | None) -> Frame:
    """The next frame, which must be ``kind``: a REJECT raises what it means."""
    while (remaining := deadline - time.monotonic()) > 0:
        if stop is not None and stop.is_set():
            raise ConnectionFailedError(f"stopped while waiting for {channel.peer}")
        reply = channel.next_frame(min(remaining, POLL_SLICE))
        if reply is None:
            continue
        if reply.kind == Kind.REJECT:
            raise rejection(reply, channel.peer)
        if reply.kind != kind:
            raise ConnectionFailedError(f"expected {kind.name} from {channel.peer}, got {reply.kind.name}")
        return reply
    raise _Silent(f"no {kind.name} from {channel.peer}")


def open_session(connect: Connector, key: bytes | None, first: Frame, timeout: float,
                 stop: threading.Event | None = None) -> Channel:
    """A connected channel whose session the server has opened and whose HELLO it has welcomed."""
    channel = connect(timeout)
    try:
        channel.welcome = handshake(channel, key, first, timeout, stop)
    except BaseException:
        channel.close()
        raise
    return channel


def fetch_status(connect: Connector, key: bytes | None, timeout: float) -> dict[str, Any]:
    """The job server's view (workers, clients, queues), for ``remote-executor status|ping``."""
    return admin_request(connect, key, Frame(Kind.STATUS), timeout)


def admin_request(connect: Connector, key: bytes | None, request: Frame, timeout: float) -> dict[str, Any]:
    """Send one admin request (STATUS, STOP) and return the JSON answer of the same kind."""
    channel = open_session(connect, key, hello("admin", {"name": f"admin {socket.gethostname()}:{os.getpid()}"}),
                           timeout)
    try:
        channel.send(request, timeout)
        deadline = time.monotonic() + timeout
        while (frame := channel.next_frame(max(deadline - time.monotonic(), 0.0))) is not None:
            if frame.kind == request.kind:
                return parse_json(frame)
            if frame.kind == Kind.REJECT:
                raise rejection(frame, channel.peer)
        raise ConnectionFailedError(f"{channel.peer} did not answer {request.kind.name} within {timeout:g}s")
    finally:
        channel.close()


def client_name() -> str:
    return f"client {socket.gethostname()}:{os.getpid()}"


class ClientSession:
    """What one executor's connection to a job server means: its HELLO, its calls in flight, and the
    meaning of each frame from the server. Shared by :class:`JobServerClient` and in-process links.

    Every call carries how many times it may already have run (a lost worker, a lost server), across
    reconnections and servers, so no call runs more than ``max_retries + 1`` times."""

    def __init__(self, session: Session, listener: Listener, server: str, pool: str = DEFAULT_POOL) -> None:
        self.session = session
        self.listener = listener
        self.server = server
        self.pool = pool
        self._lock = threading.Lock()
        self._inflight: dict[int, Call] = {}  # accepted, no result yet
        self._newest = 0  # the highest task id ever accepted
        self._attempts: dict[int, int] = {}  # task id -> times it may have run (absent: never)
        self._not_started: set[int] = set()  # task ids the (stopping) server said it will never start
        self._server_stopped = False  # the server said it stopped: no call in flight started there
        # task id -> (workers and servers it was lost with on earlier connections, workers lost on this
        # one): a server's WorkerLostError names only its own workers; the client puts the earlier first.
        self._lost_on: dict[int, tuple[list[str], list[str]]] = {}
        self._requests: dict[int, Future[dict[str, Any]]] = {}  # WORKERS / STATUS asked, no answer yet
        self._request_ids = itertools.count(1)

    def hello(self) -> Frame:
        info: dict[str, Any] = {
            "name": client_name(),
            "executor_id": self.session.executor_id,
            "max_retries": self.session.max_retries,
            "pool": self.pool,
        }
        return hello("client", info, self.session.initializer)

    def submit_frames(self, calls: Sequence[Call]) -> list[Frame]:
        """Record calls as in flight and return their SUBMIT frames."""
        frames = self._frames(calls)
        self._record(calls)
        return frames

    def submit_into(self, calls: Sequence[Call], queue: deque[Any], lock: threading.Lock,
                    conn: int | None = None) -> None:
        """Record calls as in flight and append their SUBMIT frames to ``queue`` (``(conn, frame)`` pairs
        if ``conn`` is given), under ``lock``.

        On a caller's thread a signal handler's exception (Ctrl-C) may be raised at any function call.
        Between recording the calls and queuing their frames there is none (Python 3.11+ checks for
        signals at function calls and loops, not at ``with``), so a submit cut short either recorded and
        queued them all, or recorded none of them: ``unknown`` then names them."""
        frames = self._frames(calls)
        items: list[Any] = frames if conn is None else [(conn, frame) for frame in frames]
        self._record(calls)
        with lock:
            queue.extend(items)

    def _frames(self, calls: Sequence[Call]) -> list[Frame]:
        frames = []
        with self._lock:
            for call in calls:
                attempts = self._attempts.get(call.task_id, 0)
                if call.limit is None and call.worker is None:  # the common case, without two helpers
                    frames.append(Frame(Kind.SUBMIT, call.task_id, attempts, call.parts))
                else:
                    frames.append(pinned(call_frame(Kind.SUBMIT, call.task_id, attempts, call.parts, call.limit),
                                         call.worker))
        return frames

    def _record(self, calls: Sequence[Call]) -> None:
        """Record the calls in flight, in one step and with no function call after it (see
        :meth:`submit_into`); without the lock, whose release is such a call (one dict update is atomic)."""
        records = dict(zip(map(_TASK_ID, calls), calls, strict=True))
        self._inflight |= records
        if calls and calls[-1].task_id > self._newest:  # (task ids grow; a resubmission is older)
            self._newest = calls[-1].task_id

    def unknown(self, calls: Sequence[Call]) -> list[Call]:
        """Those of ``calls`` never submitted through this session: see ``ClientTransport.reconcile``. A
        call settled since is not one of them (the executor's record of it goes a moment later)."""
        with self._lock:
            return [call for call in calls if call.task_id not in self._inflight and call.task_id > self._newest]

    def request(self, kind: Kind) -> tuple[Frame, Future[dict[str, Any]]]:
        """A WORKERS or STATUS request to send, and the future its answer (a JSON body) settles."""
        answer: Future[dict[str, Any]] = Future()
        with self._lock:
            request_id = next(self._request_ids)
            self._requests[request_id] = answer
        return Frame(kind, a=request_id), answer

    def forget(self, frame: Frame) -> None:
        """A request that got no answer in time: its late answer, if any, is dropped."""
        with self._lock:
            self._requests.pop(frame.a, None)

    def handle(self, frame: Frame) -> None:
        """React to one frame from the server (on the transport's thread)."""
        kind = frame.kind
        if kind == Kind.RESULT:
            with self._lock:
                known = self._inflight.pop(frame.a, None) is not None
                self._attempts.pop(frame.a, None)
                self._not_started.discard(frame.a)
                losses = self._lost_on.pop(frame.a, None) if self._lost_on else None
            if known:
                status = _STATUSES.get(frame.b)
                parts = frame.parts
                if losses is not None and losses[0] and status is Status.WORKER_LOST:
                    parts = with_earlier_losses(parts, losses[0])
                self.listener.on_result(frame.a, Status(frame.b) if status is None else status, parts)
        elif kind == Kind.CAPACITY:
            self.listener.on_capacity(frame.a)
        elif kind == Kind.STARTED:
            with self._lock:
                known = frame.a in self._inflight
            if known:
                self.listener.on_started(frame.a)
        elif kind == Kind.REQUEUED:
            with self._lock:
                if frame.a in self._inflight:
                    self._attempts[frame.a] = max(self._attempts.get(frame.a, 0), frame.b)
                    parts = frame.parts  # [NOT_STARTED]? then [LOST_ON, name]?
                    if parts and parts[0] == NOT_STARTED:
                        self._not_started.add(frame.a)
                        parts = parts[1:]
                    if len(parts) == 2 and parts[0] == LOST_ON:
                        on_server = self._lost_on.setdefault(frame.a, ([], []))[1]
                        if len(on_server) <= self.session.max_retries:  # (a server sends no more)
                            on_server.append(printable(bytes(parts[1])))
        elif kind in (Kind.WORKERS, Kind.STATUS):
            with self._lock:
                answer = self._requests.pop(frame.a, None)
            if answer is not None:
                try:
                    answer.set_result(parse_json(frame))
                except RemoteExecutorError as exc:
                    answer.set_exception(exc)
        elif kind == Kind.STOP:  # the server stopped (remote-executor stop): see connection_lost
            with self._lock:
                self._server_stopped = True
        elif kind == Kind.BROKEN:
            self.listener.on_broken(initializer_failed(frame.parts))
        elif kind == Kind.REJECT:
            self.listener.on_broken(BrokenRemoteExecutor(str(rejection(frame, self.server))))
        elif kind not in (Kind.WELCOME, Kind.HEARTBEAT):
            log.warning("ignoring an unexpected %s frame from %s", kind.name, self.server)

    def refuse(self, frame: Frame, error: Exception) -> None:
        """Fail the call of a SUBMIT frame that was never sent, with ``error``: it is not retried."""
        with self._lock:
            known = self._inflight.pop(frame.a, None) is not None
            self._attempts.pop(frame.a, None)
            self._lost_on.pop(frame.a, None)
        if known:
            self.listener.on_result(frame.a, Status.DONE, error_outcome(error))

    def connection_lost(self, unsent: set[int]) -> list[Call]:
        """The server is gone: what to resubmit to the next one.

        A call in ``unsent`` never left this process: it is simply sent later. Any other call may have run
        there, so it counts one attempt: resubmitted while within ``max_retries``, else it fails with a
        worker-lost result (``max_retries=0``: at most once)."""
        resubmit: list[Call] = []
        lost: list[tuple[int, int, list[str]]] = []
        pinned_lost: list[tuple[int, str]] = []
        with self._lock:
            requests = list(self._requests.values())
            self._requests.clear()
            not_started, self._not_started = self._not_started, set()
            if self._server_stopped:  # then none of the calls in flight ever started there
                self._server_stopped = False
                not_started = set(self._inflight)
            here = f"{self.server} (connection lost)"
            for task_id, call in list(self._inflight.items()):
                if call.worker is not None:  # a broadcast's call: its worker was one of that server's
                    del self._inflight[task_id]
                    self._attempts.pop(task_id, None)
                    self._lost_on.pop(task_id, None)
                    pinned_lost.append((task_id, call.worker))
                    continue
                earlier, on_server = self._lost_on.pop(task_id, ([], []))
                earlier += on_server  # the workers lost there are earlier ones from now on
                if task_id in unsent or task_id in not_started:  # the stopping server said it cannot have run
                    if task_id not in unsent:
                        resubmit.append(call)
                    if earlier:
                        self._lost_on[task_id] = (earlier, [])
                    continue
                earlier.append(here)
                attempts = self._attempts.get(task_id, 0) + 1
                if attempts <= self.session.max_retries:
                    self._attempts[task_id] = attempts
                    self._lost_on[task_id] = (earlier, [])
                    resubmit.append(call)
                else:
                    del self._inflight[task_id]
                    self._attempts.pop(task_id, None)
                    lost.append((task_id, attempts, earlier))
        for answer in requests:
            answer.set_exception(ConnectionFailedError(f"lost the connection to the job server {self.server} "
                                                       f"before it answered"))
        for task_id, attempts, workers in lost:
            parts: Parts = worker_lost_parts(workers, attempts)
            self.listener.on_result(task_id, Status.WORKER_LOST, parts)
        for task_id, worker in pinned_lost:
            reason = (f"the connection to the job server {self.server} was lost before the worker {worker} "
                      f"answered the call; a broadcast call runs on its own worker only and is never retried")
            self.listener.on_result(task_id, Status.WORKER_LOST, worker_lost_parts([worker], 1, reason))
        return resubmit


def ask(session: ClientSession, send: Callable[[Frame], None], kind: Kind, timeout: float) -> dict[str, Any]:
    """Send a WORKERS or STATUS request with ``send`` and wait for its answer (the caller's thread)."""
    frame, answer = session.request(kind)
    send(frame)
    try:
        return answer.result(timeout)
    except FuturesTimeoutError:
        session.forget(frame)
        raise ConnectionFailedError(f"the job server {session.server} did not answer {kind.name} within "
                                    f"{timeout:g}s") from None


class JobServerClient(ClientTransport):
    """Connects an executor to a job server of ours over a backend's :class:`Channel`.

    One I/O thread owns the channel's reading; caller threads append SUBMIT frames to an outbox and, on
    a plain tcp connection that nobody else is writing to, send them themselves, else wake it to. With
    several servers (``tcp://h1:p,h2:p``) it uses one at a time, in order, and fails over to the next when
    its server is lost; job servers hold nothing the client cannot resubmit."""

    time_limits = True

    def __init__(self, url: str, options: Options, servers: Sequence[tuple[str, Connector]]) -> None:
        if not servers:
            raise ValueError("a job-server client needs at least one server")
        self.url = url
        self.pool = pool_of_url(url, options.extra.get("pool"))  # a bad name fails here, at construction
        self._options = options
        self._servers = list(servers)  # (the one server's URL, how to open a channel to it)
        self._current = 0
        self._session: ClientSession | None = None
        self._channel: Channel | None = None
        self._outbox: deque[Frame] = deque()
        self._lock = threading.Lock()
        # The channel's write side (queue, flush): the I/O thread's, or a caller's that sends its call
        # itself, sparing the I/O thread a wake-up; _direct is the channel callers may write to, if any.
        self._send_lock = threading.Lock()
        self._direct: Channel | None = None
        self._stop = threading.Event()
        self._waker = Waker()
        self._thread: threading.Thread | None = None

    # --- ClientTransport ------------------------------------------------------------------------------

    def start(self, session: Session, listener: Listener) -> None:
        self._session = ClientSession(session, listener, self.url, self.pool)
        try:
            self._channel = self._open(self._options.connect_timeout)  # the first failure is loud
        except BaseException:
            self._waker.close()
            raise
        self._thread = threading.Thread(target=self._run, name=f"remote-executor-client {self.url}", daemon=True)
        self._thread.start()

    def submit(self, calls: Sequence[Call]) -> None:
        assert self._session is not None
        self._session.submit_into(calls, self._outbox, self._lock)
        if threading.current_thread() is not self._thread and not self._send_directly():
            self._waker.wake()

    def reconcile(self, calls: Sequence[Call]) -> None:
        assert self._session is not None
        unknown = self._session.unknown(calls)
        if unknown:
            self.submit(unknown)

    def _send_directly(self) -> bool:
        """Send the outbox from the caller's thread if the channel allows it and nobody else is writing;
        False if the I/O thread must (it is writing, the socket took only part, or the connection broke)."""
        channel = self._direct
        if channel is None or not self._send_lock.acquire(blocking=False):
            return False
        try:
            if channel is not self._direct:  # lost and replaced meanwhile
                return False
            if not self._take_outbox(channel, refuse=False):
                return bool(not self._outbox)  # taken by the I/O thread, or a call to refuse: leave it that
            return channel.flush()
        except RemoteExecutorError:
            return False  # the I/O thread finds the connection broken too, and reconnects
        finally:
            self._send_lock.release()

    def broadcast_targets(self, timeout: float) -> list[str]:
        return worker_names(self._ask(Kind.WORKERS, timeout))

    def query_status(self, timeout: float) -> dict[str, Any]:
        return self._ask(Kind.STATUS, timeout)

    def _ask(self, kind: Kind, timeout: float) -> dict[str, Any]:
        assert self._session is not None

        def send(frame: Frame) -> None:
            with self._lock:
                self._outbox.append(frame)
            self._waker.wake()

        return ask(self._session, send, kind, timeout)

    def close(self) -> None:
        self._stop.set()
        self._waker.wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        if thread is None:
            self._waker.close()

    # --- connection -------------------------------------------------------------------------------------

    def _open(self, timeout: float, start: int = 0, deadline: float | None = None) -> Channel:
        """A welcomed channel to the first server that answers, trying them in order from ``start``; each
        try within ``timeout``, and within what is left until ``deadline`` (at least a second) if given."""
        assert self._session is not None
        failures: list[ConnectionFailedError | KeyRejectedError] = []
        floor = min(1.0, timeout)
        for offset in range(len(self._servers)):
            index = (start + offset) % len(self._servers)
            url, connect = self._servers[index]
            budget = timeout if deadline is None else min(timeout, max(deadline - time.monotonic(), floor))
            try:
                channel = open_session(connect, self._options.key, self._session.hello(), budget,
                                       self._stop)
            except (ConnectionFailedError, KeyRejectedError) as exc:  # (the next server may take our key)
                failures.append(exc)
                continue
            if index != self._current:
                log.warning("failed over from job server %s to %s", self._servers[self._current][0], url)
            self._current = index
            self._session.server = url
            for frame in channel.frames():  # what the server sent right after WELCOME (CAPACITY, ...)
                self._session.handle(frame)
            return channel
        if len(failures) == 1:
            raise failures[0]
        error = KeyRejectedError if all(isinstance(f, KeyRejectedError) for f in failures) else ConnectionFailedError
        raise error("no job server of " + self.url + " answered: " + "; ".join(map(str, failures)))

    def _reconnect(self) -> Channel | None:
        """Reconnect with backoff; resubmit what was in flight. None if we gave up (or are closing)."""
        assert self._session is not None
        with self._lock:  # calls still in the outbox never reached the lost server: they stay queued
            unsent = {frame.a for frame in self._outbox if frame.kind == Kind.SUBMIT}
            # ...except a broadcast's calls and requests: they were meant for that server (and fail now)
            kept = [f for f in self._outbox if f.kind == Kind.SUBMIT and not f.flags & PINNED]
            self._outbox.clear()
            self._outbox.extend(kept)
        resubmit = self._session.connection_lost(unsent)
        try:
            # Start with the next server: the lost one may take a whole handshake timeout to say it is gone.
            start = (self._current + 1) % len(self._servers)
            # No attempt outlasts reconnect_timeout by much: a server that accepts but never answers would
            # otherwise have each attempt wait out connect_timeout, past the time the user gave.
            deadline = time.monotonic() + self._options.reconnect_timeout
            # A key rejection is retried too: unsigned, it may be forged, and this key did open a session.
            channel = retry_with_backoff(
                lambda: self._open(self._options.connect_timeout, start, deadline),
                self._options.reconnect_timeout, self._stop,
                lambda exc, delay: log.info("reconnecting to %s: %s", self.url, exc),
                transient=(ConnectionFailedError, OSError, KeyRejectedError))
        except RemoteExecutorError as exc:
            self._session.listener.on_broken(ServerUnavailableError(
                f"lost the job server {self.url} and could not reconnect within "
                f"{self._options.reconnect_timeout:g}s: {exc}"))
            return None
        if channel is not None and resubmit:
            log.info("reconnected to %s; resubmitting %d call(s)", self._session.server, len(resubmit))
            frames = self._session.submit_frames(resubmit)
            with self._lock:
                self._outbox.extendleft(reversed(frames))
        return channel

    # --- the I/O thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and self._channel is not None:
                if not self._serve(self._channel):
                    self._channel.close()
                    self._channel = self._reconnect()
        except BaseException as exc:  # a bug here must fail the futures, not strand them
            log.exception("the connection thread for %s failed", self.url)
            assert self._session is not None
            self._session.listener.on_broken(BrokenRemoteExecutor(f"the connection to {self.url} failed: {exc!r}"))
        finally:
            if self._channel is not None:
                self._channel.close()
            self._waker.close()

    def _serve(self, channel: Channel) -> bool:
        """Run one connection until it fails (False) or we are closing (True)."""
        assert self._session is not None
        interval, timeout = self._options.heartbeat_interval, self._options.heartbeat_timeout
        poll = min(interval, timeout) / 2
        last_recv = last_send = time.monotonic()
        if channel.concurrent_send:
            with self._send_lock:
                self._direct = channel
        try:
            while not self._stop.is_set():
                waited_from = time.monotonic()
                channel.wait(poll, self._waker)
                self._waker.drain()
                frames = channel.frames()
                now = time.monotonic()
                if frames:
                    last_recv = now
                elif now - waited_from > 2 * poll:
                    # A wait that ran late was not running meanwhile (a stopped or starved process): that
                    # silence is ours, not the server's, and what it sent may still be on its way to us
                    # (with zmq, libzmq's I/O thread was stopped too). Judge it from here on.
                    last_recv += now - waited_from - poll
                for frame in frames:
                    self._session.handle(frame)
                if now - last_recv > timeout:
                    log.warning("no heartbeat from %s for %.1fs; reconnecting", self.url, now - last_recv)
                    return False
                with self._send_lock:
                    queued = self._take_outbox(channel)
                    if not queued and now - last_send >= interval:
                        channel.queue(Frame(Kind.HEARTBEAT))
                        queued = True
                    if queued:
                        last_send = now
                    channel.flush()
            return True
        except RemoteExecutorError as exc:  # ConnectionFailedError, ProtocolError: this connection is done
            log.warning("connection to %s failed: %s; reconnecting", self.url, exc)
            return False
        finally:
            with self._send_lock:
                self._direct = None

    def _take_outbox(self, channel: Channel, refuse: bool = True) -> bool:
        """Queue the outbox's frames on ``channel``; a call larger than its server accepts fails here,
        at once: sent, it would only break the connection, again on every reconnection. Without
        ``refuse`` (a caller's thread, where no future may be failed) such a call and those after it stay
        in the outbox, for the I/O thread, and the answer is False."""
        assert self._session is not None
        limit = announced_limit(channel.welcome)
        keyed = self._options.key is not None
        refused: list[tuple[Frame, Exception]] = []
        with self._lock:
            if not self._outbox:
                return False
            while self._outbox:
                frame = self._outbox.popleft()
                error = oversize(frame, keyed, limit, "the call (its function and arguments)")
                if error is None:
                    channel.queue(frame)
                elif not refuse:
                    self._outbox.appendleft(frame)
                    return False
                else:
                    refused.append((frame, error))
        for frame, why in refused:
            self._session.refuse(frame, why)
        return True


def worker_names(answer: dict[str, Any]) -> list[str]:
    """The worker names of a WORKERS answer, checked (it comes from the network)."""
    names = answer.get("workers")
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ProtocolError("the job server's WORKERS answer is malformed")
    return names
