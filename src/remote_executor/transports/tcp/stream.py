"""Frames over stream sockets: a non-blocking connection for the server loop, and the client/worker channel.

Both sides read with ``recv_into`` into the :class:`~remote_executor.wire.frames.FrameReader`'s buffers and
write with ``sendmsg`` straight from the parts, so large payloads cross the socket without extra copies.
The same over TLS is in :mod:`.tlsstream`, which only a TLS client, worker or server imports.
"""

from __future__ import annotations

import contextlib
import itertools
import selectors
import socket
import time
from collections import deque
from collections.abc import Callable

from ...errors import ConnectionFailedError, ProtocolError
from ...jobserver.client import POLL_SLICE, Channel
from ...netio import IOV_MAX, Waker, connect, receive_timeout
from ...wire.frames import Frame, FrameReader, Limits, encode, pre_session
from ...wire.session import Mac, as_mac


class Connection:
    """A non-blocking socket with a frame reader and an output queue, driven by a selector loop."""

    # A TLS connection's read may need the socket to be writable first (then the loop calls read() again
    # once it is); a plain socket's never does.
    read_needs_write = False
    # 0 on a non-blocking socket (the server's); MSG_DONTWAIT on a channel's blocking socket, whose reads and
    # writes must not block either, except the one read :meth:`read_waiting` makes on purpose.
    io_flags = 0

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
        self.proven = False  # a frame from the peer has verified under the session keys (it holds the key)

    def fileno(self) -> int:
        return self.sock.fileno()

    def queue(self, frame: Frame) -> None:
        """Queue a frame; :meth:`flush` sends it."""
        out = self._out
        for buf in encode(frame, self.send_mac):  # a loop, not a generator: every frame passes here
            if len(buf):
                out.append(memoryview(buf) if type(buf) is bytes else memoryview(buf).cast("B"))

    @property
    def mid_frame(self) -> bool:
        return self.reader.mid_frame

    @property
    def wants_write(self) -> bool:
        return bool(self._out)

    def read(self) -> list[Frame] | None:
        """Frames now complete; ``None`` at end of stream. Raises ProtocolError on bad input."""
        return self._receive(self.io_flags)

    def read_waiting(self) -> list[Frame] | None:
        """Like :meth:`read`, but on a blocking socket with a receive timeout, waiting in the kernel for up to
        that timeout: one system call for a frame that arrives meanwhile, instead of poll and read."""
        return self._receive(0)

    def _receive(self, flags: int) -> list[Frame] | None:
        try:
            n = self.sock.recv_into(self.reader.buffer(), 0, flags)
        except (BlockingIOError, InterruptedError):
            return []
        except ConnectionError:
            return None
        if n == 0:
            return None
        return self.reader.feed(n)

    def flush(self) -> bool:
        """Send as much as the socket takes; True when everything queued is sent."""
        out = self._out
        while out:
            batch = list(out) if len(out) <= IOV_MAX else list(itertools.islice(out, IOV_MAX))
            try:
                sent = self.sock.sendmsg(batch, (), self.io_flags)
            except (BlockingIOError, InterruptedError):
                return False
            if sent == sum(map(len, batch)):  # the common case, the whole batch sent: nothing to walk through
                for _ in batch:
                    out.popleft()  # exactly what was sent (never a frame queued meanwhile)
            else:
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
    """A client's or worker's connection to a tcp job server: a :class:`Connection` plus a selector.

    On Linux the plain socket is blocking with a receive timeout of :data:`POLL_SLICE`, and every read or
    write passes MSG_DONTWAIT except in :meth:`next_frame`, which waits for a frame inside ``recv`` itself:
    a worker takes a call with one system call and answers it with one, where poll-then-read costs three.
    The selector also skips the read after a wait that did not find the socket readable."""

    connection_class: type[Connection] = Connection
    # TLS: decrypted bytes may wait in the SSL object, where neither a kernel timeout nor select sees them
    kernel_waits = True

    def __init__(self, sock: socket.socket, key: bytes | None, limits: Limits, url: str) -> None:
        super().__init__(url)
        self._limits = limits  # once the server has proved it holds the key (see authenticate)
        # (without a key there is nothing to prove: the limits are the full ones from the start)
        self._conn = self.connection_class(sock, key, pre_session(limits) if key is not None else limits, url)
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ, None)
        self._writing = False
        self._waker: Waker | None = None
        self.concurrent_send = self.kernel_waits  # a plain socket: reading and writing share no state
        self._blocking = self.kernel_waits and receive_timeout(sock, POLL_SLICE)
        if self._blocking:
            sock.setblocking(True)
            self._conn.io_flags = socket.MSG_DONTWAIT
        self._maybe_readable = True  # False after a wait that did not report the socket readable

    @classmethod
    def connect(cls, address: tuple[str, int], key: bytes | None, limits: Limits, url: str,
                timeout: float) -> TcpChannel:
        return cls(connect(address, timeout, url), key, limits, url)

    def queue(self, frame: Frame) -> None:
        self._conn.queue(frame)

    def authenticate(self, send: Mac | None, receive: Mac | None, *, proven: bool = False) -> None:
        self._conn.send_mac, self._conn.reader.mac = send, receive
        if proven:
            self._conn.reader.limits = self._limits

    def flush(self) -> bool:
        try:
            return self._conn.flush()
        except OSError as exc:
            raise ConnectionFailedError(f"lost the connection to {self.peer}: {exc}") from exc

    def receive(self) -> list[Frame]:
        if not self._maybe_readable:
            return []
        if self.kernel_waits:
            self._maybe_readable = False  # until a wait says otherwise: a second read would find nothing
        return self._checked(self._conn.read)

    def _checked(self, read: Callable[[], list[Frame] | None]) -> list[Frame]:
        try:
            frames = read()
        except OSError as exc:
            raise ConnectionFailedError(f"lost the connection to {self.peer}: {exc}") from exc
        if frames is None:
            truncated = " in the middle of a frame" if self._conn.mid_frame else ""
            raise ConnectionFailedError(f"{self.peer} closed the connection{truncated}")
        return frames

    def next_frame(self, timeout: float) -> Frame | None:
        if self.ready or not self._blocking or timeout <= 0 or self._conn._out:  # _out: wants_write, uncalled
            return super().next_frame(timeout)
        # Wait inside recv (its kernel timeout is POLL_SLICE): a frame due within ``timeout`` is taken as
        # soon as it arrives; the answer comes at most one POLL_SLICE after ``timeout`` when none does.
        deadline = time.monotonic() + timeout
        while True:
            self.ready.extend(self._checked(self._conn.read_waiting))
            if self.ready:
                return self.ready.popleft()
            if time.monotonic() >= deadline:
                return None

    def wait(self, timeout: float, waker: Waker | None = None) -> None:
        if waker is not self._waker and waker is not None:
            self._selector.register(waker.reader, selectors.EVENT_READ, waker)
            self._waker = waker
        writing = self._conn.wants_write
        if writing != self._writing:  # (un)register interest in writability only on change
            self._writing = writing
            interest = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
            self._selector.modify(self._conn.sock, interest, None)
        ready = self._selector.select(timeout)
        self._maybe_readable = not self.kernel_waits or any(
            key.data is None and mask & selectors.EVENT_READ for key, mask in ready)

    def close(self) -> None:
        if not self._conn.closed:
            self._selector.close()
            with contextlib.suppress(OSError):
                self._conn.sock.shutdown(socket.SHUT_RDWR)
            self._conn.close()
