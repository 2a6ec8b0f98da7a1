"""The zmq job server's connections that have not proved the key yet, capped and timed out like tcp's.

libzmq accepts every TCP connection and keeps whatever a peer sends in it until a message is complete,
without limit: a message whose last part never comes, or a connection that never sends one, is invisible
to our code and would hold its memory (and a descriptor) for as long as the peer likes. So every accepted
connection is watched from its ``ZMQ_EVENT_ACCEPTED`` (socket monitor) until a frame that came through it
verifies under its session's keys (the message's ``ZMQ_SRCFD`` names the connection); one that does not
within the deadline, or that the cap (:mod:`~remote_executor.jobserver.handshakes`) has no place for, is
shut down under libzmq, which then drops the connection and everything it buffered for it.

The deadline bounds how long; what such a connection may send meanwhile is bounded too: once the kernel
has received more than :data:`MAX_UNPROVEN_BYTES` on it (``TCP_INFO``, looked at every
:data:`CHECK_EVERY` seconds while any connection is watched), it is shut down. No peer of ours sends more
than a greeting, an OPEN and a HELLO (at most 4 parts of 64 KiB) before it has proved the key.

Each watched connection is held through a duplicate of its descriptor, so the shutdown reaches that
connection even if libzmq has closed its own descriptor and reused the number for another.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from typing import Any

import zmq

from ...jobserver.handshakes import Handshakes
from ...logsafe import limited, owner

log = logging.getLogger("remote_executor.jobserver.server")

_WATCHED = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
_ACCEPTED = int(zmq.EVENT_ACCEPTED)

Peer = tuple[str, int]

MAX_UNPROVEN_BYTES = 1 << 20
CHECK_EVERY = 0.05  # seconds between two looks at what the watched connections have received
_TCPI_BYTES_RECEIVED = 128  # offset of tcpi_bytes_received (u64) in Linux's struct tcp_info (4.1+)


class Unproven:
    """Watches ``router``'s accepted connections through a socket monitor (poll :attr:`monitor`)."""

    def __init__(self, router: zmq.Socket[Any], limit: int, timeout: float) -> None:
        self.waiting: Handshakes[int] = Handshakes(limit, timeout)  # by descriptor
        # Descriptor -> peer, of the connections watched. Non-empty: some connection has yet to prove itself,
        # so the server asks each message which connection it came by (only then: it costs a call).
        self.peers: dict[int, Peer] = {}
        self._socks: dict[int, socket.socket] = {}  # a duplicate of each watched descriptor
        self.monitor: zmq.Socket[Any] = router.get_monitor_socket(_WATCHED)
        self._router = router

    def on_events(self, now: float) -> None:
        """Take the monitor's events (call when :attr:`monitor` is readable)."""
        while True:
            try:
                event = self.monitor.recv_multipart(zmq.NOBLOCK)[0]  # (then the endpoint)
            except zmq.Again:
                return
            if len(event) < 6:
                continue
            kind = int.from_bytes(event[:2], "little")
            fd = int.from_bytes(event[2:6], "little")
            if kind == _ACCEPTED:
                self._accepted(fd, now)
            else:  # DISCONNECTED
                self._forget(fd)

    def proved(self, fd: int) -> None:
        """A frame that came through connection ``fd`` verified: its peer holds the key."""
        self._forget(fd)

    def sweep(self, now: float) -> float | None:
        """Shut down the connections past their deadline or their byte allowance; when to look again."""
        while (fd := self.waiting.overdue(now)) is not None:
            limited(log, logging.WARNING, (owner(self), "deadline"), "closing zmq connection from %s: no "
                    "verified frame within %gs", _show(self.peers.get(fd)), self.waiting.timeout)
            self._shut(fd)
        for fd, sock in list(self._socks.items()):
            received = _bytes_received(sock)
            if received > MAX_UNPROVEN_BYTES:
                limited(log, logging.WARNING, (owner(self), "bytes"), "closing zmq connection from %s: %d bytes "
                        "received and no verified frame", _show(self.peers.get(fd)), received)
                self._shut(fd)
        deadline = self.waiting.next_deadline()
        return None if deadline is None else min(deadline, now + CHECK_EVERY)

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._router.disable_monitor()
        self.monitor.close(linger=0)
        for fd in list(self._socks):
            self._forget(fd)

    def _accepted(self, fd: int, now: float) -> None:
        self._forget(fd)  # (a reused descriptor whose DISCONNECTED is still to come)
        sock = _duplicate(fd)
        if sock is None:  # gone already (or out of descriptors: then it is not watched)
            return
        try:
            address = sock.getpeername()
        except OSError:
            sock.close()
            return
        peer = (str(address[0]), int(address[1]))
        if self.waiting.full():
            victim = self.waiting.victim(peer[0], now)
            if victim is None:
                limited(log, logging.WARNING, (owner(self), "refuse"), "closing the zmq connection from %s at "
                        "once: %d connections have not proved the key, none waiting for long", _show(peer),
                        len(self.waiting))
                _shut(sock)
                sock.close()
                return
            limited(log, logging.WARNING, (owner(self), "evict"), "too many zmq connections that have not "
                    "proved the key (%d): closing the one from %s that has waited longest", len(self.waiting),
                    _show(self.peers.get(victim)))
            self._shut(victim)
        self.waiting.add(fd, peer[0], now)
        self.peers[fd] = peer
        self._socks[fd] = sock

    def _shut(self, fd: int) -> None:
        sock = self._socks.get(fd)
        if sock is not None:
            _shut(sock)
        self._forget(fd)

    def _forget(self, fd: int) -> None:
        if self.peers.pop(fd, None) is not None:
            self.waiting.remove(fd)
        sock = self._socks.pop(fd, None)
        if sock is not None:
            sock.close()


def _duplicate(fd: int) -> socket.socket | None:
    """A socket object of our own for libzmq's connection ``fd`` (None if it is gone)."""
    try:
        dup = os.dup(fd)
    except OSError:
        return None
    try:
        return socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return None


def _shut(sock: socket.socket) -> None:
    """Shut the connection down: libzmq reads its end and drops it, with whatever it holds of it."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _bytes_received(sock: socket.socket) -> int:
    """What the kernel has received on ``sock`` (0 where ``TCP_INFO`` does not say)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_BYTES_RECEIVED + 8)
    except OSError:
        return 0
    if len(info) < _TCPI_BYTES_RECEIVED + 8:
        return 0
    received: int = struct.unpack_from("=Q", info, _TCPI_BYTES_RECEIVED)[0]
    return received


def _show(peer: Peer | None) -> str:
    return "an unknown peer" if peer is None else f"{peer[0]}:{peer[1]}"
