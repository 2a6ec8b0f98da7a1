"""The zmq transport: ``zmq`` (embedded cluster) and ``zmq://host:port`` (a running job server).

ZeroMQ carries the same frames as the tcp transport (:mod:`remote_executor.wire.frames`): each frame is one
multipart message ``[prefix, *parts]``, so pickle protocol 5 buffers travel as their own message parts and
large ones are sent and received without a copy. The job server is :mod:`.zmq_server` (a ROUTER socket);
this module has the wire helpers, the client (a DEALER driven by one I/O thread) and the worker loop.

ZeroMQ reconnects TCP by itself and hides disconnects, so liveness is decided by heartbeats in both
directions. Every logical connection (a client session, a worker session) is a new DEALER socket with a
random routing id: after a server restart or a heartbeat timeout the peer says HELLO again as a new peer,
and frames of an old session reaching a server that does not know it are ignored.

Optional CURVE encryption: the server loads its secret certificate, clients and workers the server's
public certificate (files made with :func:`zmq.auth.create_certificates`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.auth

from ...errors import ProtocolError, RemoteExecutorError, ServerUnavailableError, TransportError
from ...jobserver.client import FramedClient, QueuedClientTransport, rejection
from ...wire.frames import MAC_SIZE, Frame, Kind, Limits, decode_parts, encode, hello, parse_json
from ...wire.serialization import Buffer
from ...worker import WorkerCore, WorkerSettings
from .. import split_hostports
from ..base import ClientTransport, Listener, Options, Session

log = logging.getLogger("remote_executor.zmq")

# Parts at least this big are sent and received without a copy (pyzmq's own default threshold).
COPY_THRESHOLD = 64 * 1024
# High-water marks, in messages (one frame = one message) per peer and direction. The executor's
# in-flight window bounds what is on the wire long before these are reached; they are the backstop.
HWM = 1000
CURVE_SERVER_KEY_ENV = "REMOTE_EXECUTOR_CURVE_SERVER_KEY"  # worker side: the server's public key file
_POLL_SLICE = 0.05  # the longest a loop waits without checking its stop/drain flags


def create(url: str, embedded: bool, options: Options) -> ClientTransport:
    if embedded:
        from ...cluster import EmbeddedTransport

        return EmbeddedTransport("zmq", options)
    return ZmqClientTransport(url, options)


# --- wire ----------------------------------------------------------------------------------------------


def endpoint(host: str, port: int | str) -> str:
    """The libzmq endpoint for a host and port (IPv6 addresses in brackets)."""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def send_frame(sock: zmq.Socket[Any], frame: Frame, key: bytes | None, route: bytes | None = None,
               flags: int = 0) -> None:
    """Send one frame as one multipart message, large parts uncopied.

    With ``zmq.NOBLOCK`` in ``flags``, ``zmq.Again`` means nothing was sent (libzmq queues a multipart
    message atomically once its first part is accepted)."""
    buffers = encode(frame, key)
    if route is not None:
        sock.send(route, flags | zmq.SNDMORE)
    last = len(buffers) - 1
    for i, buf in enumerate(buffers):
        more = zmq.SNDMORE if i < last else 0
        if i == 0 or memoryview(buf).nbytes < COPY_THRESHOLD:
            sock.send(buf, flags | more)
        else:
            sock.send(buf, flags | more, copy=False)


def recv_frame(sock: zmq.Socket[Any], key: bytes | None, limits: Limits, flags: int = 0) -> Frame:
    """Receive and validate one frame (the routing id, on a ROUTER, must have been read already).

    The whole message is always consumed, so a malformed one (``ProtocolError``) leaves the socket at the
    start of the next message."""
    prefix = sock.recv(flags)
    return decode_parts(prefix, recv_rest(sock, prefix, limits), key, limits)


def recv_rest(sock: zmq.Socket[Any], prefix: bytes, limits: Limits) -> list[Buffer]:
    """The remaining parts of a message; the ones the prefix announces as large are not copied."""
    sizes = _announced_sizes(prefix)
    parts: list[Buffer] = []
    excess = 0
    while sock.rcvmore:
        index = len(parts)
        if index >= limits.max_parts:
            sock.recv()  # drain the message, then refuse it
            excess += 1
        elif index < len(sizes) and sizes[index] >= COPY_THRESHOLD:
            parts.append(sock.recv(copy=False).buffer)
        else:
            parts.append(sock.recv())
    if excess:
        raise ProtocolError(f"message of more than {limits.max_parts} parts")
    return parts


def _announced_sizes(prefix: bytes) -> Sequence[int]:
    """Part lengths from a prefix, best effort (validation comes later, in ``decode_parts``)."""
    if len(prefix) < 24:
        return ()
    nparts = int.from_bytes(prefix[4:6], "big")
    if len(prefix) not in (24 + 8 * nparts, 24 + 8 * nparts + MAC_SIZE):
        return ()
    return [int.from_bytes(prefix[24 + 8 * i : 32 + 8 * i], "big") for i in range(nparts)]


@dataclass(frozen=True, slots=True)
class Curve:
    """CURVE settings of a client or worker: the server's public key and this side's key pair."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_files(cls, server_key_file: str | os.PathLike[str],
                   own_key_file: str | os.PathLike[str] | None = None) -> Curve:
        server_public, _ = zmq.auth.load_certificate(os.fspath(server_key_file))
        if own_key_file is not None:
            public, secret = zmq.auth.load_certificate(os.fspath(own_key_file))
            if secret is None:
                raise TransportError(f"{own_key_file} holds no secret key (use the .key_secret file)")
        else:
            public, secret = zmq.curve_keypair()  # an ephemeral identity: the server checks none
        return cls(server_public, public, secret)

    @classmethod
    def from_options(cls, extra: Mapping[str, Any]) -> Curve | None:
        """From ``curve_server_key`` (and optionally ``curve_client_key``) in the options, else from
        ``$REMOTE_EXECUTOR_CURVE_SERVER_KEY``; None without either."""
        server_key = extra.get("curve_server_key") or os.environ.get(CURVE_SERVER_KEY_ENV)
        if not server_key:
            return None
        return cls.from_files(server_key, extra.get("curve_client_key"))

    def apply(self, sock: zmq.Socket[Any]) -> None:
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


