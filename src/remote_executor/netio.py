"""Socket and timing helpers shared by every layer above the wire format: connect-and-tune, sending a
list of buffers, waking a select loop, and retrying with backoff."""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from .errors import ConnectionFailedError

IOV_MAX = 512  # conservative: Linux allows 1024 iovecs per sendmsg


def tune(sock: socket.socket) -> None:
    """Low latency for small frames, and dead peers noticed by the kernel too."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def connect(address: tuple[str, int], timeout: float, url: str) -> socket.socket:
    """A tuned TCP connection; :class:`ConnectionFailedError` naming ``url`` if there is none."""
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except socket.gaierror as exc:
        raise ConnectionFailedError(f"cannot resolve the host of {url}: {exc.strerror or exc}") from exc
    except OSError as exc:
        raise ConnectionFailedError(f"cannot connect to {url}: {exc.strerror or exc}") from exc
    tune(sock)
    return sock


def receive_timeout(sock: socket.socket, seconds: float) -> bool:
    """Set the kernel's receive timeout (SO_RCVTIMEO) of a blocking ``sock``: a ``recv`` then waits for
    data itself, one system call where poll-then-recv costs two, and raises BlockingIOError when the
    timeout passes. False (``sock`` unchanged) where that is not available."""
    if not sys.platform.startswith("linux"):  # struct timeval's layout, and MSG_DONTWAIT: Linux here
        return False
    whole = int(seconds)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("@ll", whole, int((seconds - whole) * 1e6)))
    except (OSError, AttributeError):
        return False
    return True


class Backoff:
    """Exponential delays for retrying: 0.05 s doubling up to ``ceiling``, back to the start on success."""

    def __init__(self, first: float = 0.05, ceiling: float = 2.0) -> None:
        self.first = first
        self.ceiling = ceiling
        self.delay = first

    def next(self) -> float:
        """The delay to wait now; the one after it is doubled."""
        delay = self.delay
        self.delay = min(delay * 2, self.ceiling)
        return delay

    def reset(self) -> None:
        self.delay = self.first


T = TypeVar("T")


def retry_with_backoff(
    attempt: Callable[[], T],
    give_up_after: float,
    stop: threading.Event,
    on_failure: Callable[[Exception, float], None] = lambda exc, delay: None,
    transient: tuple[type[Exception], ...] = (ConnectionFailedError, OSError),
) -> T | None:
    """Call ``attempt`` until it succeeds, waiting on ``stop`` between tries with :class:`Backoff`.

    ``None`` if ``stop`` is set first; the last ``transient`` error once ``give_up_after`` seconds have
    passed; any other error at once."""
    deadline = time.monotonic() + give_up_after
    backoff = Backoff()
    while not stop.is_set():
        try:
            return attempt()
        except transient as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise
            delay = backoff.next()
            on_failure(exc, delay)
            stop.wait(min(delay, remaining))
    return None


class Waker:
    """Wakes a select/poll loop from other threads: a socketpair whose read end the loop watches.

    Only the first ``wake()`` after a ``drain()`` writes a byte, so a burst of wake-ups costs one syscall.
    "Armed" means a byte is in the socket or on its way there, so a ``drain()`` with nothing armed costs
    no syscall (the loop drains after every wait, woken by us or not), and one that finds the byte not
    there yet stays armed for the next.
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
        with contextlib.suppress(OSError):  # closed: the loop is gone anyway
            self._writer.send(b"x")

    def drain(self) -> None:
        with self._lock:
            if not self._armed:
                return
            try:
                self.reader.recv(4096)  # the byte of the one wake() that armed it
            except (BlockingIOError, InterruptedError):
                return  # that wake() has not written it yet: it will wake the loop, and be drained then
            except OSError:
                pass
            self._armed = False

    def close(self) -> None:
        self.reader.close()
        self._writer.close()
