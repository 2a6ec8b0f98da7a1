"""The tcp job server: a selector loop around the shared :class:`~remote_executor.jobserver.server.ServerCore`.

One thread does all socket I/O. A peer that sends a malformed, oversized or unauthenticated frame is
logged and disconnected; everyone else is served on.

Peers that have not completed the handshake (TLS if on, then HELLO/WELCOME) cannot starve the others:
at most ``max_handshaking`` of them at once, each for at most ``handshake_timeout`` seconds. Beyond the
cap a newcomer takes the place of the oldest connection of the address with the most (at once if the
newcomer's address has fewer, else once that one has had a fair chance), or is closed at once. Running
out of file descriptors or memory in ``accept()`` makes room the same way, or pauses accepting briefly;
it never ends the server.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING

from ...errors import AuthenticationError, ProtocolError
from ...jobserver.handshakes import Handshakes
from ...jobserver.scheduler import ConnId
from ...jobserver.server import ServerCore
from ...logsafe import limited, owner, printable
from ...netio import tune
from ...security import server_key
from ...tls import TlsConfig
from ...wire.frames import DEFAULT_LIMITS, PRE_SESSION_LIMITS, Frame, Kind, Limits
from ...wire.messages import RejectCode, key_rejected, reject
from .stream import Connection, NotTlsError

if TYPE_CHECKING:
    import ssl

    from .tlsstream import TlsConnection

log = logging.getLogger("remote_executor.jobserver.server")

_LISTENER = "listener"
_WAKER = "waker"

ACCEPT_BATCH = 32  # connections taken per readable event of the listener
ACCEPT_PAUSE = 0.1  # seconds without accept() after it failed for lack of descriptors or memory
# accept() errors that mean "this process or the system is short of resources", not "this connection"
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# accept() errors that concern one connection only (gone before it was taken): take the next one
CONNECTION_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR, errno.EAGAIN})
LOG_EVERY = 10.0  # seconds between two log lines of the same kind about a flood


class _Throttled:
    """Log lines about floods (failed accepts, evictions, failed handshakes): at most one per kind every
    ``LOG_EVERY`` seconds, saying how many were left out."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._skipped: Counter[str] = Counter()

    def log(self, kind: str, level: int, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -LOG_EVERY) < LOG_EVERY:
            self._skipped[kind] += 1
            return
        self._last[kind] = now
        skipped = self._skipped.pop(kind, 0)
        if skipped:
            message += " (and %d more like it in the last %.0fs)"
            args = (*args, skipped, LOG_EVERY)
        log.log(level, message, *args)


