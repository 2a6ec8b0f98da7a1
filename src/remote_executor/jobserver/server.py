"""What every job server loop shares, whatever its sockets: the scheduler, in-process clients, actions.

A concrete server (tcp, zmq) owns the sockets and the loop; it feeds frames to :attr:`ServerCore.scheduler`
and calls :meth:`ServerCore.pump` after each batch of events, which applies the scheduler's actions through
the two hooks it implements (``_transmit``, ``_drop``) and delivers frames for in-process clients.

An in-process client (the embedded cluster's executor) is a :class:`LocalLink`: its frames skip the
network, and frames for it are handed to its callback on the loop thread.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from typing_extensions import Self

from .. import interrupts
from ..errors import ProtocolError
from ..netio import Waker
from ..security import normalize_key
from ..transports.base import ServerSettings
from ..wire.frames import Frame, Kind, Limits
from ..wire.session import NONCE_SIZE, Mac, new_nonce, session_macs
from .scheduler import Close, ConnId, Scheduler, Send, Stop

log = logging.getLogger("remote_executor.jobserver.server")

LOCAL_CONN_BASE = 1 << 40  # local links get ids that never collide with socket connections
STOP_CONN: ConnId = -1  # the inbox entry of stop(tell_clients=True): no connection's
STOP_NOTICE_WAIT = 5.0  # seconds stop(tell_clients=True) lets the loop tell the clients before it stops anyway


class LocalLink:
    """An in-process client's connection to a server loop."""

    def __init__(self, server: ServerCore, conn: ConnId, deliver: Callable[[Frame], None]) -> None:
        self._server = server
        self.conn = conn
        self.deliver = deliver
        self.closed = False
        # Where a client appends (conn, frame) pairs itself, under inbox_lock, before poke(): in one step
        # with the recording of its calls, which a signal cannot cut in half (ClientSession.submit_into).
        self.inbox = server._inbox
        self.inbox_lock = server._inbox_lock
        self.poke = server._poke

    def send(self, frames: Iterable[Frame]) -> None:
        """Thread-safe; never blocks on I/O."""
        self._server.inject(self.conn, frames)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._server.inject_close(self.conn)


@dataclass(frozen=True, slots=True)
class SessionOpening:
    """How a server answers OPEN: the CHALLENGE, the MAC to sign it with, then the session's MACs."""

    challenge: Frame
    challenge_mac: Mac | None
    send: Mac | None
    receive: Mac | None


