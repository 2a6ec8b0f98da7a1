"""A cross-process gate: tasks report that they started and block until the test releases them.

``threading.Event`` cannot reach a worker in another process, and sleeping to "let a task start" makes
tests flaky. A :class:`Gate` is a tiny TCP server on 127.0.0.1 in the test process; the task
:func:`wait_at_gate`, run anywhere that can reach the test's loopback (threads, local worker processes),
connects, names itself with a token, and waits for the word to go::

    with Gate() as gate:
        held = executor.submit(wait_at_gate, gate.address, "a", 42)
        gate.wait_started(1)          # "a" is running now, for threads and processes alike
        ...                           # inspect states, cancel what is still pending, shut down ...
        gate.release()                # or gate.release("a"): only the tasks with that token
        assert held.result() == 42

A release is remembered: a task arriving after its token (or everything) was released passes at once.
Tasks never hang: :func:`wait_at_gate` gives up after its own ``timeout`` and raises :class:`GateError`.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from types import TracebackType
from typing import Any

__all__ = ["Gate", "GateError", "wait_at_gate"]

_GO = b"go\n"
_MAX_TOKEN = 1024


class GateError(Exception):
    """A task at a gate was not released in time, or the gate went away under it."""


def wait_at_gate(address: tuple[str, int], token: str, result: Any = None, timeout: float = 60.0) -> Any:
    """Report ``token`` as started to the gate at ``address``, block until released, return ``result``."""
    try:
        with socket.create_connection((address[0], address[1]), timeout=timeout) as sock:
            sock.sendall(token.encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(16)
                if not chunk:
                    raise GateError(f"the gate closed before releasing {token!r}")
                reply += chunk
    except TimeoutError as exc:
        raise GateError(f"the gate did not release {token!r} within {timeout} s") from exc
    return result


class Gate:
    """The test-side server of :func:`wait_at_gate`; use it as a context manager (closing releases all)."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        host, port = self._listener.getsockname()[:2]
        self.address: tuple[str, int] = (str(host), int(port))
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._changed = threading.Condition()
        self._started: list[str] = []
        self._released: set[str] = set()
        self._released_all = False
        self._closing = False
        self._buffers: dict[socket.socket, bytes] = {}
        self._held: dict[socket.socket, str] = {}
        self._thread = threading.Thread(target=self._serve, name="conformance-gate", daemon=True)
        self._thread.start()

    def __enter__(self) -> Gate:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def started(self) -> list[str]:
        """The tokens of every task that reached the gate so far, in order of arrival."""
        with self._changed:
            return list(self._started)

    def wait_started(self, count: int, timeout: float = 30.0) -> list[str]:
        """Block until ``count`` tasks reached the gate; fail the test (AssertionError) after ``timeout``."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._started) >= count, timeout):
                raise AssertionError(
                    f"only {len(self._started)} of {count} tasks reached the gate within {timeout} s: {self._started}"
                )
            return list(self._started)

    def release(self, token: str | None = None) -> None:
        """Let tasks with ``token`` go (``None``: every task, now and later)."""
        with self._changed:
            if token is None:
                self._released_all = True
            else:
                self._released.add(token)
        self._wake()

    def close(self) -> None:
        """Release everything, stop the server thread and close every socket."""
        with self._changed:
            self._released_all = True
            self._closing = True
        self._wake()
        self._thread.join()
        for sock in (*self._buffers, *self._held):
            sock.close()
        self._selector.close()
        self._listener.close()
        self._wake_reader.close()
        self._wake_writer.close()

    # --- server thread ------------------------------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # already closed: nothing left to wake
            self._wake_writer.send(b"!")

    def _serve(self) -> None:
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_reader, selectors.EVENT_READ)
        while True:
            for key, _ in self._selector.select():
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    self._accept()
                elif sock is self._wake_reader:
                    sock.recv(4096)
                else:
                    self._read(sock)
            self._let_go()
            with self._changed:
                if self._closing:
                    return

    def _accept(self) -> None:
        conn, _ = self._listener.accept()
        conn.setblocking(False)
        self._buffers[conn] = b""
        self._selector.register(conn, selectors.EVENT_READ)

    def _read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(_MAX_TOKEN)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data or len(self._buffers.get(conn, b"")) > _MAX_TOKEN:
            self._drop(conn)  # the task gave up (its own timeout) or misbehaves
            return
        if conn in self._held:
            return  # nothing more is expected from a held task
        buffered = self._buffers[conn] + data
        if b"\n" not in buffered:
            self._buffers[conn] = buffered
            return
        del self._buffers[conn]
        token = buffered.split(b"\n", 1)[0].decode(errors="replace")
        self._held[conn] = token
        with self._changed:
            self._started.append(token)
            self._changed.notify_all()

    def _let_go(self) -> None:
        with self._changed:
            released_all, released = self._released_all, set(self._released)
        for conn, token in list(self._held.items()):
            if released_all or token in released:
                try:
                    conn.setblocking(True)
                    conn.sendall(_GO)
                except OSError:
                    pass  # the task is gone already; it raised GateError itself
                self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        self._selector.unregister(conn)
        self._buffers.pop(conn, None)
        self._held.pop(conn, None)
        conn.close()
