"""Blocking-socket Gearman connections: a pipelining client, a worker, and admin commands.

Threading model::

    GearmanClientConnection                         GearmanWorkerConnection
    ───────────────────────                         ───────────────────────
    any thread ── submit() ──▶ send lock ──▶ socket  grab_job() caller: the only reader (read lock)
    reader thread ◀── recv ◀── socket                 any thread ── complete()/fail() ──▶ send lock
        └─▶ callbacks (on_created, on_complete, ...)  close() from any thread interrupts both

The client has one reader thread that decodes every packet and calls the callbacks; submits are
written under a send lock by the calling thread, so JOB_CREATED replies can be matched to submits by
a FIFO (gearmand answers them in order). The worker has no thread of its own: the thread that calls
``grab_job`` reads, any thread may send results. Neither ever hangs on a dead peer that closed or
reset the connection: connects time out (and take an answer to an echo), and ``close()`` shuts the socket
down, which wakes every blocked ``recv``/``send``. A gearmand that stops answering or reading with the
connection still up is for the owner to notice, with what both offer: ``last_heard``, ``ping()`` (an echo),
write progress, and ``cut(why)``, which ends the connection and says why to whoever uses it next.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import enum
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from ...errors import ConnectionFailedError
from ...netio import connect, receive_timeout
from .codec import (
    DEFAULT_MAX_PACKET_SIZE,
    REQ,
    RES,
    AdminError,
    Buffer,
    FunctionStatus,
    GearmanError,
    GearmanProtocolError,
    Packet,
    PacketDecoder,
    PacketType,
    WorkerInfo,
    encode_parts,
    parse_admin_ok,
    parse_status,
    parse_workers,
)
from .tlssocket import SharedTlsSocket

__all__ = [
    "ClientCallbacks",
    "GearmanClientConnection",
    "GearmanConnectionClosed",
    "GearmanConnectionError",
    "GearmanServerError",
    "GearmanWorkerConnection",
    "Job",
    "Priority",
    "admin_command",
    "admin_status",
    "admin_workers",
    "cancel_job",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
_RECV_SIZE: Final = 256 * 1024
# A large packet is written in slices this big, each one a sign of progress: a write that gets less than a slice
# through in a heartbeat timeout counts as stalled (64 KiB in 10 s: a link slower than 6.4 KB/s).
_SEND_SLICE: Final = 64 << 10
MAX_UNIQUE_SIZE: Final = 64  # gearmand answers ERROR ARGUMENT_TOO_LARGE above this
_MULTILINE_ADMIN: Final = frozenset({"status", "workers", "prioritystatus", "show jobs", "show unique jobs"})


class GearmanConnectionError(GearmanError, ConnectionFailedError, ConnectionError):
    """The connection to gearmand could not be made, or broke; the OS error is the ``__cause__``."""


class GearmanConnectionClosed(GearmanConnectionError):
    """The connection was closed on purpose by ``close()``."""


class GearmanServerError(GearmanError):
    """gearmand answered with an ERROR packet."""

    def __init__(self, code: bytes, text: bytes) -> None:
        super().__init__(f"gearmand error {code.decode(errors='replace')}: {text.decode(errors='replace')}")
        self.code = code
        self.text = text


class Priority(enum.Enum):
    """Foreground job priorities, as the packet type that submits them."""

    NORMAL = PacketType.SUBMIT_JOB
    HIGH = PacketType.SUBMIT_JOB_HIGH
    LOW = PacketType.SUBMIT_JOB_LOW


@dataclass(frozen=True)
class Job:
    """A job handed to a worker by JOB_ASSIGN_UNIQ."""

    handle: bytes
    function: bytes
    unique: bytes
    payload: bytes


# --------------------------------------------------------------------------------------- sockets


Stream = socket.socket | SharedTlsSocket


def _connect(host: str, port: int, timeout: float, tls: ssl.SSLContext | None = None) -> Stream:
    try:
        sock = connect((host, port), timeout, f"gearmand at {host}:{port}")
    except ConnectionFailedError as exc:
        raise GearmanConnectionError(str(exc)) from exc.__cause__
    if tls is not None:
        try:
            return SharedTlsSocket.connect(sock, tls, host, timeout)
        except (OSError, ssl.SSLError) as exc:  # ssl.SSLError is an OSError: a failed handshake or verification
            sock.close()
            raise GearmanConnectionError(f"TLS with gearmand at {host}:{port} failed: {exc} (is it serving "
                                         f"TLS, with a certificate tls_ca trusts?)") from exc
    # Blocking from now on: close() (via shutdown) is what interrupts a blocked call, not a timeout
    # that would also cut a slow but healthy 1 GB send short.
    sock.settimeout(None)
    return sock


def _shutdown(sock: Stream) -> None:
    # Wakes threads blocked in recv/send on this socket; the fd stays valid until close().
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _recv(sock: Stream, buffer: bytearray, address: object, closed_by_us: Callable[[], bool]) -> Buffer:
    """Bytes from gearmand, valid until the next read into ``buffer`` (the connection's own, reused: a
    fresh 256 KiB object per read cost an allocation and a free for every few-byte packet); an EOF or
    socket error becomes a connection error."""
    try:
        if isinstance(sock, socket.socket):
            n = sock.recv_into(buffer)
            data: Buffer = memoryview(buffer)[:n]
        else:  # TLS: the shared socket reads whole records itself
            data = sock.recv(_RECV_SIZE)
            n = len(data)
    except BlockingIOError:
        raise  # a worker's receive timeout passed (see GearmanWorkerConnection._wait_readable)
    except OSError as exc:
        raise _lost(address, closed_by_us(), f"connection to gearmand at {address} failed: {exc}") from exc
    if not n:
        raise _lost(address, closed_by_us(), f"gearmand at {address} closed the connection")
    return data


def _probe(sock: Stream, decoder: PacketDecoder, recv: Callable[[], Buffer], address: str, timeout: float,
           cancelled: Callable[[], bool] | None = None) -> None:
    """One echo before a connection is used: a gearmand that accepts connections but is stopped (its kernel
    completes the connect) or is not gearmand is a failed connect, not a server that swallows every packet
    sent to it. ``cancelled``: looked at every tenth of a second; once true, the wait ends (its owner stops)."""
    try:
        _send(sock, REQ, PacketType.ECHO_REQ, b"")
    except OSError as exc:
        raise GearmanConnectionError(f"connection to gearmand at {address} failed: {exc}") from exc
    deadline = time.monotonic() + timeout
    if isinstance(sock, SharedTlsSocket):
        sock.recv_deadline = deadline  # half a TLS record must not hold the probe past its timeout
        try:
            _await_echo(sock, decoder, recv, address, timeout, deadline, cancelled)
        finally:
            sock.recv_deadline = None
    else:
        _await_echo(sock, decoder, recv, address, timeout, deadline, cancelled)


def _await_echo(sock: Stream, decoder: PacketDecoder, recv: Callable[[], Buffer], address: str, timeout: float,
                deadline: float, cancelled: Callable[[], bool] | None) -> None:
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        while True:
            pending = isinstance(sock, SharedTlsSocket) and sock.pending()
            while not pending and not selector.select(min(max(deadline - time.monotonic(), 0.0),
                                                          0.1 if cancelled is not None else timeout)):
                if cancelled is not None and cancelled():
                    raise GearmanConnectionClosed(f"connection to gearmand at {address} abandoned: stopping")
                if time.monotonic() >= deadline:
                    raise GearmanConnectionError(f"gearmand at {address} accepted the connection but did not "
                                                 f"answer within {timeout:g}s: is it stopped, or not gearmand?")
            try:
                packets = decoder.feed(recv())
            except GearmanProtocolError as exc:
                raise GearmanConnectionError(f"{address} answered with something gearmand does not "
                                             f"send ({exc}): another service on that port?") from exc
            for packet in packets:
                if packet.type != PacketType.ECHO_RES:
                    raise GearmanConnectionError(f"{packet.type.name} from gearmand at {address} before "
                                                 f"it answered the first echo")
                return


def _lost(address: object, closed_by_us: bool, message: str) -> GearmanConnectionError:
    """``GearmanConnectionClosed`` when our own ``close()`` ended the connection, else the given error."""
    if closed_by_us:
        return GearmanConnectionClosed(f"connection to gearmand at {address} closed by close()")
    return GearmanConnectionError(message)


def _send(sock: Stream, magic: bytes, type_: PacketType, *args: Buffer) -> None:
    for part in encode_parts(magic, type_, *args):
        sock.sendall(part)


# ---------------------------------------------------------------------------------------- client


class ClientCallbacks(abc.ABC, Generic[T]):
    """What a :class:`GearmanClientConnection` reports, called on its reader thread.

    Every token given to ``submit()`` gets exactly one terminal call: ``on_complete``, ``on_fail``,
    ``on_exception``, ``on_error``, or inclusion in the ``in_flight`` list of ``on_disconnect``.
    Callbacks must not block for long (they hold up every other job on the connection); an exception
    they raise is logged and otherwise ignored.
    """

    def on_created(self, token: T, handle: bytes) -> None:
        """gearmand queued the job as ``handle`` (needed for an admin ``cancel job``)."""

    @abc.abstractmethod
    def on_complete(self, token: T, payload: bytes) -> None:
        """The worker finished the job with ``payload`` (WORK_COMPLETE)."""

    @abc.abstractmethod
    def on_fail(self, token: T) -> None:
        """The job failed (WORK_FAIL): worker failure, ``-j`` retries exhausted, or an admin cancel."""

    def on_exception(self, token: T, payload: bytes) -> None:
        """WORK_EXCEPTION (only sent to clients that asked for it); by default treated as a failure."""
        self.on_fail(token)

    def on_error(self, token: T, error: GearmanServerError) -> None:
        """gearmand refused the submit with an ERROR packet (for example a full ``maxqueue``)."""
        self.on_fail(token)

    def on_data(self, token: T, payload: bytes) -> None:
        """Intermediate WORK_DATA or WORK_WARNING from the worker; the job is still running."""

    def on_status(self, token: T, known: bool, running: bool) -> None:
        """gearmand's answer to :meth:`GearmanClientConnection.get_status`: whether it still has the job,
        and whether a worker has taken it."""

    @abc.abstractmethod
    def on_disconnect(self, exc: GearmanError, in_flight: list[T]) -> None:
        """The connection ended (called once): ``exc`` says why, ``in_flight`` lists unsettled tokens."""


class GearmanClientConnection(Generic[T]):
    """One client connection to gearmand, shared by any number of submitting threads.

    ``submit()`` returns once the packet is written; results arrive through ``callbacks``. Always
    ``close()`` the connection, also after ``on_disconnect``, so its reader thread is joined.
    """

    def __init__(
        self,
        host: str,
        port: int,
        callbacks: ClientCallbacks[T],
        *,
        connect_timeout: float = 10.0,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.address = f"{host}:{port}"
        self._callbacks = callbacks
        self._sock = _connect(host, port, connect_timeout, tls)
        self._decoder = PacketDecoder(expect_magic=RES, max_packet_size=max_packet_size)
        self._buffer = bytearray(_RECV_SIZE)  # every read lands here; the decoder copies what it keeps
        self._send_lock = threading.Lock()  # one packet on the wire at a time, in FIFO order
        self._state_lock = threading.Lock()  # guards the three fields below and the socket's life
        self._awaiting_created: collections.deque[T] = collections.deque()
        self._by_handle: dict[bytes, list[T]] = {}  # a list: submits with one unique share a handle
        self._ended = False
        self._closing = False
        self._cut: str | None = None  # why this client ended the connection itself, mid-packet
        try:
            _probe(self._sock, self._decoder, self._recv, self.address, connect_timeout)
        except BaseException:
            self._sock.close()
            raise
        # When gearmand last sent anything (the reader thread sets it), and when a write last made progress
        # (gearmand reading a large job says nothing until it has all of it).
        self.last_heard = self.last_progress = time.monotonic()
        self._handlers: dict[PacketType, Callable[[tuple[bytes, ...]], None]] = {
            PacketType.JOB_CREATED: self._on_job_created,
            PacketType.ERROR: self._on_error,
            PacketType.WORK_COMPLETE: self._on_complete,
            PacketType.WORK_FAIL: self._on_fail,
            PacketType.WORK_EXCEPTION: self._on_exception,
            PacketType.WORK_DATA: self._on_data,
            PacketType.WORK_WARNING: self._on_data,
            PacketType.WORK_STATUS: self._ignore,
            PacketType.STATUS_RES: self._on_status,
            PacketType.ECHO_RES: self._ignore,  # an answer to ping(): its arrival is what counts
        }
        self._reader = threading.Thread(
            target=self._read_loop, name=f"gearman-client-reader {self.address}", daemon=True
        )
        self._reader.start()

    def submit(
        self,
        token: T,
        function: bytes,
        payload: Buffer,
        *,
        unique: bytes = b"",
        priority: Priority = Priority.NORMAL,
    ) -> None:
        """Queue a foreground job; its outcome for ``token`` comes through the callbacks.

        Raises ``ValueError`` for bad arguments and :class:`GearmanConnectionError` if the connection
        has already ended; in both cases nothing was sent and no callback will mention ``token``. A
        send that fails part-way is reported through ``on_disconnect`` instead, never by raising.
        """
        if len(unique) > MAX_UNIQUE_SIZE:
            raise ValueError(f"unique id of {len(unique)} bytes exceeds gearmand's {MAX_UNIQUE_SIZE}")
        self._write(encode_parts(REQ, priority.value, function, unique, payload), (token,),  # (validated first)
                    len(payload) > _SEND_SLICE)

    def get_status(self, handle: bytes) -> None:
        """Ask gearmand whether a worker runs the job ``handle`` (a job created on this connection); the
        answer comes through ``on_status``. Raises :class:`GearmanConnectionError` if the connection has
        ended; a send that fails part-way is reported through ``on_disconnect``."""
        self._write(encode_parts(REQ, PacketType.GET_STATUS, handle), ())

    @property
    def busy(self) -> bool:
        """Whether a submit written here awaits its outcome (a snapshot: no lock a blocked write holds)."""
        return bool(self._awaiting_created or self._by_handle)

    def ping(self) -> None:
        """Ask gearmand for an echo: its answer moves :attr:`last_heard` on. Nothing is sent while another
        write is under way (its progress, :attr:`last_progress`, says as much). Raises
        :class:`GearmanConnectionError` if the connection has ended."""
        if not self._send_lock.acquire(blocking=False):
            return
        try:
            self._write_locked(encode_parts(REQ, PacketType.ECHO_REQ, b""), ())
        finally:
            self._send_lock.release()

    def cut(self, why: str) -> None:
        """End the connection from this side (gearmand stopped answering): the reader reports every token in
        flight through ``on_disconnect``, with ``why``."""
        with self._state_lock:
            if self._ended or self._closing:
                return
            self._cut = why
            _shutdown(self._sock)

    def _write(self, parts: list[Buffer], awaiting_created: tuple[T, ...], large: bool = False) -> None:
        with self._send_lock:
            self._write_locked(parts, awaiting_created, large)

    def _write_locked(self, parts: list[Buffer], awaiting_created: tuple[T, ...], large: bool = False) -> None:
        """(send lock held) ``large``: a part may be over a slice."""
        with self._state_lock:
            if self._ended or self._closing:
                raise GearmanConnectionClosed(f"connection to gearmand at {self.address} is closed")
            self._awaiting_created.extend(awaiting_created)
        try:
            if large:  # its progress is seen slice by slice (the common small packet costs no more calls)
                for part in parts:
                    view = memoryview(part)
                    for start in range(0, len(view), _SEND_SLICE):
                        self._sock.sendall(view[start:start + _SEND_SLICE])
                        self.last_progress = time.monotonic()
            else:
                for part in parts:
                    self._sock.sendall(part)
        except OSError:
            _shutdown(self._sock)  # the reader sees EOF and reports the tokens in flight
        except BaseException as exc:
            # A signal handler's exception (Ctrl-C) between or inside the writes: the packet may be half
            # on the wire, which gearmand could only misread, and the tokens would no longer match its
            # JOB_CREATED answers. End the connection as a failed send does, and say who ended it.
            self._cut = f"a packet's write was interrupted by {type(exc).__name__}"
            _shutdown(self._sock)
            raise

    def holds(self, token: T) -> bool:
        """Whether a submit of ``token`` was written on this connection (or cut short there, which ends
        it) and is not settled: if so, its outcome or ``on_disconnect`` will mention it."""
        with self._state_lock:
            return token in self._awaiting_created or any(token in tokens for tokens in self._by_handle.values())

    def close(self) -> None:
        """Close the connection and join the reader; in-flight tokens go to ``on_disconnect``."""
        with self._state_lock:
            self._closing = True
            if not self._ended:
                _shutdown(self._sock)
        if threading.current_thread() is not self._reader:
            self._reader.join()

    def __enter__(self) -> GearmanClientConnection[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------- reader thread

    def _read_loop(self) -> None:
        try:
            while True:  # left by the exception _recv raises at EOF
                data = self._recv()
                self.last_heard = time.monotonic()
                for packet in self._decoder.feed(data):
                    self._dispatch(packet)
        except GearmanError as exc:
            if self._cut is not None and not self._closing:  # the EOF is our own shutdown, not gearmand's
                self._end(GearmanConnectionError(
                    f"connection to gearmand at {self.address} ended by this client: {self._cut}"))
            else:
                self._end(exc)
        except Exception as exc:  # pragma: no cover - a bug here must still settle every token
            log.exception("gearman client reader crashed")
            self._end(GearmanConnectionError(f"gearman client reader crashed: {exc!r}"))

    def _recv(self) -> Buffer:
        return _recv(self._sock, self._buffer, self.address, lambda: self._closing)

    @property
    def ended(self) -> bool:
        """The connection broke (``on_disconnect`` is reported, or about to be)."""
        return self._ended

    def _end(self, exc: GearmanError) -> None:
        _shutdown(self._sock)  # unblocks a sender stuck on a stalled peer, so the send lock frees
        with self._send_lock, self._state_lock:
            self._ended = True
            in_flight = list(self._awaiting_created)
            for tokens in self._by_handle.values():
                in_flight.extend(tokens)
            self._awaiting_created.clear()
            self._by_handle.clear()
            self._sock.close()
        self._call("on_disconnect", exc, in_flight)

    def _dispatch(self, packet: Packet) -> None:
        handler = self._handlers.get(packet.type)
        if handler is None:
            raise GearmanProtocolError(f"unexpected {packet.type.name} packet on a client connection")
        handler(packet.args)

    def _on_job_created(self, args: tuple[bytes, ...]) -> None:
        (handle,) = args
        with self._state_lock:
            token = self._pop_awaiting("JOB_CREATED")
            self._by_handle.setdefault(handle, []).append(token)
        self._call("on_created", token, handle)

    def _on_error(self, args: tuple[bytes, ...]) -> None:
        # ERROR is gearmand's answer to a submit it refused, in place of JOB_CREATED.
        with self._state_lock:
            token = self._pop_awaiting("ERROR")
        self._call("on_error", token, GearmanServerError(*args))

    def _pop_awaiting(self, what: str) -> T:
        if not self._awaiting_created:
            raise GearmanProtocolError(f"{what} received but no submit is awaiting a reply")
        return self._awaiting_created.popleft()

    def _settle(self, handle: bytes) -> list[T]:
        # A handle settles once: after an admin cancel of a running job gearmand sends WORK_FAIL and
        # then WORK_COMPLETE, and the second must be ignored.
        with self._state_lock:
            return self._by_handle.pop(handle, [])

    def _on_complete(self, args: tuple[bytes, ...]) -> None:
        for token in self._settle(args[0]):
            self._call("on_complete", token, args[1])

    def _on_fail(self, args: tuple[bytes, ...]) -> None:
        # When a worker sent WORK_EXCEPTION to a client that did not ask for exceptions, gearmand
        # forwards WORK_FAIL with a NUL (and the exception data) after the handle.
        for token in self._settle(args[0].partition(b"\0")[0]):
            self._call("on_fail", token)

    def _on_exception(self, args: tuple[bytes, ...]) -> None:
        for token in self._settle(args[0]):
            self._call("on_exception", token, args[1])

    def _on_data(self, args: tuple[bytes, ...]) -> None:
        with self._state_lock:
            tokens = list(self._by_handle.get(args[0], ()))
        for token in tokens:
            self._call("on_data", token, args[1])

    def _on_status(self, args: tuple[bytes, ...]) -> None:
        # STATUS_RES: handle, known, running, numerator, denominator ("0"/"1" flags). An answer about a
        # job settled since (or not ours) names no token and is dropped.
        with self._state_lock:
            tokens = list(self._by_handle.get(args[0], ()))
        for token in tokens:
            self._call("on_status", token, args[1] == b"1", args[2] == b"1")

    def _ignore(self, args: tuple[bytes, ...]) -> None:
        """WORK_STATUS: progress reports we do not use."""

    def _call(self, name: str, *args: object) -> None:
        try:
            getattr(self._callbacks, name)(*args)
        except Exception:
            log.exception("gearman client callback %s raised", name)


# ---------------------------------------------------------------------------------------- worker


class _WorkerState(enum.Enum):
    IDLE = "idle"  # next step: send GRAB_JOB_UNIQ
    GRABBING = "grabbing"  # sent GRAB_JOB_UNIQ, awaiting JOB_ASSIGN_UNIQ or NO_JOB
    SLEEPING = "sleeping"  # sent PRE_SLEEP, awaiting the NOOP that says work arrived


class GearmanWorkerConnection:
    """One worker connection. ``grab_job()`` may run in one thread while others send results.

    No thread of its own: the caller of ``grab_job`` reads the socket (one caller at a time), and
    ``complete``/``fail``/``send_data`` write under a send lock from any thread. gearmand hands a
    connection a new job on every grab, so several jobs may be running on one connection at once.
    """

    def __init__(
        self,
        host: str,
        port: int,
        functions: Iterable[bytes] = (),
        *,
        client_id: bytes | None = None,
        connect_timeout: float = 10.0,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        tls: ssl.SSLContext | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> None:
        """``cancelled``: while the first echo is awaited, looked at every tenth of a second; once true, the
        connection is abandoned (:class:`GearmanConnectionClosed`)."""
        self.address = f"{host}:{port}"
        self._sock = _connect(host, port, connect_timeout, tls)
        self._decoder = PacketDecoder(expect_magic=RES, max_packet_size=max_packet_size)
        self._buffer = bytearray(_RECV_SIZE)  # every read lands here; the decoder copies what it keeps
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._sock, selectors.EVENT_READ)
        self._grab_timeout: float | None = None  # the timeout of the grab_job in progress
        self._kernel_timeout: float | None = None  # the socket's SO_RCVTIMEO, once set
        self._packets: collections.deque[Packet] = collections.deque()
        self._state = _WorkerState.IDLE
        self._send_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._closed = False
        self._cut: str | None = None  # why this side ended the connection (see cut())
        # When gearmand last sent anything (whoever reads sets it), and since when the write under way has
        # made no progress (None: no write under way); see ping(), stalled_for() and cut().
        self.last_heard = time.monotonic()
        self._write_progress: float | None = None
        try:
            _probe(self._sock, self._decoder, self._recv, self.address, connect_timeout, cancelled)
            self.last_heard = time.monotonic()
            if client_id is not None:
                self._send(PacketType.SET_CLIENT_ID, client_id)
            for function in functions:
                self.can_do(function)
        except BaseException:
            self.close()
            raise

    def can_do(self, function: bytes) -> None:
        """Announce that this worker runs ``function``."""
        self._send(PacketType.CAN_DO, function)

    def cant_do(self, function: bytes) -> None:
        self._send(PacketType.CANT_DO, function)

    def grab_job(self, timeout: float | None = None) -> Job | None:
        """Return the next job, waiting up to ``timeout`` seconds (``None``: forever) for one.

        Returns ``None`` on timeout; the grab/sleep state carries over to the next call, so nothing is
        lost. Raises :class:`GearmanConnectionError` when the connection breaks or is closed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._read_lock:
            self._check_open()
            self._grab_timeout = timeout
            while True:
                if self._state is _WorkerState.IDLE:
                    self._send(PacketType.GRAB_JOB_UNIQ)
                    self._state = _WorkerState.GRABBING
                packet = self._next_packet(deadline)
                if packet is None:
                    return None
                job = self._advance(packet)
                if job is not None:
                    return job

    def complete(self, handle: bytes, payload: Buffer) -> None:
        self._send(PacketType.WORK_COMPLETE, handle, payload)

    def fail(self, handle: bytes) -> None:
        self._send(PacketType.WORK_FAIL, handle)

    def exception(self, handle: bytes, payload: Buffer) -> None:
        """End a job with WORK_EXCEPTION; clients that did not opt in get WORK_FAIL instead."""
        self._send(PacketType.WORK_EXCEPTION, handle, payload)

    def send_data(self, handle: bytes, payload: Buffer) -> None:
        """Intermediate data for a running job (WORK_DATA); the job stays running."""
        self._send(PacketType.WORK_DATA, handle, payload)

    def ping(self) -> bool:
        """Ask gearmand for an echo: its answer, read by the next ``grab_job``, moves :attr:`last_heard` on.
        False (nothing sent) while another write is under way: :meth:`stalled_for` watches that one. Raises
        :class:`GearmanConnectionError` if the connection has ended."""
        if not self._send_lock.acquire(blocking=False):
            return False
        try:
            self._send_locked(encode_parts(REQ, PacketType.ECHO_REQ, b""))
        finally:
            self._send_lock.release()
        return True

    def stalled_for(self, now: float) -> float:
        """How long the write under way has made no progress (0 without one): gearmand, or the path to it,
        has stopped taking bytes."""
        since = self._write_progress
        return 0.0 if since is None else max(now - since, 0.0)

    def cut(self, why: str) -> None:
        """End the connection from this side (gearmand stopped answering or taking bytes): a ``grab_job``
        or a write blocked on it in another thread raises :class:`GearmanConnectionError` with ``why``, and
        so does every later use."""
        with self._close_lock:
            if self._closed or self._cut is not None:
                return
            self._cut = why
            _shutdown(self._sock)

    def close(self) -> None:
        """Close the connection; a ``grab_job`` blocked in another thread raises promptly."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            _shutdown(self._sock)  # before taking the locks: wakes a grab_job or a stuck send
        with self._read_lock, self._send_lock:  # both holders leave at once: shutdown woke them
            self._selector.close()
            self._sock.close()

    def __enter__(self) -> GearmanWorkerConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- internals

    def _advance(self, packet: Packet) -> Job | None:
        """Move the grab state machine on by one packet; return a job if it brought one."""
        kind = packet.type
        if kind is PacketType.ERROR:
            self._on_error(packet)
            return None
        if kind is PacketType.ECHO_RES:  # an answer to ping(): its arrival (last_heard) is what counts
            return None
        if self._state is _WorkerState.GRABBING and kind is PacketType.JOB_ASSIGN_UNIQ:
            self._state = _WorkerState.IDLE
            return Job(*packet.args)
        if self._state is _WorkerState.GRABBING and kind is PacketType.NO_JOB:
            self._send(PacketType.PRE_SLEEP)
            self._state = _WorkerState.SLEEPING
        elif kind is PacketType.NOOP:
            # A wake-up; while grabbing it is a stale one (sent before our last GRAB) and harmless.
            if self._state is _WorkerState.SLEEPING:
                self._state = _WorkerState.IDLE
        else:
            raise GearmanProtocolError(f"unexpected {kind.name} packet while {self._state.value}")
        return None

    def _on_error(self, packet: Packet) -> None:
        error = GearmanServerError(*packet.args)
        if error.code == b"JOB_NOT_FOUND":
            # The answer to a result for a job gearmand no longer has (cancelled, or from before a
            # gearmand restart): nobody is waiting for that result, so it is not this grab's error.
            log.warning("gearmand at %s dropped a result: %s", self.address, error)
            return
        raise error

    def _next_packet(self, deadline: float | None) -> Packet | None:
        while not self._packets:
            if not self._wait_readable(deadline):
                return None
            try:
                data = self._recv()
            except BlockingIOError:  # the kernel's receive timeout: nothing came in that slice
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                continue
            self._packets.extend(self._decoder.feed(data))
        return self._packets.popleft()

    def _check_open(self) -> None:
        if self._closed:
            raise GearmanConnectionClosed(f"connection to gearmand at {self.address} is closed")
        if self._cut is not None:
            raise GearmanConnectionError(f"connection to gearmand at {self.address} ended by this worker: "
                                         f"{self._cut}")

    def _wait_readable(self, deadline: float | None) -> bool:
        self._check_open()
        if deadline is None:
            return True  # recv itself blocks, and close() wakes it: save a syscall per packet
        if isinstance(self._sock, SharedTlsSocket) and self._sock.pending():
            return True  # decrypted already: the socket itself has nothing more to say
        timeout = self._grab_timeout
        # recv waits itself, up to the grab's timeout set in the kernel (once, while it stays the same):
        # one system call per packet instead of two; a grab may end up to that much late.
        if (isinstance(self._sock, socket.socket) and timeout is not None and timeout > 0
                and deadline > time.monotonic()
                and (timeout == self._kernel_timeout or receive_timeout(self._sock, timeout))):
            self._kernel_timeout = timeout
            return True
        return bool(self._selector.select(max(deadline - time.monotonic(), 0.0)))

    def _recv(self) -> Buffer:
        data = _recv(self._sock, self._buffer, self.address, lambda: self._closed)
        self.last_heard = time.monotonic()
        return data

    def _lost(self, message: str) -> GearmanConnectionError:
        if self._cut is not None and not self._closed:  # the error is our own shutdown's
            message = f"connection to gearmand at {self.address} ended by this worker: {self._cut}"
        return _lost(self.address, self._closed, message)

    def _send(self, type_: PacketType, *args: Buffer) -> None:
        parts = encode_parts(REQ, type_, *args)
        with self._send_lock:
            self._send_locked(parts)

    def _send_locked(self, parts: list[Buffer]) -> None:
        """(send lock held) Write a packet; a part over a slice goes out slice by slice, each one a sign of
        progress for :meth:`stalled_for`."""
        self._check_open()
        self._write_progress = time.monotonic()
        try:
            for part in parts:
                if len(part) <= _SEND_SLICE:
                    self._sock.sendall(part)
                    continue
                view = memoryview(part)
                for start in range(0, len(view), _SEND_SLICE):
                    self._sock.sendall(view[start:start + _SEND_SLICE])
                    self._write_progress = time.monotonic()
        except OSError as exc:
            raise self._lost(f"cannot send to gearmand at {self.address}: {exc}") from exc
        finally:
            self._write_progress = None


# ----------------------------------------------------------------------------------------- admin


def admin_command(host: str, port: int, command: str, *, timeout: float = 10.0,
                  tls: ssl.SSLContext | None = None) -> list[str]:
    """Run one admin text command; return the reply's lines (without the final ``.``).

    Raises :class:`AdminError` when gearmand answers ``ERR``.
    """
    if "\n" in command or "\r" in command:
        raise ValueError(f"admin command must be one line: {command!r}")
    multiline = command.strip() in _MULTILINE_ADMIN
    try:
        with socket.create_connection((host, port), timeout=timeout) as plain:
            sock = plain if tls is None else tls.wrap_socket(plain, server_hostname=host)
            with sock:
                sock.sendall(command.encode() + b"\n")
                lines = _read_admin_reply(sock, multiline)
    except OSError as exc:
        raise GearmanConnectionError(f"admin command {command!r} to gearmand at {host}:{port}: {exc}") from exc
    if lines and lines[0].startswith("ERR") and "\t" not in lines[0]:
        parse_admin_ok(lines[0])  # raises AdminError
    return lines


def _read_admin_reply(sock: socket.socket, multiline: bool) -> list[str]:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise GearmanConnectionError(f"gearmand closed the admin connection mid-reply: {data!r}")
        data += chunk
        lines = data.decode("utf-8", "surrogateescape").splitlines()
        complete = data.endswith(b"\n")
        refused = lines and lines[0].startswith("ERR") and "\t" not in lines[0]
        if complete and lines and (not multiline or lines[-1] == "." or refused):
            return lines[:-1] if multiline and lines[-1] == "." else lines


def admin_status(host: str, port: int, *, timeout: float = 10.0,
                 tls: ssl.SSLContext | None = None) -> list[FunctionStatus]:
    return parse_status(admin_command(host, port, "status", timeout=timeout, tls=tls))


def admin_workers(host: str, port: int, *, timeout: float = 10.0,
                  tls: ssl.SSLContext | None = None) -> list[WorkerInfo]:
    return parse_workers(admin_command(host, port, "workers", timeout=timeout, tls=tls))


def cancel_job(host: str, port: int, handle: bytes, *, timeout: float = 10.0,
               tls: ssl.SSLContext | None = None) -> bool:
    """Cancel a job by handle; False if gearmand no longer knows it (it finished, or never existed).

    A queued job is dropped and its clients get WORK_FAIL; a running one gets WORK_FAIL at once while
    its worker carries on (the later WORK_COMPLETE is ignored by the client connection).
    """
    try:
        (line,) = admin_command(host, port, f"cancel job {handle.decode('ascii')}", timeout=timeout, tls=tls)
    except AdminError as exc:
        if "UNKNOWN_JOB" in str(exc):
            return False
        raise
    parse_admin_ok(line)
    return True
