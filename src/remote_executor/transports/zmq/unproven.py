"""The zmq job server's connections that have not proved the key yet, capped and timed out like tcp's.

libzmq accepts every TCP connection and keeps whatever a peer sends in it until a message is complete,
without limit: a message whose last part never comes, or a connection that never sends one, is invisible
to our code and would hold its memory (and a descriptor) for as long as the peer likes. So every accepted
connection is watched from its ``ZMQ_EVENT_ACCEPTED`` (socket monitor) until a frame that came through it
verifies under its session's keys (the message's ``ZMQ_SRCFD`` names the connection); one that does not
within the deadline, or that the cap (:mod:`~remote_executor.jobserver.handshakes`) has no place for, is
shut down under libzmq, which then drops the connection and everything it buffered for it.

The deadline bounds how long; what these connections may hold meanwhile is bounded too, from the kernel's
count of the bytes each has received (Linux's ``TCP_INFO``, looked at every :data:`CHECK_EVERY` seconds):
one that has received more than the largest frame a peer may send (plus :data:`HANDSHAKE_BYTES`) is shut
down, and once they have received more than :data:`BUDGET` together, the one that received the most goes
first. A new peer sends only a greeting, an OPEN and a HELLO before it proves the key; but a session whose
TCP connection libzmq re-established (the routing id is handed over) may start the new one with a frame of
any allowed size, which only the budget may cut short, while the server is flooded.

Each watched connection is held through a duplicate of its descriptor, so the shutdown reaches that
connection even if libzmq has closed its own descriptor and reused the number for another. Where no
duplicate can be had (the process is out of descriptors), the new connection is shut down at once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import sys
from typing import Any

import zmq

from ...jobserver.handshakes import Handshakes
from ...logsafe import limited, owner

log = logging.getLogger("remote_executor.jobserver.server")

_WATCHED = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
_ACCEPTED = int(zmq.EVENT_ACCEPTED)

Peer = tuple[str, int]

HANDSHAKE_BYTES = 1 << 20  # beyond a frame: greeting, CURVE handshake, OPEN, HELLO
BUDGET = 256 << 20  # what all unproven connections together may have received
CHECK_EVERY = 0.05  # seconds between two looks at what the watched connections have received
# tcpi_bytes_received (u64) in Linux's struct tcp_info (4.1+); elsewhere the bytes are not counted.
_TCP_INFO = getattr(socket, "TCP_INFO", None) if sys.platform.startswith("linux") else None
_TCPI_BYTES_RECEIVED = 128


class Unproven:
    """Watches ``router``'s accepted connections through a socket monitor (poll :attr:`monitor`); made
    before the router listens, so that none escapes."""

    def __init__(self, router: zmq.Socket[Any], limit: int, timeout: float, max_frame: int) -> None:
        self.waiting: Handshakes[int] = Handshakes(limit, timeout)  # by descriptor
        # Descriptor -> peer, of the connections watched. Non-empty: some connection has yet to prove itself,
        # so the server asks each message which connection it came by (only then: it costs a call).
        self.peers: dict[int, Peer] = {}
        self._socks: dict[int, socket.socket] = {}  # a duplicate of each watched descriptor
        self._allowance = max_frame + HANDSHAKE_BYTES
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

    def sweep(self, now: float) -> float:
        """Shut down the connections past their deadline, their allowance or the budget; when to look again."""
        while (fd := self.waiting.overdue(now)) is not None:
            limited(log, logging.WARNING, (owner(self), "deadline"), "closing zmq connection from %s: no "
                    "verified frame within %gs", _show(self.peers.get(fd)), self.waiting.timeout)
            self._shut(fd)
        received = {fd: _bytes_received(sock) for fd, sock in self._socks.items()}
        total = sum(received.values())
        for fd, count in sorted(received.items(), key=lambda item: -item[1]):
            if count <= self._allowance and total <= BUDGET:
                break
            limited(log, logging.WARNING, (owner(self), "bytes"), "closing zmq connection from %s: %d bytes "
                    "received and no verified frame (%d by all such connections)", _show(self.peers.get(fd)),
                    count, total)
            self._shut(fd)
            total -= count
        deadline = self.waiting.next_deadline()
        return now + CHECK_EVERY if deadline is None else min(deadline, now + CHECK_EVERY)

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._router.disable_monitor()
        self.monitor.close(linger=0)
        for fd in list(self._socks):
            self._forget(fd)

    def _accepted(self, fd: int, now: float) -> None:
        self._forget(fd)  # (a reused descriptor whose DISCONNECTED is still to come)
        try:
            sock = _duplicate(fd)
        except OSError:  # out of descriptors: a connection that cannot be watched is not kept
            limited(log, logging.WARNING, (owner(self), "no fd"), "closing a zmq connection at once: no "
                    "descriptor left to watch it with")
            _shut_raw(fd)
            return
        if sock is None:  # closed already (a peer that connected and left at once): nothing to watch
            return
        try:
            address = sock.getpeername()
        except OSError:  # gone already
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
    """A socket object of our own for libzmq's connection ``fd``, None if it is gone already; OSError
    (EMFILE, ENFILE) when no descriptor is left."""
    try:
        dup = os.dup(fd)
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise
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


def _shut_raw(fd: int) -> None:
    """Shut down libzmq's connection ``fd`` itself, leaving the descriptor to libzmq (which closes it)."""
    with contextlib.suppress(OSError):
        sock = socket.socket(fileno=fd)  # (takes no descriptor of its own)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.detach()


def _bytes_received(sock: socket.socket) -> int:
    """What the kernel has received on ``sock`` (0 where ``TCP_INFO`` does not say)."""
    if _TCP_INFO is None:
        return 0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCPI_BYTES_RECEIVED + 8)
    except OSError:
        return 0
    if len(info) < _TCPI_BYTES_RECEIVED + 8:
        return 0
    received: int = struct.unpack_from("=Q", info, _TCPI_BYTES_RECEIVED)[0]
    return received


def _show(peer: Peer | None) -> str:
    return "an unknown peer" if peer is None else f"{peer[0]}:{peer[1]}"
