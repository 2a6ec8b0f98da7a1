"""Frames over stream sockets: a non-blocking connection for event loops, blocking helpers for workers.

Both sides read with ``recv_into`` into the :class:`~remote_executor.protocol.FrameReader`'s buffers and
write with ``sendmsg`` straight from the parts, so large payloads cross the socket without extra copies.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from ..protocol import DEFAULT_LIMITS, Frame, FrameReader, Limits, encode

IOV_MAX = 512  # conservative: Linux allows 1024 iovecs per sendmsg


def tune(sock: socket.socket) -> None:
    """Low latency for small frames, and dead peers noticed by the kernel too."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


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


def send_all(sock: socket.socket, buffers: list[memoryview]) -> None:
    """``sendall`` for a list of buffers, without joining them."""
    pending = deque(buffers)
    while pending:
        sent = sock.sendmsg([pending[i] for i in range(min(len(pending), IOV_MAX))])
        while sent:
            head = pending[0]
            if sent >= len(head):
                sent -= len(head)
                pending.popleft()
            else:
                pending[0] = head[sent:]
                sent = 0


def connect(address: tuple[str, int], timeout: float) -> socket.socket:
    """A tuned TCP connection, or the ``OSError`` that prevented it."""
    sock = socket.create_connection(address, timeout=timeout)
    tune(sock)
    return sock


T = TypeVar("T")


def retry_with_backoff(
    attempt: Callable[[], T],
    give_up_after: float,
    stop: threading.Event,
    on_failure: Callable[[OSError, float], None] = lambda exc, delay: None,
) -> T | None:
    """Call ``attempt`` until it succeeds, with exponential backoff (0.05 s doubling to 2 s) and jitter-free
    waits on ``stop``; ``None`` if ``stop`` is set or ``give_up_after`` seconds pass."""
    deadline = time.monotonic() + give_up_after
    delay = 0.05
    while not stop.is_set():
        try:
            return attempt()
        except OSError as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise
            on_failure(exc, delay)
            stop.wait(min(delay, remaining))
            delay = min(delay * 2, 2.0)
    return None


class Waker:
    """Wakes a select/poll loop from other threads: a socketpair whose read end the loop watches.

    Only the first ``wake()`` after a ``drain()`` writes a byte, so a burst of wake-ups costs one syscall.
    """

    def __init__(self) -> None:
        self.reader, self._writer = socket.socketpair()
        self.reader.setblocking(False)
        self._writer.setblocking(False)
        self._lock = threading.Lock()
        self._armed = False

    def wake(self) -> None:
        with self._lock:
            if self._armed:
                return
            self._armed = True
        with contextlib.suppress(OSError):  # closed, or full: the loop is awake (or gone) anyway
            self._writer.send(b"x")

    def drain(self) -> None:
        with self._lock:
            self._armed = False
            try:
                while self.reader.recv(4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass

    def close(self) -> None:
        self.reader.close()
        self._writer.close()
