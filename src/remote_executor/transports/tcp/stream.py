"""Frames over stream sockets: a non-blocking connection for event loops, blocking helpers for workers.

Both sides read with ``recv_into`` into the :class:`~remote_executor.wire.frames.FrameReader`'s buffers and
write with ``sendmsg`` straight from the parts, so large payloads cross the socket without extra copies.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import deque

from ...netio import IOV_MAX, send_all
from ...wire.frames import DEFAULT_LIMITS, Frame, FrameReader, Limits, encode


class Connection:
    """A non-blocking socket with a frame reader and an output queue, driven by a selector loop."""

    def __init__(
        self, sock: socket.socket, key: bytes | None, limits: Limits, peer: str, reader: FrameReader | None = None
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.peer = peer
        self._key = key
        self._reader = reader or FrameReader(key, limits)
        self._out: deque[memoryview] = deque()
        self.closed = False
        self.write_registered = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def queue(self, frame: Frame) -> None:
        """Queue a frame; :meth:`flush` sends it."""
        self._out.extend(memoryview(b).cast("B") for b in encode(frame, self._key) if len(b))

    @property
    def mid_frame(self) -> bool:
        return self._reader.mid_frame

    @property
    def wants_write(self) -> bool:
        return bool(self._out)

    def read(self) -> list[Frame] | None:
        """Frames now complete; ``None`` at end of stream. Raises ProtocolError on bad input."""
        try:
            n = self.sock.recv_into(self._reader.buffer())
        except (BlockingIOError, InterruptedError):
            return []
        except ConnectionError:
            return None
        if n == 0:
            return None
        return self._reader.feed(n)

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

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.sock.close()


class BlockingConnection:
    """A blocking socket for one thread that reads and any threads that write (under a lock)."""

    def __init__(self, sock: socket.socket, key: bytes | None, limits: Limits = DEFAULT_LIMITS) -> None:
        sock.setblocking(True)
        self.sock = sock
        self._key = key
        self.reader = FrameReader(key, limits)
        self.ready: deque[Frame] = deque()  # frames received but not yet returned by recv()
        self._send_lock = threading.Lock()
        self.last_send = time.monotonic()

    def send(self, frame: Frame) -> None:
        buffers = [memoryview(b).cast("B") for b in encode(frame, self._key) if len(b)]
        with self._send_lock:
            send_all(self.sock, buffers)
            self.last_send = time.monotonic()

    def recv(self, timeout: float | None) -> Frame:
        """The next frame; ``TimeoutError`` if none within ``timeout``; ``ConnectionError`` at EOF."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ready:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if remaining == 0.0:
                raise TimeoutError("no frame from the peer in time")
            self.sock.settimeout(remaining)
            try:
                n = self.sock.recv_into(self.reader.buffer())
            except TimeoutError as exc:
                raise TimeoutError("no frame from the peer in time") from exc
            if n == 0:
                raise ConnectionResetError("the peer closed the connection")
            self.ready.extend(self.reader.feed(n))
        return self.ready.popleft()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


