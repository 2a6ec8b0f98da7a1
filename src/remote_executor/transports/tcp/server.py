"""The tcp job server: a selector loop around the shared :class:`~remote_executor.jobserver.server.ServerCore`.

One thread does all socket I/O. A peer that sends a malformed, oversized or unauthenticated frame is
logged and disconnected; everyone else is served on.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time

from ...errors import ProtocolError
from ...jobserver.scheduler import ConnId
from ...jobserver.server import ServerCore
from ...logsafe import limited, owner, printable
from ...netio import tune
from ...security import server_key
from ...wire.frames import DEFAULT_LIMITS, Frame, Limits
from .stream import Connection

log = logging.getLogger("remote_executor.jobserver.server")

_LISTENER = "listener"
_WAKER = "waker"


class TcpServer(ServerCore):
    """``remote-executor server tcp://HOST:PORT``, or the embedded cluster's in-process job server."""

    caller_may_drive = True  # plain sockets: a submitting thread may send TASK frames itself
    scheme = "tcp"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        key: bytes | None = None,
        token: bytes | None = None,
        insecure: bool = False,
        limits: Limits = DEFAULT_LIMITS,
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
    ) -> None:
        key = server_key(host, key, token, insecure)  # the per-user key unless given one or insecure
        self._listen = socket.create_server((host, port), family=_family(host), backlog=256)
        self._listen.setblocking(False)
        super().__init__(host, int(self._listen.getsockname()[1]), key=key, token=token, limits=limits,
                         heartbeat_interval=heartbeat_interval, heartbeat_timeout=heartbeat_timeout)
        self._selector = selectors.DefaultSelector()
        self._conns: dict[ConnId, Connection] = {}
        self._dirty: set[ConnId] = set()
        self._closed = False
        self._selector.register(self._listen, selectors.EVENT_READ, _LISTENER)
        self._selector.register(self._waker.reader, selectors.EVENT_READ, _WAKER)

    # --- running -----------------------------------------------------------------------------------


    def serve_forever(self) -> None:
        self.loop_thread = threading.current_thread()
        next_tick = 0.0
        try:
            while not self.stopping.is_set():
                events = self._selector.select(max(next_tick - time.monotonic(), 0.0))
                with self.drive_lock:
                    now = time.monotonic()
                    if now >= next_tick:
                        next_tick = self.scheduler.tick(now)
                    for key, mask in events:
                        self._on_event(key.data, mask)
                    self.pump()
                    self._flush_dirty()
        finally:
            with self.drive_lock:
                self._close_all()


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
            if mask & selectors.EVENT_WRITE and data in self._conns:
                self._dirty.add(data)

    def _accept(self) -> None:
        try:
            sock, address = self._listen.accept()
        except (BlockingIOError, InterruptedError):
            return
        tune(sock)
        conn_id = self._new_conn_id()
        conn = Connection(sock, self._key, self._limits, f"{address[0]}:{address[1]}")
        self._conns[conn_id] = conn
        self._selector.register(conn.sock, selectors.EVENT_READ, conn_id)
        self.scheduler.connected(conn_id, time.monotonic())

    def _read(self, conn_id: ConnId) -> None:
        conn = self._conns[conn_id]
        try:
            frames = conn.read()
        except ProtocolError as exc:
            limited(log, logging.WARNING, (owner(self), "bad frame"), "closing connection from %s: %s", conn.peer,
                    printable(exc))
            self._lost(conn_id)
            return
        except OSError as exc:
            limited(log, logging.INFO, (owner(self), "failed"), "connection from %s failed: %s", conn.peer,
                    printable(exc))
            self._lost(conn_id)
            return
        if frames is None:
            if conn.mid_frame:
                limited(log, logging.WARNING, (owner(self), "truncated"),
                        "connection from %s closed in the middle of a frame (truncated)", conn.peer)
            self._lost(conn_id)
            return
        now = time.monotonic()
        for frame in frames:
            self.scheduler.received(conn_id, frame, now)

    # --- output ------------------------------------------------------------------------------------

    def _transmit(self, conn: ConnId, frame: Frame) -> None:
        connection = self._conns.get(conn)
        if connection is not None:
            connection.queue(frame)
            self._dirty.add(conn)

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
        if conn is not None:
            self._selector.unregister(conn.sock)
            conn.close()

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


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
