"""The tcp transport: ``tcp`` (embedded cluster) and ``tcp://host:port`` (a running job server).

Standard library only. The job server is :mod:`.tcp_server`; this module has the client that connects to
it (one I/O thread, reconnection with backoff, resubmission of calls in flight) and the worker loop.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time

from ...errors import (
    AuthenticationError,
    BrokenRemoteExecutor,
    RemoteExecutorError,
    ServerUnavailableError,
    TransportError,
)
from ...jobserver.client import FramedClient, QueuedClientTransport, rejection
from ...netio import connect, retry_with_backoff
from ...wire.frames import DEFAULT_LIMITS, Frame, Kind, Limits, hello, parse_json
from ...worker import WorkerCore, WorkerSettings
from .. import split_hostports
from ..base import ClientTransport, Listener, Options, Session
from .stream import BlockingConnection, Connection

log = logging.getLogger("remote_executor.tcp")


def create(url: str, embedded: bool, options: Options) -> ClientTransport:
    if embedded:
        from ...cluster import EmbeddedTransport

        return EmbeddedTransport("tcp", options)
    return TcpClientTransport(url, options)


class ClosedDuringHandshake(AuthenticationError, ConnectionResetError):
    """The server hung up before answering HELLO: a wrong key, or a server going down (so: retryable)."""


def handshake(
    sock: socket.socket, key: bytes | None, first: Frame, timeout: float, peer: str, limits: Limits = DEFAULT_LIMITS
) -> BlockingConnection:
    """Send HELLO and read the WELCOME; a REJECT or a silent close becomes a clear exception.

    The returned connection keeps whatever arrived after the WELCOME (its reader state and ready frames)."""
    conn = BlockingConnection(sock, key, limits)
    conn.send(first)
    try:
        reply = conn.recv(timeout)
    except (ConnectionError, TimeoutError) as exc:
        hint = " (wrong key?)" if key is not None else " (does it need a key?)"
        raise ClosedDuringHandshake(f"{peer} closed the connection during the handshake{hint}: {exc}") from exc
    if reply.kind == Kind.REJECT:
        raise rejection(reply)
    if reply.kind != Kind.WELCOME:
        raise TransportError(f"expected WELCOME from {peer}, got {reply.kind.name}")
    return conn


class TcpClientTransport(QueuedClientTransport):
    """Connects an executor to ``remote-executor server tcp://host:port``."""

    def __init__(self, url: str, options: Options) -> None:
        super().__init__(url, options)
        self._conn: Connection | None = None
        self._selector = selectors.DefaultSelector()

    # --- ClientTransport ------------------------------------------------------------------------------

    def start(self, session: Session, listener: Listener) -> None:
        self._client = FramedClient(session, listener, self.url)
        self._conn = self._connect_once()  # the first connection fails loudly, in the constructor
        self._selector.register(self._waker.reader, selectors.EVENT_READ, None)
        self._start_thread(self._run, "remote-executor-tcp-client")

    def close(self) -> None:
        self._stop_thread()
        self._waker.close()

    # --- connection ---------------------------------------------------------------------------------

    def _connect_once(self) -> Connection:
        assert self._client is not None
        sock = connect(self.address, self._options.connect_timeout)
        try:
            done = handshake(sock, self._options.key, self._client.hello(), self._options.connect_timeout,
                             self.url, self._limits)
        except BaseException:
            sock.close()
            raise
        for frame in done.ready:  # what the server sent right after WELCOME (CAPACITY, ...)
            self._client.handle(frame)
        return Connection(sock, self._options.key, self._limits, self.url, done.reader)

    def _reconnect(self) -> Connection | None:
        """Reconnect with backoff; resubmit what was in flight. None if we gave up (or are closing)."""
        assert self._client is not None
        resubmit = self._client.connection_lost()
        with self._lock:
            self._outbox.clear()  # every accepted call is in `resubmit` (or was failed)
        try:
            conn = retry_with_backoff(self._connect_once, self._options.reconnect_timeout, self._stop,
                                      lambda exc, delay: log.info("reconnecting to %s: %s", self.url, exc))
        except (OSError, TransportError) as exc:
            self._client.listener.on_broken(ServerUnavailableError(
                f"lost the job server {self.url} and could not reconnect within "
                f"{self._options.reconnect_timeout}s: {exc}"))
            return None
        if conn is not None and resubmit:
            log.info("reconnected to %s; resubmitting %d call(s)", self.url, len(resubmit))
            with self._lock:
                self._outbox.extendleft(reversed(self._client.submit_frames(resubmit)))
        return conn

    # --- the I/O thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and self._conn is not None:
                if not self._serve(self._conn):
                    self._conn = self._reconnect()
        except BaseException as exc:  # a bug here must fail the futures, not strand them
            log.exception("the connection thread for %s failed", self.url)
            assert self._client is not None
            self._client.listener.on_broken(BrokenRemoteExecutor(f"the connection to {self.url} failed: {exc!r}"))
        finally:
            if self._conn is not None:
                self._conn.close()
            self._selector.close()

    def _serve(self, conn: Connection) -> bool:
        """Run one connection until it fails (False) or we are closing (True)."""
        assert self._client is not None
        self._selector.register(conn.sock, selectors.EVENT_READ, conn)
        last_recv = last_send = time.monotonic()
        interval, timeout = self._options.heartbeat_interval, self._options.heartbeat_timeout
        try:
            while not self._stop.is_set():
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.wants_write else 0)
                self._selector.modify(conn.sock, events, conn)
                for key, mask in self._selector.select(interval / 2):
                    if key.data is None:
                        self._waker.drain()
                        continue
                    if mask & selectors.EVENT_READ:
                        frames = conn.read()
                        if frames is None:
                            log.warning("job server %s closed the connection", self.url)
                            return False
                        last_recv = time.monotonic()
                        for frame in frames:
                            self._client.handle(frame)
                now = time.monotonic()
                if now - last_recv > timeout:
                    log.warning("no heartbeat from %s for %.1fs", self.url, now - last_recv)
                    return False
                with self._lock:
                    while self._outbox:
                        conn.queue(self._outbox.popleft())
                if not conn.wants_write and now - last_send >= interval:
                    conn.queue(Frame(Kind.HEARTBEAT))
                if conn.wants_write:
                    conn.flush()
                    last_send = now
            return True
        except OSError as exc:
            log.warning("connection to %s failed: %s", self.url, exc)
            return False
        finally:
            self._selector.unregister(conn.sock)
            if not self._stop.is_set():
                conn.close()


