"""Socket and timing helpers shared by every layer above the wire format: connect-and-tune, sending a
list of buffers, waking a select loop, and retrying with backoff."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

IOV_MAX = 512  # conservative: Linux allows 1024 iovecs per sendmsg


def tune(sock: socket.socket) -> None:
    """Low latency for small frames, and dead peers noticed by the kernel too."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


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
