"""The zmq job server's connections that have not proved the key yet, capped and timed out like tcp's.

libzmq accepts every TCP connection and keeps whatever a peer sends in it until a message is complete,
without limit: a message whose last part never comes, or a connection that never sends one, is invisible
to our code and would hold its memory (and a descriptor) for as long as the peer likes. So every accepted
connection is watched from its ``ZMQ_EVENT_ACCEPTED`` (socket monitor) until a frame that came through it
verifies under its session's keys (the message's ``ZMQ_SRCFD`` names the connection); one that does not
within the deadline, or that the cap (:mod:`~remote_executor.jobserver.handshakes`) has no place for, is
shut down under libzmq, which then drops the connection and everything it buffered for it.

A descriptor can be closed by libzmq and reused for a new connection before its DISCONNECTED event is
read: a connection is only shut down if its peer's address and port are still the ones it was accepted
with.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Any

import zmq

from ...jobserver.handshakes import Handshakes
from ...logsafe import limited, owner

log = logging.getLogger("remote_executor.jobserver.server")

_WATCHED = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
_ACCEPTED = int(zmq.EVENT_ACCEPTED)

Peer = tuple[str, int]


class Unproven:
    """Watches ``router``'s accepted connections through a socket monitor (poll :attr:`monitor`)."""

    def __init__(self, router: zmq.Socket[Any], limit: int, timeout: float) -> None:
        self.waiting: Handshakes[int] = Handshakes(limit, timeout)  # by descriptor
        # Descriptor -> peer, of the connections watched. Non-empty: some connection has yet to prove itself,
        # so the server asks each message which connection it came by (only then: it costs a call).
        self.peers: dict[int, Peer] = {}
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
        """Shut down the connections past their deadline; when the next one's passes."""
        while (fd := self.waiting.overdue(now)) is not None:
            limited(log, logging.WARNING, (owner(self), "deadline"), "closing zmq connection from %s: no "
                    "verified frame within %gs", _show(self.peers.get(fd)), self.waiting.timeout)
            self._shut(fd)
        return self.waiting.next_deadline()

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._router.disable_monitor()
        self.monitor.close(linger=0)

    def _accepted(self, fd: int, now: float) -> None:
        peer = _peer_of(fd)
        if peer is None:  # gone already
            return
        if self.waiting.full():
            victim = self.waiting.victim(peer[0], now)
            if victim is None:
                limited(log, logging.WARNING, (owner(self), "refuse"), "closing the zmq connection from %s at "
                        "once: %d connections have not proved the key, none waiting for long", _show(peer),
                        len(self.waiting))
                _shut_if(fd, peer)
                return
            limited(log, logging.WARNING, (owner(self), "evict"), "too many zmq connections that have not "
                    "proved the key (%d): closing the one from %s that has waited longest", len(self.waiting),
                    _show(self.peers.get(victim)))
            self._shut(victim)
        self._forget(fd)  # (a reused descriptor whose DISCONNECTED is still to come)
        self.waiting.add(fd, peer[0], now)
        self.peers[fd] = peer

    def _shut(self, fd: int) -> None:
        peer = self.peers.get(fd)
        self._forget(fd)
        if peer is not None:
            _shut_if(fd, peer)

    def _forget(self, fd: int) -> None:
        if self.peers.pop(fd, None) is not None:
            self.waiting.remove(fd)


def _peer_of(fd: int) -> Peer | None:
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            address = sock.getpeername()
    except OSError:
        return None
    return (str(address[0]), int(address[1])) if isinstance(address, tuple) else None


def _shut_if(fd: int, peer: Peer) -> None:
    """Shut the connection ``fd`` down if it is still the one from ``peer``: libzmq reads its end and
    drops it, with whatever it holds of an unfinished message."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            address = sock.getpeername()
            if isinstance(address, tuple) and (str(address[0]), int(address[1])) == peer:
                sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # gone meanwhile


def _show(peer: Peer | None) -> str:
    return "an unknown peer" if peer is None else f"{peer[0]}:{peer[1]}"