class TcpServer(ServerCore):
    """``remote-executor server tcp://HOST:PORT``, or the embedded cluster's in-process job server.

    TLS with ``tls_cert``/``tls_key`` (and client certificates required with ``tls_ca``; or ``tls``, a
    :class:`~remote_executor.tls.TlsConfig`). Mutual TLS authenticates every peer, so it allows a
    non-loopback address without a key, as a key does."""

    caller_may_drive = True  # plain sockets: a submitting thread may send TASK frames itself
    scheme = "tcp"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        key: bytes | None = None,
        insecure: bool = False,
        limits: Limits = DEFAULT_LIMITS,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
        tls: TlsConfig | bool | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
        max_handshaking: int = 64,
        handshake_timeout: float | None = None,
    ) -> None:
        # Connections not welcomed yet (the policy: .jobserver.handshakes); checked before binding.
        handshaking: Handshakes[ConnId] = Handshakes(
            max_handshaking, heartbeat_timeout if handshake_timeout is None else handshake_timeout)
        config = TlsConfig.from_options({"tls": tls, "tls_cert": tls_cert, "tls_key": tls_key, "tls_ca": tls_ca})
        self._tls = config.server_context() if config is not None else None  # before binding: a clear error
        self._tls_connection: type[TlsConnection] | None = None
        if self._tls is not None:
            from .tlsstream import TlsConnection  # ssl only for a TLS server

            self._tls_connection = TlsConnection
        # The per-user key unless given one or insecure, with mutual TLS too: its clients and workers, given
        # no key, bring the per-user key (mutual TLS without any key takes --insecure on every side).
        key = server_key(host, key, insecure)
        self._listen = socket.create_server((host, port), family=_family(host), backlog=256)
        self._listen.setblocking(False)
        super().__init__(host, int(self._listen.getsockname()[1]), key=key, limits=limits,
                         heartbeat_interval=heartbeat_interval, heartbeat_timeout=heartbeat_timeout)
        self._selector = selectors.DefaultSelector()
        self._conns: dict[ConnId, Connection] = {}
        self._dirty: set[ConnId] = set()
        self._closed = False
        self._handshaking = handshaking
        self._accepting_again: float | None = None  # accepting paused until then
        self._throttled = _Throttled()
        self._selector.register(self._listen, selectors.EVENT_READ, _LISTENER)
        self._selector.register(self._waker.reader, selectors.EVENT_READ, _WAKER)

    @property
    def tls(self) -> bool:
        """True if peers must speak TLS."""
        return self._tls is not None

    @property
    def handshaking(self) -> int:
        """How many connections have not completed the handshake (TLS, then HELLO/WELCOME) yet."""
        return len(self._handshaking)

    # --- running -----------------------------------------------------------------------------------


    def serve_forever(self) -> None:
        self.loop_thread = threading.current_thread()
        next_tick = next_timer = 0.0
        try:
            while not self.stopping.is_set():
                wake_at = min(next_tick, next_timer)
                if self._accepting_again is not None:  # (brought forward when a place became free)
                    wake_at = min(wake_at, self._accepting_again)
                events = self._selector.select(max(wake_at - time.monotonic(), 0.0))
                with self.drive_lock:
                    for key, mask in events:
                        self._on_event(key.data, mask)
                    now = time.monotonic()
                    if now >= next_tick:
                        # A tick that runs late was not running meanwhile (a stopped or starved process):
                        # that silence is ours, not the peers'. Their heartbeats may still be waiting in the
                        # socket buffers, so read those too before judging anyone (one poll per tick).
                        if next_tick:
                            self.scheduler.excuse(now - next_tick)
                        for key, mask in self._selector.select(0):
                            self._on_event(key.data, mask)
                        next_tick = self.scheduler.tick(time.monotonic())
                    if self._handshaking.entries or self._accepting_again is not None:  # (else none is armed)
                        next_timer = self._timers(time.monotonic())
                    else:
                        next_timer = float("inf")
                    self.pump()
                    self._flush_dirty()
        finally:
            with self.drive_lock:
                self._close_all()
            self.loop_ended()


    # --- events ------------------------------------------------------------------------------------

    def _on_event(self, data: object, mask: int) -> None:
        if data is _LISTENER:
            self._accept()
        elif data is _WAKER:
            self._waker.drain()
        else:
            assert isinstance(data, int)
            if mask & selectors.EVENT_READ:
                self._read(data)
            if mask & selectors.EVENT_WRITE:
                conn = self._conns.get(data)
                if conn is None:
                    return
                if conn.read_needs_write:  # TLS: a read (or handshake step) waited for this
                    self._read(data)
                self._dirty.add(data)

    def _timers(self, now: float) -> float:
        """Close connections past their handshake deadline, resume accepting; when to look again."""
        while (conn_id := self._handshaking.overdue(now)) is not None:
            conn = self._conns.get(conn_id)
            self._throttled.log("deadline", logging.WARNING, "closing connection from %s: no handshake within %gs",
                                conn.peer if conn is not None else self._host_of(conn_id),
                                self._handshaking.timeout)
            self._lost(conn_id)
        if self._accepting_again is not None and now >= self._accepting_again:
            self._resume_accepting()
        deadline = self._handshaking.next_deadline()
        next_timer = float("inf") if deadline is None else deadline
        if self._accepting_again is not None:
            next_timer = min(next_timer, self._accepting_again)
        return next_timer

    # --- accepting -----------------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if self._accepting_again is not None:
                return
            try:
                sock, address = self._listen.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in CONNECTION_ERRNOS:
                    continue
                if exc.errno in RESOURCE_ERRNOS and self._make_room(None, f"accept() failed: {exc.strerror}"):
                    continue  # a descriptor is free again: the connection waiting in the backlog can come in
                self._throttled.log("accept", logging.ERROR, "accept() failed: %s; pausing accepting for %gs",
                                    exc, ACCEPT_PAUSE)
                self._pause_accepting(time.monotonic() + ACCEPT_PAUSE)
                return
            if self._handshaking.full() and not self._make_room(
                    address[0], "too many connections in handshake"):
                self._throttled.log("refuse", logging.WARNING, "closing the connection from %s at once: %d "
                                    "connections in handshake, none waiting for long", _peer(address),
                                    len(self._handshaking))
                sock.close()
                continue
            self._admit(sock, address)

    def _make_room(self, newcomer: str | None, why: str) -> bool:
        """Close one connection in handshake to make room for a new one (from address ``newcomer``, if
        known); True if one was closed.

        Which one goes, and when, is :meth:`Handshakes.victim`'s policy."""
        victim = self._handshaking.victim(newcomer, time.monotonic())
        if victim is None:
            return False
        conn = self._conns.get(victim)
        host = self._host_of(victim)
        self._throttled.log("evict", logging.WARNING, "%s: closing the connection from %s that has waited "
                            "longest for its handshake (%d in handshake, %d from %s)", why,
                            conn.peer if conn is not None else host, len(self._handshaking),
                            self._handshaking.count(host), host)
        self._lost(victim)
        return True

    def _admit(self, sock: socket.socket, address: tuple[str, int]) -> None:
        try:
            tune(sock)
            # Until its OPEN (signed with the shared key) is in, a connection gets the small limits.
            conn = (Connection(sock, self._key, PRE_SESSION_LIMITS, _peer(address)) if self._tls_connection is None
                    else self._tls_connection(sock, self._key, PRE_SESSION_LIMITS, _peer(address), self._tls))
            conn_id = self._new_conn_id()
            self._selector.register(conn.sock, selectors.EVENT_READ, conn_id)
        except OSError as exc:  # reset already, or the selector is out of memory
            log.info("dropping connection from %s: %s", _peer(address), exc)
            sock.close()
            return
        now = time.monotonic()
        self._conns[conn_id] = conn
        self._handshaking.add(conn_id, address[0], now)
        self.scheduler.connected(conn_id, now)

    def _pause_accepting(self, until: float) -> None:
        if self._accepting_again is None:
            self._selector.unregister(self._listen)
        self._accepting_again = until

    def _resume_accepting(self) -> None:
        if self._accepting_again is not None:
            self._accepting_again = None
            self._selector.register(self._listen, selectors.EVENT_READ, _LISTENER)

    def _accept_soon(self) -> None:
        """A place in handshake or a descriptor became free: if accepting is paused, the loop resumes it
        when it next looks at its timers (it alone changes the listener's registration)."""
        if self._accepting_again is not None:
            self._accepting_again = 0.0

    def _welcomed(self, conn_id: ConnId) -> None:
        if conn_id in self._handshaking:
            self._handshaking.remove(conn_id)
            self._accept_soon()

    def _host_of(self, conn_id: ConnId) -> str:
        entry = self._handshaking.get(conn_id)
        return "?" if entry is None else entry.host

    # --- input -----------------------------------------------------------------------------------------

    def _read(self, conn_id: ConnId) -> None:
        conn = self._conns.get(conn_id)
        if conn is None:  # closed earlier in this round of events (made room for another)
            return
        try:
            frames = conn.read()
        except NotTlsError as exc:
            self._throttled.log("plaintext", logging.WARNING, "closing connection from %s: %s", conn.peer, exc)
            if exc.ours:
                self._refuse_plaintext(conn)
            self._lost(conn_id)
            return
        except ProtocolError as exc:
            limited(log, logging.WARNING, (owner(self), "bad frame"), "closing connection from %s: %s%s", conn.peer,
                    printable(exc), _tls_hint(exc, self._tls))
            if isinstance(exc, AuthenticationError) and not conn.opened:
                self._refuse_key(conn)
            self._lost(conn_id)
            return
        except OSError as exc:  # ssl.SSLError among them
            self._failed(conn, exc)
            self._lost(conn_id)
            return
        if frames is None:
            if conn.mid_frame:
                limited(log, logging.WARNING, (owner(self), "truncated"),
                        "connection from %s closed in the middle of a frame (truncated)", conn.peer)
            self._lost(conn_id)
            return
        if conn.read_needs_write:
            self._dirty.add(conn_id)  # registers interest in writability; read() runs again then
        now = time.monotonic()
        for frame in frames:
            if conn.opened:
                if not conn.proven:
                    # Its first frame under the session keys (HELLO) verified: the peer holds the key, and
                    # only now may it send frames of the full size. An OPEN proves nothing: it carries no
                    # freshness from us, so a recorded one replays.
                    conn.proven = True
                    conn.reader.limits = self._limits
                self.scheduler.received(conn_id, frame, now)
                continue
            if frame is not frames[-1]:
                # Read with the shared key alone, as the OPEN before them is. No peer of ours sends anything
                # before the CHALLENGE: its next frame is signed with keys derived from it.
                limited(log, logging.WARNING, (owner(self), "early"), "closing connection from %s: a frame "
                        "sent before the server's CHALLENGE", conn.peer)
                self._lost(conn_id)
                return
            try:
                opening = self.open_session(frame)
            except ProtocolError as exc:
                log.warning("closing connection from %s: %s", conn.peer, exc)
                self._lost(conn_id)
                return
            conn.send_mac = opening.challenge_mac
            self._transmit(conn_id, opening.challenge)
            conn.send_mac, conn.reader.mac = opening.send, opening.receive
            conn.opened = True  # (the small limits stay until a frame verifies under the session keys)
            if self._key is None:  # nothing to prove: the session is as trusted now as it will ever be
                conn.proven = True
                conn.reader.limits = self._limits

    @staticmethod
    def _refuse_key(conn: Connection) -> None:
        """Tell a peer whose OPEN was not signed with our key why it is closed, so a worker stops instead of
        retrying for ever. Unsigned: we share no key with it (a forged one can do no more than a reset)."""
        conn.send_mac = None
        conn.queue(key_rejected())
        with contextlib.suppress(OSError):
            conn.flush()

    def _refuse_plaintext(self, conn: Connection) -> None:
        """Tell a peer of ours that speaks plaintext to this TLS server what it must do, signed as it expects
        the answer to its OPEN to be (bound to that OPEN's nonce), so that a peer with the key reads the
        reason rather than a bad HMAC. Best effort: only if its OPEN has already arrived whole, as it does
        when sent in one write; otherwise the refusal goes out signed with the shared key alone."""
        with contextlib.suppress(ProtocolError, OSError):
            frames = conn.read_plaintext()
            if frames:
                conn.send_mac = self.open_session(frames[0]).challenge_mac
        conn.refuse_plaintext(reject(RejectCode.PROTOCOL, "this job server requires TLS: connect with tls_ca=... "
                                     "(--tls-ca), and a client certificate if it asks for one"))

    def _failed(self, conn: Connection, exc: OSError) -> None:
        if self._tls is None:
            log.info("connection from %s failed: %s", conn.peer, exc)
            return
        reason = getattr(exc, "reason", None) or exc  # an ssl.SSLError's short reason
        if getattr(conn, "handshaking", False):  # scanners, wrong or missing client certificates: a flood
            self._throttled.log("tls", logging.WARNING, "TLS handshake with %s failed: %s", conn.peer, reason)
        else:
            log.info("TLS connection from %s failed: %s", conn.peer, reason)

    # --- output ------------------------------------------------------------------------------------

    def _transmit(self, conn: ConnId, frame: Frame) -> None:
        connection = self._conns.get(conn)
        if connection is not None:
            connection.queue(frame)
            self._dirty.add(conn)
            if frame.kind == Kind.WELCOME and self._handshaking.entries:
                self._welcomed(conn)

    def _flush_dirty(self) -> None:
        dirty, self._dirty = self._dirty, set()
        for conn_id in dirty:
            conn = self._conns.get(conn_id)
            if conn is None:
                continue
            try:
                done = conn.flush()
            except OSError as exc:
                limited(log, logging.INFO, (owner(self), "lost"), "connection from %s lost while sending: %s",
                        conn.peer, printable(exc))
                self._lost(conn_id)
                continue
            if conn.write_registered == done:  # (un)register interest in writability only on change
                conn.write_registered = not done
                events = selectors.EVENT_READ | (0 if done else selectors.EVENT_WRITE)
                self._selector.modify(conn.sock, events, conn_id)
        self.pump()  # losses above may have produced actions
        if self._dirty:
            self._flush_dirty()

    def _flush_from_caller(self) -> None:
        """Send queued frames from a submitting thread; anything that would block (or fail) is left in
        ``_dirty`` for the loop, which owns the selector registrations and loss handling."""
        for conn_id in list(self._dirty):
            conn = self._conns.get(conn_id)
            if conn is None or conn.write_registered:
                continue
            try:
                if conn.flush():
                    self._dirty.discard(conn_id)
            except OSError:
                pass  # the loop will see the error again and handle the loss

    def _caller_left_work(self) -> bool:
        return bool(self._dirty)

    def _lost(self, conn_id: ConnId) -> None:
        self._forget(conn_id)
        self.scheduler.disconnected(conn_id, time.monotonic())

    def _drop(self, conn: ConnId, reason: str) -> None:
        connection = self._conns.get(conn)
        if connection is not None:
            try:
                connection.flush()  # let a REJECT reach the peer if the socket takes it at once
            except OSError:
                pass
        self._forget(conn)

    def _forget(self, conn_id: ConnId) -> None:
        conn = self._conns.pop(conn_id, None)
        self._dirty.discard(conn_id)
        self._handshaking.remove(conn_id)
        if conn is not None:
            self._selector.unregister(conn.sock)
            conn.close()
            self._accept_soon()

    def _close_all(self) -> None:
        if self._closed:
            return
        self._closed = True
        for conn_id in list(self._conns):
            self._forget(conn_id)
        for sock in (self._listen, self._waker.reader):
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
        self._listen.close()
        self._waker.close()
        self._selector.close()


def _peer(address: tuple[str, int]) -> str:
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"


def _tls_hint(exc: ProtocolError, tls: ssl.SSLContext | None) -> str:
    """A hint for a TLS client talking to a plaintext server (its handshake record is no frame)."""
    if tls is None and repr(bytes([0x16, 0x03])) in str(exc):
        return " (a TLS client? this server has no TLS: start it with --tls-cert and --tls-key)"
    return ""


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
