"""ZeroMQ plumbing of the zmq backend: frames as multipart messages, DEALER sockets, CURVE, the channel.

ZeroMQ carries the same frames as the tcp backend (:mod:`remote_executor.wire.frames`): each frame is one
multipart message ``[prefix, *parts]``, so pickle protocol 5 buffers travel as their own message parts and
large ones are sent and received without a copy.

ZeroMQ reconnects TCP by itself and hides disconnects, so liveness is decided by heartbeats in both
directions. Every logical connection (a client session, a worker session) is a new DEALER socket with a
random routing id: after a server restart or a heartbeat timeout the peer says HELLO again as a new peer,
and frames of an old session reaching a server that does not know it are ignored.

Optional CURVE encryption: the server loads its secret certificate, clients and workers the server's
public certificate and, to pass a server's allow-list, a secret certificate of their own (files made with
:func:`zmq.auth.create_certificates`). A server that refuses this side's key answers the CURVE handshake
with a ZAP error, which libzmq reports only on a socket monitor: the channel watches for it, so a refused
key is a clear error at once rather than a silent server.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.auth
import zmq.utils.z85

from ...errors import ConnectionFailedError, HandshakeClosedError, ProtocolError, TransportError
from ...jobserver.client import POLL_SLICE, Channel
from ...netio import Waker
from ...wire.frames import Frame, Limits, Prefix, decode_parts, encode, parse_prefix, pre_session
from ...wire.serialization import Buffer
from ...wire.session import Mac, as_mac

# Parts at least this big are sent and received without a copy (pyzmq's own default threshold).
COPY_THRESHOLD = 64 * 1024
# High-water marks, in messages (one frame = one message) per peer and direction. The executor's
# in-flight window bounds what is on the wire long before these are reached; they are the backstop.
HWM = 1000
CURVE_SERVER_KEY_ENV = "REMOTE_EXECUTOR_CURVE_SERVER_KEY"  # worker side: the server's public key file
# Flags as plain ints: a pyzmq flag's ``|`` is two Python-level calls, paid per part of every frame (as is
# reading ``sock.rcvmore``: parts are received as zmq.Frame objects, whose ``more`` costs none).
_SNDMORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_SRCFD = int(zmq.SRCFD)  # the descriptor of the connection a message came by


def endpoint(host: str, port: int | str) -> str:
    """The libzmq endpoint for a host and port (IPv6 addresses in brackets)."""
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def send_frame(sock: zmq.Socket[Any], buffers: Sequence[Buffer], route: bytes | None = None,
               flags: int = 0) -> None:
    """Send one encoded frame (:func:`~remote_executor.wire.frames.encode`) as one multipart message, large
    parts uncopied. Frames are encoded once, when queued: a session's MAC numbers them in sending order.

    With ``zmq.NOBLOCK`` in ``flags``, ``zmq.Again`` means nothing was sent (libzmq queues a multipart
    message atomically once its first part is accepted)."""
    flags = int(flags)
    if route is not None:
        sock.send(route, flags | _SNDMORE)
    last = len(buffers) - 1
    for i, buf in enumerate(buffers):
        more = _SNDMORE if i < last else 0
        if i == 0 or memoryview(buf).nbytes < COPY_THRESHOLD:
            sock.send(buf, flags | more)
        else:
            sock.send(buf, flags | more, copy=False)


def recv_frame(sock: zmq.Socket[Any], key: Mac | None, limits: Limits, flags: int = 0,
               source: list[int] | None = None) -> Frame:
    """Receive and validate one frame (the routing id, on a ROUTER, must have been read already); the
    descriptor of the connection it came by is appended to ``source``, if given.

    The whole message is always consumed, so a malformed one (``ProtocolError``) leaves the socket at the
    start of the next message."""
    head = sock.recv(flags, copy=False)
    if source is not None:
        source.append(head.get(_SRCFD))
    prefix = head.bytes
    try:
        parsed = parse_prefix(prefix, key is not None, limits)
    except ProtocolError:
        parsed = None  # still consume the whole message; decode_parts says what is wrong with it
    # decode_parts takes the prefix parsed here, once: it checks the rest (the parts against it, the HMAC)
    return decode_parts(prefix, _recv_parts(sock, parsed, limits, head.more), key, limits, parsed=parsed)


def recv_rest(sock: zmq.Socket[Any], prefix: bytes, limits: Limits, keyed: bool = False) -> list[Buffer]:
    """The remaining parts of a message; the ones the prefix announces as large are not copied."""
    try:
        parsed = parse_prefix(prefix, keyed, limits)
    except ProtocolError:
        parsed = None  # still consume the whole message; decode_parts says what is wrong with it
    return _recv_parts(sock, parsed, limits, bool(sock.rcvmore))


def _recv_parts(sock: zmq.Socket[Any], parsed: Prefix | None, limits: Limits, more: bool) -> list[Buffer]:
    """The rest of a message (``more``: there is some), as :func:`recv_rest` describes it.

    A message that breaks the limits is consumed whole (zmq delivers messages whole: its parts are
    queued already) but nothing of it is copied, then refused."""
    sizes = parsed.lengths if parsed is not None else ()
    parts: list[Buffer] = []
    while more:
        part = sock.recv(copy=False)
        more = part.more
        index = len(parts)
        if index >= limits.max_parts or len(part) > limits.max_frame:  # (a keyless peer has the small limits)
            drained = _drain(sock) if more else 0
            if index >= limits.max_parts:
                raise ProtocolError(f"message of {index + 2 + drained} parts, more than {limits.max_parts}")
            raise ProtocolError(f"message part of {len(part)} bytes, more than the {limits.max_frame} allowed")
        if index < len(sizes) and sizes[index] >= COPY_THRESHOLD:
            parts.append(part.buffer)
        else:
            parts.append(part.bytes)
    return parts


def _drain(sock: zmq.Socket[Any]) -> int:
    """Consume the rest of a message, uncopied, as fast as Python can: a peer without the key can send one
    of millions of empty parts (two bytes each on the wire), which holds up this socket until it is gone.
    Returns how many parts there were."""
    recv = sock.recv
    count = 1
    while recv(copy=False).more:
        count += 1
    return count


@dataclass(frozen=True, slots=True)
class Curve:
    """CURVE settings of a client or worker: the server's public key and this side's key pair (z85 text,
    as in certificate files and logs).

    ``own_key_file`` is None for an ephemeral key pair (made here, known to no allow-list)."""

    server_public: bytes
    public: bytes
    secret: bytes
    own_key_file: str | None = None

    @classmethod
    def from_files(cls, server_key_file: str | os.PathLike[str],
                   own_key_file: str | os.PathLike[str] | None = None) -> Curve:
        server_public = server_public_key(server_key_file)
        if own_key_file is None:
            public, secret = zmq.curve_keypair()  # ephemeral: a server with an allow-list refuses it
            return cls(server_public, public, secret)
        public, own_secret = load_certificate(own_key_file, "the CURVE client key")
        if own_secret is None:
            raise TransportError(f"the CURVE client key {os.fspath(own_key_file)} holds no secret key "
                                 f"(give the .key_secret file; its .key half goes on the server's allow-list)")
        return cls(server_public, public, own_secret, os.fspath(own_key_file))

    @classmethod
    def from_options(cls, extra: Mapping[str, Any]) -> Curve | None:
        """From ``curve_server_key`` (and optionally ``curve_client_key``) in the options, the server key
        falling back to ``$REMOTE_EXECUTOR_CURVE_SERVER_KEY``; None without a server key."""
        server_key = extra.get("curve_server_key") or os.environ.get(CURVE_SERVER_KEY_ENV)
        own_key = extra.get("curve_client_key")
        if not server_key:
            if own_key:  # a client key alone would silently mean "no CURVE": say so instead
                raise TransportError(f"curve_client_key needs the server's public key too (curve_server_key, "
                                     f"--curve-server-key or ${CURVE_SERVER_KEY_ENV})")
            return None
        return cls.from_files(server_key, own_key or None)

    def describe(self) -> str:
        """This side's key, as a server's log and allow-list name it."""
        own = f"from {self.own_key_file}" if self.own_key_file else "ephemeral: no curve_client_key given"
        return f"{self.public.decode()} ({own})"  # zmq.auth keys are z85 text already

    def apply(self, sock: zmq.Socket[Any]) -> None:
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


INLINE_KEY_PREFIX = "z85:"
"""A server key given as ``z85:<40 characters>`` is the public key itself, not a certificate file."""


def server_public_key(value: str | os.PathLike[str]) -> bytes:
    """The server's public key from a certificate file, or inline as ``z85:KEY`` (a public key may sit on a
    command line; a secret one never does)."""
    text = os.fspath(value)
    if text.startswith(INLINE_KEY_PREFIX):
        key = text[len(INLINE_KEY_PREFIX):].encode()
        try:
            if len(key) != 40 or len(zmq.utils.z85.decode(key)) != 32:
                raise ValueError("not 40 characters")
        except (ValueError, KeyError, IndexError, TypeError) as exc:  # z85.decode's errors on bad text
            raise TransportError(f"the CURVE server key {text!r} is not a z85 public key (40 characters): "
                                 f"{exc}") from exc
        return key
    public, _ = load_certificate(text, "the CURVE server key")
    return public


def load_certificate(path: str | os.PathLike[str], what: str) -> tuple[bytes, bytes | None]:
    """``(public, secret or None)`` from a certificate file; a clear error naming ``what`` otherwise."""
    try:
        return zmq.auth.load_certificate(os.fspath(path))
    except (OSError, ValueError) as exc:
        raise TransportError(f"cannot read {what} {os.fspath(path)}: {exc}") from exc


def dealer(ctx: zmq.Context[Any], address: tuple[str, int], limits: Limits, curve: Curve | None) -> zmq.Socket[Any]:
    """A DEALER with a fresh random routing id, configured but not connected yet."""
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
    return sock


def refusal(monitor: zmq.Socket[Any]) -> int | None:
    """The ZAP status code (400: key not allowed) of a refused CURVE handshake reported on ``monitor``
    since the last look, or None."""
    while True:
        try:
            event = monitor.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return None
        if len(event) == 2 and len(event[0]) == 6:
            kind, value = struct.unpack("=Hi", event[0])
            if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return int(value)


class ZmqChannel(Channel):
    """A client's or worker's session with a zmq job server: one DEALER socket with a fresh routing id.

    Frames refused at the high-water mark wait in a backlog until the socket is writable again. With
    CURVE, ``monitor`` reports a handshake the server refused (this side's key is not on its allow-list).
    """

    def __init__(self, sock: zmq.Socket[Any], key: bytes | None, limits: Limits, url: str,
                 curve: Curve | None = None, monitor: zmq.Socket[Any] | None = None) -> None:
        super().__init__(url)
        self._sock = sock
        self._curve = curve
        self._monitor = monitor
        self._send_mac = as_mac(key)
        self._recv_mac = as_mac(key)
        self._full_limits = limits  # once the server has proved it holds the key (see authenticate)
        self._limits = pre_session(limits) if key is not None else limits  # (without a key: nothing to prove)
        self._backlog: deque[list[Buffer]] = deque()  # encoded frames
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        if monitor is not None:
            self._poller.register(monitor, zmq.POLLIN)
        self._events = zmq.POLLIN
        self._waker: Waker | None = None
        self._closed = False
        self._receive_timeout = False  # ZMQ_RCVTIMEO is set to POLL_SLICE (see next_frame)

    @classmethod
    def connect(cls, address: tuple[str, int], key: bytes | None, limits: Limits, curve: Curve | None,
                url: str) -> ZmqChannel:
        """A new session; ZeroMQ connects (and retries the TCP connection) in the background."""
        sock: zmq.Socket[Any] | None = None
        monitor: zmq.Socket[Any] | None = None
        try:
            sock = dealer(zmq.Context.instance(), address, limits, curve)
            if curve is not None:  # before connect(), so no handshake goes unwatched
                monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
                monitor.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint(*address))
        except zmq.ZMQError as exc:
            for opened in (monitor, sock):
                if opened is not None:
                    opened.close(linger=0)
            raise ConnectionFailedError(f"cannot connect to {url}: {exc}") from exc
        return cls(sock, key, limits, url, curve, monitor)

    def queue(self, frame: Frame) -> None:
        self._backlog.append(encode(frame, self._send_mac))

    def authenticate(self, send: Mac | None, receive: Mac | None, *, proven: bool = False) -> None:
        self._send_mac, self._recv_mac = send, receive
        if proven:
            self._limits = self._full_limits

    def flush(self) -> bool:
        try:
            while self._backlog:
                send_frame(self._sock, self._backlog[0], flags=_NOBLOCK)
                self._backlog.popleft()
        except zmq.Again:
            # A refused handshake can end the connection before the first send: the DEALER then has
            # nowhere to queue a frame, and only the monitor says why.
            self._check_refused()
            return False
        except zmq.ZMQError as exc:
            raise ConnectionFailedError(f"lost the session with {self.peer}: {exc}") from exc
        return True

    def receive(self) -> list[Frame]:
        self._check_refused()
        frames: list[Frame] = []
        try:
            while True:
                frames.append(recv_frame(self._sock, self._recv_mac, self._limits, _NOBLOCK))
        except zmq.Again:
            return frames
        except zmq.ZMQError as exc:
            raise ConnectionFailedError(f"lost the session with {self.peer}: {exc}") from exc

    def next_frame(self, timeout: float) -> Frame | None:
        """A blocking receive with a receive timeout of :data:`POLL_SLICE` (a worker waiting for its next
        call): one libzmq call that waits itself, where a try, a poll and a second try cost three times the
        system calls. With CURVE the poll also watches the monitor, so that path stays."""
        if self.ready or timeout <= 0 or self._backlog or self._monitor is not None:
            return super().next_frame(timeout)
        try:
            if not self._receive_timeout:
                self._sock.setsockopt(zmq.RCVTIMEO, int(POLL_SLICE * 1000))
                self._receive_timeout = True
            deadline = time.monotonic() + timeout
            while True:
                try:
                    return recv_frame(self._sock, self._recv_mac, self._limits)
                except zmq.Again:
                    if time.monotonic() >= deadline:
                        return None
        except zmq.ZMQError as exc:
            raise ConnectionFailedError(f"lost the session with {self.peer}: {exc}") from exc

    def wait(self, timeout: float, waker: Waker | None = None) -> None:
        if waker is not self._waker and waker is not None:
            self._poller.register(waker.reader, zmq.POLLIN)
            self._waker = waker
        events = zmq.POLLIN | (zmq.POLLOUT if self._backlog else 0)
        if events != self._events:
            self._poller.modify(self._sock, events)
            self._events = events
        self._poller.poll(int(timeout * 1000) + 1)

    def _check_refused(self) -> None:
        if self._monitor is None or self._curve is None:
            return
        status = refusal(self._monitor)
        if status is not None:
            raise HandshakeClosedError(  # the reason is known: said as it is, not wrapped as a mystery
                f"the job server {self.peer} refused this side's CURVE key {self._curve.describe()} "
                f"(ZAP status {status}): its public key is not on the server's allow-list")

    def deliver_before_exit(self, timeout: float) -> None:
        # libzmq sends on its own I/O thread: only terminating the context waits for the queued messages
        # (for as long as the socket lingers). In a thread, in case another socket keeps the context open.
        self._closed = True
        if self._monitor is not None:
            self._monitor.close(linger=0)
        self._sock.close(linger=int(timeout * 1000))
        ending = threading.Thread(target=self._sock.context.term, name="zmq-term", daemon=True)
        ending.start()
        ending.join(timeout)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._monitor is not None:
                self._monitor.close(linger=0)
            self._sock.close(linger=0)
