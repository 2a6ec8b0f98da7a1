"""The zmq job server: a ROUTER socket and a zmq poll loop around :class:`~remote_executor.jobserver.server.ServerCore`.

Peers are DEALER sockets, each session with a random routing id. A routing id becomes a scheduler
connection on its first valid frame, which must be HELLO; a frame from an id the server does not know (a
session it dropped, or one from before a restart) is ignored, so that peer falls silent, times out and
says HELLO again as a new session. ZeroMQ hides disconnects: the scheduler's heartbeat timeout decides
when a peer is gone, helped by ``ZMQ_ROUTER_MANDATORY`` (a send to a peer whose TCP connection closed
fails at once, so a killed worker is noticed at the next heartbeat, not after the timeout).

One thread does all socket I/O. A malformed, oversized or unauthenticated message is logged and its peer
dropped; everyone else is served on. A TCP connection through which no frame has verified yet is capped
and timed out as on tcp (:mod:`.unproven`): libzmq would otherwise keep an unfinished message for ever.
With a CURVE allow-list, pyzmq's ZAP authenticator runs on a thread of its own in the server's context and
refuses unlisted keys inside libzmq's handshake (:mod:`.allowlist`): such a peer never reaches this loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from typing import Any

import zmq

from ...errors import AuthenticationError, ProtocolError, TransportError
from ...jobserver.scheduler import ConnId
from ...jobserver.server import ServerCore
from ...logsafe import limited, owner, printable
from ...security import server_key
from ...wire.frames import PRE_SESSION_LIMITS, Frame, Kind, Limits, decode_parts, encode
from ...wire.messages import key_rejected
from ...wire.serialization import Buffer
from ...wire.session import Mac, as_mac
from .allowlist import CurveAllowList
from .sockets import HWM, endpoint, load_certificate, recv_frame, recv_rest, send_frame
from .unproven import Unproven

_KIND_OFFSET = 3  # in the frame header: magic (2 bytes) and version (1), then the kind

log = logging.getLogger("remote_executor.jobserver.server")

_READ_BATCH = 512  # messages read per loop turn before the scheduler's actions are applied
_DEFAULT_LIMITS = Limits()
# Plain ints: pyzmq's flags are enum.IntFlag members, whose operators are Python calls (several per message).
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_SRCFD = int(zmq.SRCFD)  # the descriptor of the connection a message came by
_BACKLOG_RETRY = 0.005  # how soon to retry sending to a peer at its high-water mark


class ZmqServer(ServerCore):
    """``remote-executor server zmq://HOST:PORT``, or the embedded cluster's in-process job server.

    ``curve_secret_key``: a secret certificate file (``zmq.auth.create_certificates``) to encrypt every
    connection with CURVE; clients and workers then need the matching public certificate. Without
    ``curve_allow`` any holder of that public certificate gets a session.

    ``curve_allow``: a directory of public certificates (``*.key``); only clients and workers whose own
    CURVE key is there get a session (read once, here)."""

    scheme = "zmq"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        key: bytes | None = None,
        insecure: bool = False,
        limits: Limits = _DEFAULT_LIMITS,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
        curve_secret_key: str | os.PathLike[str] | None = None,
        curve_allow: str | os.PathLike[str] | None = None,
        max_handshaking: int = 64,
        handshake_timeout: float | None = None,
    ) -> None:
        key = server_key(host, key, insecure)  # the per-user key unless given one or insecure
        if curve_allow is not None and curve_secret_key is None:
            raise TransportError("a CURVE allow-list (curve_allow, --curve-allow) needs the server's CURVE "
                                 "secret key too (curve_secret_key, --curve-secret-key)")
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._allow: CurveAllowList | None = None
        try:
            if curve_allow is not None:  # the ZAP handler must be there before the first handshake
                self._allow = CurveAllowList(self._ctx, curve_allow)
                self._allow.start()
            # Connections that have not proved the key: capped, timed out and bounded (.unproven), watched
            # from before the socket listens.
            self._router, self._unproven = self._bind(
                host, port, limits, curve_secret_key, max_handshaking,
                heartbeat_timeout if handshake_timeout is None else handshake_timeout)
        except BaseException:
            if self._allow is not None:
                self._allow.stop()  # its thread owns sockets of this context: stop it before destroying
            self._ctx.destroy(linger=0)
            raise
        bound = self._router.getsockopt(zmq.LAST_ENDPOINT)
        assert isinstance(bound, bytes)
        super().__init__(host, int(bound.decode().rsplit(":", 1)[1]), key=key, limits=limits,
                         heartbeat_interval=heartbeat_interval, heartbeat_timeout=heartbeat_timeout)
        self._ids: dict[bytes, ConnId] = {}  # routing id -> connection
        self._routes: dict[ConnId, bytes] = {}  # connection -> routing id
        self._backlog: dict[ConnId, deque[list[Buffer]]] = {}  # encoded frames refused at a peer's HWM
        self._open_mac = as_mac(key)  # what an OPEN is signed with: the shared key
        self._send_macs: dict[ConnId, Mac | None] = {}  # each session's own keys
        self._receive_macs: dict[ConnId, Mac | None] = {}
        # The small limits until a session's first frame (HELLO) verifies under its keys: an OPEN proves
        # nothing (it carries no freshness from us, so a recorded one replays).
        self._receive_limits: dict[ConnId, Limits] = {}
        self._unreachable: set[ConnId] = set()
        self._closed = False
        self._close_lock = threading.Lock()

    @property
    def handshaking(self) -> int:
        """How many connections have not proved the key yet (no frame through them has verified)."""
        return len(self._unproven.waiting)

    def _bind(self, host: str, port: int, limits: Limits, curve_secret_key: str | os.PathLike[str] | None,
              max_handshaking: int, handshake_timeout: float) -> tuple[zmq.Socket[Any], Unproven]:
        router: zmq.Socket[Any] = self._ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unknown or gone peer: EHOSTUNREACH, not a silent drop
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a session's TCP reconnect takes over its routing id
        router.setsockopt(zmq.SNDHWM, HWM)
        router.setsockopt(zmq.RCVHWM, HWM)
        router.setsockopt(zmq.MAXMSGSIZE, limits.max_frame)
        router.setsockopt(zmq.TCP_KEEPALIVE, 1)
        if ":" in host:
            router.setsockopt(zmq.IPV6, 1)
        if curve_secret_key is None:
            # libzmq takes a peer whose first byte is not ZMTP 3's 0xFF for a ZMTP 1.0 one and hands us every
            # byte after it as messages, with no handshake at all: a flood of such garbage held hundreds of MB
            # in libzmq. With ZAP enabled (a domain set) it refuses ZMTP 1.0 and 2.0 peers at once. This
            # context has no ZAP handler without CURVE, so ZMTP 3 NULL handshakes pass as before (CURVE refuses
            # the old protocols already).
            router.setsockopt(zmq.ZAP_DOMAIN, b"remote-executor")
        if curve_secret_key is not None:
            try:
                public, secret = load_certificate(curve_secret_key, "the CURVE secret key")
            except TransportError:
                router.close()
                raise
            if secret is None:
                router.close()
                raise TransportError(f"{curve_secret_key} holds no secret key (use the .key_secret file)")
            router.curve_server = True
            router.curve_publickey = public
            router.curve_secretkey = secret
        unproven = Unproven(router, max_handshaking, handshake_timeout, limits.max_frame)
        try:
            router.bind(endpoint(host, port or "*"))
        except zmq.ZMQError as exc:
            unproven.close()
            router.close()
            raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc}") from exc
        return router, unproven

    # --- running -----------------------------------------------------------------------------------


    def serve_forever(self) -> None:
        self.loop_thread = threading.current_thread()
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._waker.reader, zmq.POLLIN)
        poller.register(self._unproven.monitor, zmq.POLLIN)
        next_tick = next_sweep = 0.0
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                if self._unproven.peers and now >= next_sweep:  # (on a clock of its own: see excuse())
                    next_sweep = self._unproven.sweep(now)
                if now >= next_tick:
                    # A tick that runs late was not running meanwhile (a stopped or starved process): that
                    # silence is ours, not the peers'. What they sent may not even have reached the socket's
                    # queue yet (libzmq's I/O thread was stopped too); read what has.
                    if next_tick:
                        self.scheduler.excuse(now - next_tick)
                    self._on_ready(dict(poller.poll(0)))
                    next_tick = self.scheduler.tick(time.monotonic())
                    self._pump_all()  # what was read and the heartbeats due: not after the wait below
                until = min(next_tick, next_sweep) if self._unproven.peers else next_tick
                wait = _BACKLOG_RETRY if self._backlog else max(until - time.monotonic(), 0.0)
                self._on_ready(dict(poller.poll(int(wait * 1000) + 1)))
                self._pump_all()
        finally:
            self._close_all()
            self.loop_ended()


    # --- input ---------------------------------------------------------------------------------------

    def _on_ready(self, ready: dict[Any, int]) -> None:
        if self._waker.reader.fileno() in ready:
            self._waker.drain()
        if self._unproven.monitor in ready:  # before the messages: a connection is watched from its accept
            self._unproven.on_events(time.monotonic())
        if self._router in ready:
            self._read()

    def _read(self) -> None:
        router = self._router
        for _ in range(_READ_BATCH):
            # Ask whether a message waits rather than let recv raise zmq.Again at the end of every batch:
            # an exception costs far more than the query.
            if not int(router.getsockopt(_EVENTS)) & _POLLIN:
                return
            try:
                route = router.recv(_NOBLOCK)
            except zmq.Again:
                return
            conn = self._ids.get(route)
            opening = False
            try:
                if conn is None:  # a new session: only its OPEN, signed with the shared key, is read
                    head = router.recv(copy=False)  # the rest of this message is there already (zmq delivers it whole)
                    prefix = head.bytes
                    opening = len(prefix) > _KIND_OFFSET and prefix[_KIND_OFFSET] == Kind.OPEN
                    parts = recv_rest(router, prefix, PRE_SESSION_LIMITS, True)
                    if self._open(route, decode_parts(prefix, parts, self._open_mac, PRE_SESSION_LIMITS)) \
                            and self._key is None:  # (without a key nothing will ever be proved)
                        self._unproven.proved(head.get(_SRCFD))
                elif self._unproven.peers:  # some connection has yet to prove itself: is it this one's?
                    source: list[int] = []
                    frame = recv_frame(router, self._receive_macs[conn], self._receive_limits[conn], 0, source)
                    self._unproven.proved(source[0])  # (it verified under its session's keys)
                    self._received(conn, frame)
                else:  # (the common case, inline)
                    limits = self._receive_limits[conn]
                    frame = recv_frame(router, self._receive_macs[conn], limits)
                    if limits is PRE_SESSION_LIMITS:
                        self._receive_limits[conn] = self._limits
                    self.scheduler.received(conn, frame, time.monotonic())
            except ProtocolError as exc:
                self._malformed(route, exc, opening)

    def _received(self, conn: ConnId, frame: Frame) -> None:
        if self._receive_limits[conn] is PRE_SESSION_LIMITS:  # its first frame under the session keys
            self._receive_limits[conn] = self._limits
        self.scheduler.received(conn, frame, time.monotonic())

    def _open(self, route: bytes, frame: Frame) -> bool:
        """A new session from ``route`` if ``frame`` is an OPEN (True)."""
        if frame.kind != Kind.OPEN:
            limited(log, logging.DEBUG, (owner(self), "unknown peer"), "ignoring %s from unknown peer %s "
                    "(a dropped session)", frame.kind.name, printable(route.hex()))
            return False
        opening = self.open_session(frame)
        conn = self._new_conn_id()
        self._ids[route] = conn
        self._routes[conn] = route
        self._receive_macs[conn] = opening.receive
        # (without a key nothing will ever be proved: the session is as trusted now as it will ever be)
        self._receive_limits[conn] = PRE_SESSION_LIMITS if self._key is not None else self._limits
        self.scheduler.connected(conn, time.monotonic())
        self._enqueue(conn, encode(opening.challenge, opening.challenge_mac))
        self._send_macs[conn] = opening.send
        return True

    def _malformed(self, route: bytes, exc: ProtocolError, opening: bool = False) -> None:
        conn = self._ids.get(route)
        limited(log, logging.WARNING, (owner(self), "bad frame"), "dropping zmq peer %s: %s",
                printable(route.hex()) if conn is None else f"#{conn}", printable(exc))
        if conn is not None:
            self._lost(conn)
        elif opening and isinstance(exc, AuthenticationError):
            # An OPEN not signed with our key: say so (unsigned: we share no key with this peer), so a
            # worker stops instead of retrying for ever; a forged one can do no more than a dropped session.
            # Any other frame from a peer we do not know is a session we dropped (it was silent too long):
            # no answer, so that peer reconnects rather than reading "wrong key".
            with contextlib.suppress(zmq.ZMQError):
                send_frame(self._router, encode(key_rejected()), route, zmq.NOBLOCK)

    # --- output --------------------------------------------------------------------------------------

    def _pump_all(self) -> None:
        """Apply the scheduler's actions, retry refused frames, and report peers found gone."""
        while True:
            self.pump()
            self._retry_backlog()
            if not self._unreachable:
                return
            gone, self._unreachable = self._unreachable, set()
            for conn in gone:
                if conn in self._routes:
                    # Rate-limited: a peer replaying a recorded OPEN from fresh connections that close at once
                    # makes as many of these as it likes.
                    limited(log, logging.INFO, (owner(self), "gone"), "zmq peer #%d is gone (its connection closed)",
                            conn)
                    self._lost(conn)

    def _transmit(self, conn: ConnId, frame: Frame) -> None:
        if conn in self._routes:
            self._enqueue(conn, encode(frame, self._send_macs.get(conn)))

    def _enqueue(self, conn: ConnId, buffers: list[Buffer]) -> None:
        """Send an encoded frame now, or after the frames already waiting for this peer."""
        backlog = self._backlog.get(conn)
        if backlog is not None:
            backlog.append(buffers)
        elif not self._send(conn, buffers):
            self._backlog[conn] = deque([buffers])

    def _send(self, conn: ConnId, buffers: list[Buffer]) -> bool:
        """False if the peer is at its high-water mark (try again later)."""
        try:
            send_frame(self._router, buffers, self._routes[conn], _NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self._unreachable.add(conn)
        return True

    def _retry_backlog(self) -> None:
        for conn, backlog in list(self._backlog.items()):
            while backlog and self._send(conn, backlog[0]):
                backlog.popleft()
            if not backlog:
                del self._backlog[conn]

    def _lost(self, conn: ConnId) -> None:
        self._forget(conn)
        self.scheduler.disconnected(conn, time.monotonic())

    def _drop(self, conn: ConnId, reason: str) -> None:
        backlog = self._backlog.pop(conn, None)
        if backlog:  # let a REJECT reach the peer if its queue takes it now
            while backlog and self._send(conn, backlog[0]):
                backlog.popleft()
        self._forget(conn)

    def _forget(self, conn: ConnId) -> None:
        self._send_macs.pop(conn, None)
        self._receive_macs.pop(conn, None)
        self._receive_limits.pop(conn, None)
        route = self._routes.pop(conn, None)
        if route is not None:
            self._ids.pop(route, None)
        self._backlog.pop(conn, None)
        self._unreachable.discard(conn)

    def _close_all(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        # linger: after an admin's STOP the last frames (its answer, the workers' DRAIN) should still go out
        self._unproven.close()
        self._router.close(linger=500 if self.stopped_by_admin else 0)
        if self._allow is not None:
            self._allow.stop()
        self._ctx.term()
        self._waker.close()