class ServerCore(abc.ABC):
    """Scheduler + in-process clients + action plumbing; subclasses add sockets and a loop.

    With ``caller_may_drive`` (sockets that any thread may write, as plain TCP sockets are), an
    in-process client's thread that finds the loop idle runs the scheduler and sends the resulting TASK
    frames itself, saving a thread hand-off on every submit. Frames *for* in-process clients are still
    delivered on the loop thread, so futures are never settled inside a caller's ``submit``.
    The loop holds ``drive_lock`` whenever it is not waiting in ``select``.
    """

    caller_may_drive = False
    scheme: ClassVar[str]

    def __init__(self, host: str, port: int, *, key: bytes | None, limits: Limits,
                 heartbeat_interval: float, heartbeat_timeout: float) -> None:
        """Called by a concrete server once it listens on ``host:port``."""
        self.host, self.port = host, port
        self._key = normalize_key(key)  # a server built directly keeps keys as every other entry point does
        self._limits = limits
        self._waker = Waker()
        self._next_conn = 1  # socket connection ids; in-process links count from LOCAL_CONN_BASE
        self.scheduler = Scheduler(name=self.url, heartbeat_interval=heartbeat_interval,
                                   heartbeat_timeout=heartbeat_timeout, max_frame=limits.max_frame)
        self._links: dict[ConnId, LocalLink] = {}
        self._inbox: deque[tuple[ConnId, Frame | str]] = deque()  # a frame, or "connect" / "close"
        self._inbox_lock = threading.Lock()
        self._next_local = LOCAL_CONN_BASE
        self._deferred: deque[tuple[LocalLink, Frame]] = deque()  # local deliveries left for the loop
        self.drive_lock = threading.Lock()
        self._delivering = False  # the loop thread is inside a local client's callback
        self._loop_thread: threading.Thread | None = None
        self._loop_ident: int | None = None  # its thread id, compared on every submit (no Python call)
        self.stopping = threading.Event()
        self.stopped_by_admin = False  # a STOP ended it: what is queued for peers should still go out
        # Called (on the loop thread) with the pid a worker announced when it is given up as hung: the
        # embedded cluster kills that process if it is one of its own, so a new one takes its place.
        self.on_hung_worker: Callable[[int, None], object] | None = None

    @classmethod
    def from_settings(cls, host: str, port: int, settings: ServerSettings) -> Self:
        """A server listening on ``host:port`` as ``settings`` say (extra settings go to the constructor)."""
        make: Any = cls  # concrete servers take (host, port, **settings); ServerCore itself takes a scheduler
        server: Self = make(host, port, key=settings.key, insecure=settings.insecure,
                            limits=settings.limits, heartbeat_interval=settings.heartbeat_interval,
                            heartbeat_timeout=settings.heartbeat_timeout, **settings.extra)
        return server

    @property
    def limits(self) -> Limits:
        """What this server takes from a peer."""
        return self._limits

    @property
    def loop_thread(self) -> threading.Thread | None:
        """The thread that runs the loop (None before it started)."""
        return self._loop_thread

    @loop_thread.setter
    def loop_thread(self, thread: threading.Thread | None) -> None:
        self._loop_thread = thread
        self._loop_ident = None if thread is None else thread.ident

    def loop_ended(self) -> None:
        """Called by the loop thread as it returns: the thread id it leaves may be given to a new thread,
        which must not pass for the loop's (``_poke`` would neither pump nor wake anything for it)."""
        self._loop_ident = None

    @property
    def url(self) -> str:
        """Where clients and workers connect."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def wake(self) -> None:
        """Make the loop run :meth:`pump` soon (called from other threads)."""
        self._waker.wake()

    def open_session(self, frame: Frame) -> SessionOpening:
        """Answer a new connection's first frame, which must be OPEN (see :mod:`remote_executor.wire.session`).

        Raises :class:`ProtocolError` for anything else: the caller closes that connection."""
        nonce = bytes(frame.parts[0]) if frame.kind == Kind.OPEN and len(frame.parts) == 1 else b""
        if len(nonce) != NONCE_SIZE:
            raise ProtocolError(f"expected OPEN with a {NONCE_SIZE}-byte nonce first, got {frame.kind.name}")
        server_nonce = new_nonce()
        challenge = Frame(Kind.CHALLENGE, parts=[server_nonce])
        if self._key is None:
            return SessionOpening(challenge, None, None, None)
        send, receive = session_macs(self._key, nonce, server_nonce, server=True)
        return SessionOpening(challenge, Mac(self._key, bind=nonce), send, receive)

    def _new_conn_id(self) -> ConnId:
        conn = self._next_conn
        self._next_conn += 1
        return conn

    # --- hooks for the concrete server ----------------------------------------------------------------

    @abc.abstractmethod
    def _transmit(self, conn: ConnId, frame: Frame) -> None:
        """Queue a frame for a socket connection."""

    @abc.abstractmethod
    def _drop(self, conn: ConnId, reason: str) -> None:
        """Close a socket connection the scheduler gave up on (without telling the scheduler again)."""

    @abc.abstractmethod
    def serve_forever(self) -> None:
        """Run the loop in this thread until :meth:`stop`; close every socket on the way out."""

    @abc.abstractmethod
    def _close_all(self) -> None:
        """Close every socket (idempotent)."""

    # --- running -----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Serve on a daemon thread (the embedded cluster)."""
        self.loop_thread = threading.Thread(target=self.serve_forever, name=f"remote-executor-{type(self).__name__}",
                                            daemon=True)
        self.loop_thread.start()

    def stop(self, *, tell_clients: bool = False) -> None:
        """Stop serving and close every socket. Idempotent; joins the loop thread if there is one. With
        ``tell_clients`` (a signal asked this server to stop), the loop first tells each client which of its
        calls never started here, so they are resubmitted elsewhere without counting an attempt."""
        thread = self.loop_thread
        if tell_clients and thread is not None and thread is not threading.current_thread():
            with self._inbox_lock:
                self._inbox.append((STOP_CONN, "stop"))
            self.wake()
            thread.join(STOP_NOTICE_WAIT)  # the loop tells them, sends it and ends (else it is stopped below)
        self.stopping.set()
        self.wake()
        thread = self.loop_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        elif thread is None:
            self._close_all()

    # --- in-process clients ----------------------------------------------------------------------------

    def attach_local(self, deliver: Callable[[Frame], None]) -> LocalLink:
        with self._inbox_lock:
            conn = self._next_local
            self._next_local += 1
            link = LocalLink(self, conn, deliver)
            self._links[conn] = link
        self.inject_connect(conn)
        return link

    def inject_connect(self, conn: ConnId) -> None:
        with self._inbox_lock:
            self._inbox.append((conn, "connect"))
        self._poke()

    def inject(self, conn: ConnId, frames: Iterable[Frame]) -> None:
        with self._inbox_lock:
            for frame in frames:
                self._inbox.append((conn, frame))
        self._poke()

    def inject_close(self, conn: ConnId) -> None:
        with self._inbox_lock:
            self._inbox.append((conn, "close"))
        self._poke()

    def _poke(self) -> None:
        if threading.get_ident() == self._loop_ident:
            if self._delivering and self.caller_may_drive:
                # A client submitting from inside a result delivery (the executor refilling its
                # window): send the new TASK now, before the rest of the delivery (unpickling the
                # result, waking the caller), so the worker is idle as briefly as possible.
                self.pump(on_loop=False)
                self._flush_from_caller()
            return  # otherwise the loop pumps again before it waits
        if self.caller_may_drive and self.drive_lock.acquire(blocking=False):
            # Ctrl-C is held off while this thread updates the scheduler and writes to workers: raised
            # in between, it would leave a call taken from its queue and never sent (see interrupts.py).
            held = interrupts.hold()
            try:
                self.pump(on_loop=False)
                self._flush_from_caller()
            finally:
                self.drive_lock.release()
                if held is not None:
                    held.restore()
            if self._deferred or self._caller_left_work():
                self.wake()
            if held is not None:
                held.deliver()  # the KeyboardInterrupt held off, if any, now that the work is done
            return
        self.wake()

    def _flush_from_caller(self) -> None:
        """Send what a caller-driven pump queued (only called when ``caller_may_drive``)."""
        raise NotImplementedError("a server with caller_may_drive must send from callers")

    def _caller_left_work(self) -> bool:
        """True if a caller-driven pump left something only the loop can finish."""
        return False

    # --- the loop's side ---------------------------------------------------------------------------------

    def pump(self, on_loop: bool = True) -> None:
        """Apply everything pending: local frames in, scheduler actions out; repeat until quiet."""
        scheduler = self.scheduler
        while True:
            if on_loop and self._deferred:
                self._deliver_deferred()
            if self._inbox:  # read without the lock: a frame appended meanwhile is taken on the next round
                self._take_inbox()
            if not scheduler.actions:
                if not self._inbox:
                    return  # (deferred deliveries only come from actions, which were all applied)
                continue
            for action in scheduler.take_actions():
                # Frames for in-process clients wait for the next round: a worker's next call (queued
                # at this server, as with prefetch) goes out before this thread settles futures.
                self._apply(action)
            if on_loop and self._deferred and self.caller_may_drive:
                self._flush_from_caller()

    def _deliver_deferred(self) -> None:
        while self._deferred:
            link, frame = self._deferred.popleft()
            self._deliver_local(link, frame)

    def _take_inbox(self) -> None:
        with self._inbox_lock:
            items = list(self._inbox)
            self._inbox.clear()
        now = time.monotonic()
        for conn, item in items:
            if isinstance(item, Frame):  # first: comparing a Frame with a string calls its __eq__
                self.scheduler.received(conn, item, now)
            elif item == "connect":
                self.scheduler.connected(conn, now, local=True)
            elif item == "close":
                self._links.pop(conn, None)
                self.scheduler.disconnected(conn, now)
            elif item == "stop":
                self.scheduler.stop_now("stopped by a signal")

    def _apply(self, action: Send | Close | Stop) -> None:
        if isinstance(action, Send):  # (by far the most frequent: tested first)
            link = self._links.get(action.conn)
            if link is not None:
                self._deferred.append((link, action.frame))
            elif action.conn < LOCAL_CONN_BASE:
                self._transmit(action.conn, action.frame)
        elif isinstance(action, Stop):
            log.warning("stopping: %s", action.reason)
            self.stopped_by_admin = True
            self.stopping.set()  # the loop sends what is queued, closes every socket and returns
            self.wake()
        elif action.conn >= LOCAL_CONN_BASE:
            link = self._links.pop(action.conn, None)
            if link is not None:
                link.closed = True
        else:
            self._drop(action.conn, action.reason)
            if action.hung_pid and self.on_hung_worker is not None:
                self.on_hung_worker(action.hung_pid, None)

    def _deliver_local(self, link: LocalLink, frame: Frame) -> None:
        self._delivering = True
        try:
            link.deliver(frame)
        except Exception:  # a bug in the client must not take the server down with it
            log.exception("in-process client failed to handle a %s frame", frame.kind.name)
        finally:
            self._delivering = False