def dealer(
    ctx: zmq.Context[Any], address: tuple[str, int], limits: Limits, curve: Curve | None
) -> zmq.Socket[Any]:
    """A DEALER with a fresh random routing id, connecting (asynchronously) to the server."""
    sock: zmq.Socket[Any] = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, b"\0" + os.urandom(15))  # leading zero: never a libzmq-made id
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.MAXMSGSIZE, limits.max_frame)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    if ":" in address[0]:
        sock.setsockopt(zmq.IPV6, 1)
    if curve is not None:
        curve.apply(sock)
    sock.connect(endpoint(*address))
    return sock


def handshake(sock: zmq.Socket[Any], first: Frame, key: bytes | None, limits: Limits, timeout: float,
              peer: str, stop: threading.Event | None = None) -> Frame:
    """Send HELLO and wait for the WELCOME (ZeroMQ retries the TCP connection meanwhile).

    A REJECT raises what it means; silence raises :class:`ServerUnavailableError` (the server is down,
    or the HMAC key or the CURVE server key is wrong: either way it never answers)."""
    send_frame(sock, first, key)
    deadline = time.monotonic() + timeout
    while stop is None or not stop.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if not sock.poll(int(min(remaining, _POLL_SLICE) * 1000) + 1, zmq.POLLIN):
            continue
        try:
            reply = recv_frame(sock, key, limits)
        except ProtocolError as exc:
            raise ProtocolError(f"bad answer from {peer} during the handshake (wrong key?): {exc}") from exc
        if reply.kind == Kind.REJECT:
            raise rejection(reply)
        if reply.kind != Kind.WELCOME:
            raise TransportError(f"expected WELCOME from {peer}, got {reply.kind.name}")
        return reply
    raise ServerUnavailableError(
        f"no answer from the job server {peer} within {timeout:g}s: is it running there, and do this "
        f"side's key and CURVE server key match the server's?"
    )


# --- the client ----------------------------------------------------------------------------------------