# --- the worker loop -----------------------------------------------------------------------------------


def run_worker(settings: WorkerSettings, core: WorkerCore) -> int:
    """Serve a tcp job server until drained (0), unreachable (1) or refused (2); reconnect in between."""
    address = split_hostports(settings.url)[0]
    info: dict[str, object] = {"name": settings.name, "slots": 1}
    if settings.token is not None:
        info["token"] = settings.token.decode()

    def attempt() -> BlockingConnection:
        sock = connect(address, settings.connect_timeout)
        try:
            return handshake(sock, settings.key, hello("worker", info), settings.connect_timeout, settings.url)
        except BaseException:
            sock.close()
            raise

    while True:
        try:
            conn = retry_with_backoff(attempt, settings.reconnect_timeout, threading.Event(),
                                      lambda exc, delay: log.info("connecting to %s: %s", settings.url, exc))
        except OSError as exc:  # includes ClosedDuringHandshake, retried until reconnect_timeout
            log.error("cannot reach %s: %s", settings.url, exc)
            return 1
        except RemoteExecutorError as exc:
            log.error("%s refused this worker: %s", settings.url, exc)
            return 2
        assert conn is not None
        code = _serve_connection(conn, settings, core)
        if code is not None:
            return code


def _serve_connection(conn: BlockingConnection, settings: WorkerSettings, core: WorkerCore) -> int | None:
    """One connection's life: None to reconnect, else the exit code."""
    beat = _Heartbeat(conn, settings)
    beat.start()
    try:
        return _work(conn, settings, core)
    except OSError as exc:  # ConnectionError, TimeoutError: the server went away or went silent
        log.warning("lost %s: %s; reconnecting", settings.url, exc)
        return None
    finally:
        beat.stop()
        conn.close()


def _work(conn: BlockingConnection, settings: WorkerSettings, core: WorkerCore) -> int:
    while True:
        frame = conn.recv(settings.heartbeat_timeout)
        if frame.kind == Kind.TASK:
            conn.send(Frame(Kind.RESULT, a=frame.a, parts=core.run(frame.b, frame.parts)))
        elif frame.kind == Kind.INIT:
            failure = core.initialize(frame.a, frame.parts)
            if failure is not None:
                conn.send(Frame(Kind.INIT_FAILED, a=frame.a, parts=failure))
        elif frame.kind == Kind.DRAIN:
            log.info("drained; exiting")
            return 0


class _Heartbeat:
    """Sends HEARTBEAT while the main thread is busy (or idle), and DRAIN when SIGTERM asks for it."""

    def __init__(self, conn: BlockingConnection, settings: WorkerSettings) -> None:
        self._conn = conn
        self._settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="remote-executor-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        interval = self._settings.heartbeat_interval
        drain_sent = False
        # Poll the drain flag often: SIGTERM must reach the server quickly even with a long interval.
        while not self._stop.wait(min(interval, 0.05)):
            try:
                if self._settings.drain.is_set() and not drain_sent:
                    self._conn.send(Frame(Kind.DRAIN))
                    drain_sent = True
                elif time.monotonic() - self._conn.last_send >= interval:
                    self._conn.send(Frame(Kind.HEARTBEAT))
            except OSError:
                return


# --- admin ---------------------------------------------------------------------------------------------


def status(url: str, key: bytes | None, timeout: float = 5.0) -> dict[str, object]:
    """The job server's view (workers, clients, queues), for ``remote-executor status|ping``."""
    sock = connect(split_hostports(url)[0], timeout)
    try:
        conn = handshake(sock, key, hello("admin", {"name": "admin"}), timeout, url)
        conn.send(Frame(Kind.STATUS))
        while True:
            frame = conn.recv(timeout)
            if frame.kind == Kind.STATUS:
                return parse_json(frame)
    finally:
        sock.close()
