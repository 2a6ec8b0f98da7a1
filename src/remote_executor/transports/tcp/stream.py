"""Frames over stream sockets: a non-blocking connection for the server loop, and the client/worker channel.

Both sides read with ``recv_into`` into the :class:`~remote_executor.wire.frames.FrameReader`'s buffers and
write with ``sendmsg`` straight from the parts, so large payloads cross the socket without extra copies.
The same over TLS is in :mod:`.tlsstream`, which only a TLS client, worker or server imports.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
from collections import deque

from ...errors import ConnectionFailedError, ProtocolError
from ...jobserver.client import Channel
from ...netio import IOV_MAX, Waker, connect
from ...wire.frames import Frame, FrameReader, Limits, encode
from ...wire.session import Mac, as_mac


class Connection:
    """A non-blocking socket with a frame reader and an output queue, driven by a selector loop."""

    # A TLS connection's read may need the socket to be writable first (then the loop calls read() again
    # once it is); a plain socket's never does.
    read_needs_write = False

    def __init__(
        self, sock: socket.socket, key: bytes | None, limits: Limits, peer: str) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.peer = peer
        self.send_mac = as_mac(key)  # replaced by the session's after the handshake
        self.reader = FrameReader(key, limits)
        self._out: deque[memoryview] = deque()
        self.closed = False
        self.write_registered = False
        self.opened = False  # the server has answered this peer's OPEN: the session keys are in use

    def fileno(self) -> int:
        return self.sock.fileno()

    def queue(self, frame: Frame) -> None:
        """Queue a frame; :meth:`flush` sends it."""
        self._out.extend(memoryview(b).cast("B") for b in encode(frame, self.send_mac) if len(b))

    @property
    def mid_frame(self) -> bool:
        return self.reader.mid_frame

    @property
    def wants_write(self) -> bool:
        return bool(self._out)

    def read(self) -> list[Frame] | None:
        """Frames now complete; ``None`` at end of stream. Raises ProtocolError on bad input."""
        try:
            n = self.sock.recv_into(self.reader.buffer())
        except (BlockingIOError, InterruptedError):
            return []
        except ConnectionError:
            return None
        if n == 0:
            return None
        return self.reader.feed(n)

    def flush(self) -> bool:
        """Send as much as the socket takes; True when everything queued is sent."""
        while self._out:
            batch = [self._out[i] for i in range(min(len(self._out), IOV_MAX))]
            try:
                sent = self.sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError):
                return False
            self._advance(sent)
        return True

    def _advance(self, sent: int) -> None:
        while sent:
            head = self._out[0]
            if sent >= len(head):
                sent -= len(head)
                self._out.popleft()
            else:
                self._out[0] = head[sent:]
                sent = 0

    def read_plaintext(self) -> list[Frame]:
        """What a plaintext peer of a TLS connection has sent so far, read as plaintext frames, without
        waiting (a plaintext connection never needs this)."""
        return []

    def refuse_plaintext(self, frame: Frame) -> None:
        """A TLS connection's answer to a plaintext peer (a plaintext connection never needs one)."""

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


class NotTlsError(ProtocolError):
    """A peer spoke something other than TLS to a TLS server; ``ours``: it looks like our plaintext protocol."""

    def __init__(self, message: str, ours: bool) -> None:
        super().__init__(message)
        self.ours = ours


class TcpChannel(Channel):
    """A client's or worker's connection to a tcp job server: a :class:`Connection` plus a selector."""

    connection_class: type[Connection] = Connection

    def __init__(self, sock: socket.socket, key: bytes | None, limits: Limits, url: str) -> None:
        super().__init__(url)
        self._conn = self.connection_class(sock, key, limits, url)
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ, None)
        self._writing = False
        self._waker: Waker | None = None

    @classmethod
    def connect(cls, address: tuple[str, int], key: bytes | None, limits: Limits, url: str,
                timeout: float) -> TcpChannel:
        return cls(connect(address, timeout, url), key, limits, url)

    def queue(self, frame: Frame) -> None:
        self._conn.queue(frame)

    def authenticate(self, send: Mac | None, receive: Mac | None) -> None:
        self._conn.send_mac, self._conn.reader.mac = send, receive

    def flush(self) -> bool:
        try:
            return self._conn.flush()
        except OSError as exc:
            raise ConnectionFailedError(f"lost the connection to {self.peer}: {exc}") from exc

    def receive(self) -> list[Frame]:
        try:
            frames = self._conn.read()
        except OSError as exc:
            raise ConnectionFailedError(f"lost the connection to {self.peer}: {exc}") from exc
        if frames is None:
            truncated = " in the middle of a frame" if self._conn.mid_frame else ""
            raise ConnectionFailedError(f"{self.peer} closed the connection{truncated}")
        return frames

    def wait(self, timeout: float, waker: Waker | None = None) -> None:
        if waker is not self._waker and waker is not None:
            self._selector.register(waker.reader, selectors.EVENT_READ, waker)
            self._waker = waker
        writing = self._conn.wants_write
        if writing != self._writing:  # (un)register interest in writability only on change
            self._writing = writing
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
            self._selector.modify(self._conn.sock, events, None)
        self._selector.select(timeout)

    def close(self) -> None:
        if not self._conn.closed:
            self._selector.close()
            with contextlib.suppress(OSError):
                self._conn.sock.shutdown(socket.SHUT_RDWR)
            self._conn.close()