class ZmqClientTransport(QueuedClientTransport):
    """Connects an executor to ``remote-executor server zmq://host:port``."""

    def __init__(self, url: str, options: Options) -> None:
        super().__init__(url, options)
        self._curve = Curve.from_options(options.extra)
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._sock: zmq.Socket[Any] | None = None
        self._closed = False

    # --- ClientTransport --------------------------------------------------------------------------

    def start(self, session: Session, listener: Listener) -> None:
        self._client = FramedClient(session, listener, self.url)
        try:
            self._sock = self._connect(self._options.connect_timeout)  # the first failure is loud
        except BaseException:
            self._release()
            raise
        self._start_thread(self._run, "remote-executor-zmq-client")

    def close(self) -> None:
        self._stop_thread()
        if self._thread is None or not self._thread.is_alive():
            self._release()

    def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        self._ctx.term()
        self._waker.close()

    # --- connection ---------------------------------------------------------------------------------

    def _connect(self, timeout: float) -> zmq.Socket[Any]:
        assert self._client is not None
        sock = dealer(self._ctx, self.address, self._limits, self._curve)
        try:
            handshake(sock, self._client.hello(), self._options.key, self._limits, timeout, self.url,
                      self._stop)
        except BaseException:
            sock.close(linger=0)
            raise
        return sock

    def _reconnect(self, old: zmq.Socket[Any]) -> zmq.Socket[Any] | None:
        """A new session (new socket, new routing id); resubmit what was in flight. None: gave up."""
        assert self._client is not None
        old.close(linger=0)
        self._sock = None
        resubmit = self._client.connection_lost()
        with self._lock:
            self._outbox.clear()  # every accepted call is in `resubmit` (or was failed)
        timeout = self._options.reconnect_timeout
        try:
            sock = self._connect(timeout)
        except RemoteExecutorError as exc:
            if not self._stop.is_set():
                self._client.listener.on_broken(ServerUnavailableError(
                    f"lost the job server {self.url} and could not reconnect within {timeout:g}s: {exc}"))
            return None
        if resubmit:
            log.info("reconnected to %s; resubmitting %d call(s)", self.url, len(resubmit))
            frames = self._client.submit_frames(resubmit)
            with self._lock:
                self._outbox.extendleft(reversed(frames))
        return sock

    # --- the I/O thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and self._sock is not None:
                if not self._serve(self._sock):
                    self._sock = self._reconnect(self._sock)
        finally:
            self._release()

    def _serve(self, sock: zmq.Socket[Any]) -> bool:
        """Run one session until the server falls silent (False) or we are closing (True)."""
        assert self._client is not None
        key, limits = self._options.key, self._limits
        interval, timeout = self._options.heartbeat_interval, self._options.heartbeat_timeout
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._waker.reader, zmq.POLLIN)
        last_recv = last_send = time.monotonic()
        blocked = False  # the socket refused a frame (high-water mark): wait until it is writable
        while not self._stop.is_set():
            poller.modify(sock, zmq.POLLIN | (zmq.POLLOUT if blocked else 0))
            ready = dict(poller.poll(int(min(interval, timeout) * 500) + 1))
            if self._waker.reader.fileno() in ready:
                self._waker.drain()
            try:
                while True:
                    frame = recv_frame(sock, key, limits, zmq.NOBLOCK)
                    last_recv = time.monotonic()
                    self._client.handle(frame)
            except zmq.Again:
                pass
            except ProtocolError as exc:
                log.warning("bad frame from %s: %s; reconnecting", self.url, exc)
                return False
            now = time.monotonic()
            if now - last_recv > timeout:
                log.warning("no heartbeat from %s for %.1fs; reconnecting", self.url, now - last_recv)
                return False
            sent, blocked = self._flush(sock)
            if sent:
                last_send = now
            elif not blocked and now - last_send >= interval:
                blocked = not _try_send(sock, Frame(Kind.HEARTBEAT), key)
                last_send = now
        return True

    def _flush(self, sock: zmq.Socket[Any]) -> tuple[bool, bool]:
        """Send the outbox until empty or refused: (sent anything, refused)."""
        sent = False
        while True:
            with self._lock:
                if not self._outbox:
                    return sent, False
                frame = self._outbox.popleft()
            if not _try_send(sock, frame, self._options.key):
                with self._lock:
                    self._outbox.appendleft(frame)
                return sent, True
            sent = True


def _try_send(sock: zmq.Socket[Any], frame: Frame, key: bytes | None) -> bool:
    try:
        send_frame(sock, frame, key, flags=zmq.NOBLOCK)
    except zmq.Again:
        return False
    return True


# --- the worker loop -----------------------------------------------------------------------------------


def run_worker(settings: WorkerSettings, core: WorkerCore) -> int:
    """Serve a zmq job server until drained (0), refused (2) or unreachable (1); reconnect in between."""
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        address = split_hostports(settings.url)[0]
        curve = Curve.from_options({})
        while True:
            sock = dealer(ctx, address, Limits(), curve)
            try:
                outcome = _session(sock, settings, core)
            finally:
                sock.close(linger=0)
            if outcome is not None:
                return outcome
    finally:
        ctx.term()


def _session(sock: zmq.Socket[Any], settings: WorkerSettings, core: WorkerCore) -> int | None:
    """One session with the server: None to reconnect, else the exit code."""
    info: dict[str, object] = {"name": settings.name, "slots": 1}
    if settings.token is not None:
        info["token"] = settings.token.decode()
    timeout = max(settings.reconnect_timeout, settings.connect_timeout)
    try:
        handshake(sock, hello("worker", info), settings.key, Limits(), timeout, settings.url, settings.drain)
    except ServerUnavailableError as exc:
        if settings.drain.is_set():
            return 0
        log.error("cannot reach %s: %s", settings.url, exc)
        return 1
    except RemoteExecutorError as exc:
        log.error("%s refused this worker: %s", settings.url, exc)
        return 2
    link = _WorkerLink(sock, settings)
    beat = threading.Thread(target=link.beat_while_busy, name="remote-executor-heartbeat", daemon=True)
    beat.start()
    try:
        return _work(link, core)
    finally:
        link.stopped.set()
        beat.join()


class _WorkerLink:
    """The worker's socket, shared under a lock by the main thread and the heartbeat thread.

    The main thread owns it while idle (and heartbeats itself); while a call runs, the heartbeat thread
    sends HEARTBEAT (and DRAIN, on SIGTERM) so that a long call is not taken for a dead worker."""

    def __init__(self, sock: zmq.Socket[Any], settings: WorkerSettings) -> None:
        self.sock = sock
        self.settings = settings
        self.lock = threading.Lock()
        self.busy = False
        self.stopped = threading.Event()
        self.last_send = self.last_recv = time.monotonic()
        self.drain_sent = False
        self.limits = Limits()
        sock.setsockopt(zmq.RCVTIMEO, int(_POLL_SLICE * 1000))

    def send(self, frame: Frame) -> None:
        """Lock held."""
        send_frame(self.sock, frame, self.settings.key)
        self.last_send = time.monotonic()

    def keep_alive(self) -> None:
        """DRAIN once if SIGTERM asked for it, else a HEARTBEAT when one is due. Lock held."""
        if self.settings.drain.is_set() and not self.drain_sent:
            self.send(Frame(Kind.DRAIN))
            self.drain_sent = True
        elif time.monotonic() - self.last_send >= self.settings.heartbeat_interval:
            self.send(Frame(Kind.HEARTBEAT))

    def beat_while_busy(self) -> None:
        while not self.stopped.wait(min(self.settings.heartbeat_interval, _POLL_SLICE)):
            if self.busy:
                with self.lock:
                    if self.busy:
                        self.keep_alive()

    def next_frame(self) -> Frame | None:
        """The next frame from the server, or None after a quiet poll slice. Lock held."""
        try:
            frame = recv_frame(self.sock, self.settings.key, self.limits)  # blocks up to RCVTIMEO
        except zmq.Again:
            return None
        self.last_recv = time.monotonic()
        return frame


def _work(link: _WorkerLink, core: WorkerCore) -> int | None:
    settings = link.settings
    while True:
        with link.lock:
            try:
                frame = link.next_frame()
            except ProtocolError as exc:
                log.warning("bad frame from %s: %s; reconnecting", settings.url, exc)
                return None
            if frame is None:
                silent = time.monotonic() - link.last_recv
                if silent > settings.heartbeat_timeout:
                    log.warning("no heartbeat from %s for %.1fs; reconnecting", settings.url, silent)
                    return None
                link.keep_alive()
                continue
        if frame.kind == Kind.TASK:
            link.busy = True
            parts = core.run(frame.b, frame.parts)
            with link.lock:
                link.busy = False
                link.send(Frame(Kind.RESULT, a=frame.a, parts=parts))
        elif frame.kind == Kind.INIT:
            link.busy = True
            failure = core.initialize(frame.a, frame.parts)
            with link.lock:
                link.busy = False
                if failure is not None:
                    link.send(Frame(Kind.INIT_FAILED, a=frame.a, parts=failure))
        elif frame.kind == Kind.DRAIN:
            log.info("drained; exiting")
            return 0
        elif frame.kind == Kind.REJECT:
            log.error("%s closed this worker: %s", settings.url, rejection(frame))
            return 2


# --- admin ---------------------------------------------------------------------------------------------


def status(url: str, key: bytes | None, timeout: float = 5.0) -> dict[str, object]:
    """The job server's view (workers, clients, queues), for ``remote-executor status|ping``."""
    ctx: zmq.Context[Any] = zmq.Context()
    sock = dealer(ctx, split_hostports(url)[0], Limits(), Curve.from_options({}))
    try:
        handshake(sock, hello("admin", {"name": "admin"}), key, Limits(), timeout, url)
        send_frame(sock, Frame(Kind.STATUS), key)
        deadline = time.monotonic() + timeout
        while sock.poll(max(int((deadline - time.monotonic()) * 1000), 0) + 1, zmq.POLLIN):
            frame = recv_frame(sock, key, Limits())
            if frame.kind == Kind.STATUS:
                return parse_json(frame)
        raise ServerUnavailableError(f"{url} did not answer STATUS within {timeout:g}s")
    finally:
        sock.close(linger=0)
        ctx.term()
