"""The client half of the frame protocol, shared by every transport that talks to our job server.

It turns calls into SUBMIT frames, frames from the server into :class:`Listener` calls, and keeps the
calls in flight so that a reconnecting transport can resubmit them (or fail them, for at-most-once).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections import deque
from collections.abc import Callable, Sequence

from ..errors import (
    AuthenticationError,
    BrokenRemoteExecutor,
    InitializerFailed,
    TransportError,
    VersionMismatchError,
)
from ..netio import Waker
from ..transports import split_hostports
from ..transports.base import Call, ClientTransport, Listener, Options, Session, worker_lost_parts
from ..wire.frames import Frame, Kind, Limits, Status, hello, parse_json
from ..wire.serialization import Parts, decode_outcome

log = logging.getLogger("remote_executor.client")


def client_name() -> str:
    return f"client {socket.gethostname()}:{os.getpid()}"


def initializer_failed(parts: Parts) -> InitializerFailed:
    """The broken-executor error for a failed initializer, with the remote exception as its cause."""
    _, remote = decode_outcome(parts)
    error = InitializerFailed("A worker initializer failed, the executor is not usable anymore")
    error.__cause__ = remote
    return error


def rejection(frame: Frame) -> Exception:
    """The exception a REJECT frame means for a connecting client."""
    reason = bytes(frame.parts[0]).decode(errors="replace") if frame.parts else "rejected"
    if reason.startswith("VersionMismatchError"):
        return VersionMismatchError(reason.split(": ", 1)[-1])
    if "token" in reason:
        return AuthenticationError(f"the job server refused this client: {reason}")
    return TransportError(f"the job server refused this client: {reason}")


class FramedClient:
    """Session state of one executor's connection(s) to a job server."""

    def __init__(self, session: Session, listener: Listener, server: str) -> None:
        self.session = session
        self.listener = listener
        self.server = server
        self._lock = threading.Lock()
        self._inflight: dict[int, Call] = {}  # accepted, no result yet

    def hello(self, token: bytes | None = None) -> Frame:
        info = {
            "name": client_name(),
            "executor_id": self.session.executor_id,
            "max_retries": self.session.max_retries,
        }
        if token is not None:
            info["token"] = token.decode()
        return hello("client", info, self.session.initializer)

    def submit_frames(self, calls: Sequence[Call]) -> list[Frame]:
        """Record calls as in flight and return their SUBMIT frames."""
        with self._lock:
            for call in calls:
                self._inflight[call.task_id] = call
        return [Frame(Kind.SUBMIT, a=call.task_id, parts=call.parts) for call in calls]

    def handle(self, frame: Frame) -> None:
        """React to one frame from the server (on the transport's thread)."""
        kind = frame.kind
        if kind == Kind.RESULT:
            with self._lock:
                known = self._inflight.pop(frame.a, None) is not None
            if known:
                self.listener.on_result(frame.a, Status(frame.b), frame.parts)
        elif kind == Kind.CAPACITY:
            self.listener.on_capacity(frame.a)
        elif kind == Kind.BROKEN:
            self.listener.on_broken(initializer_failed(frame.parts))
        elif kind == Kind.REJECT:
            error = rejection(frame)
            self.listener.on_broken(BrokenRemoteExecutor(str(error)))
        elif kind not in (Kind.WELCOME, Kind.HEARTBEAT):
            log.warning("ignoring an unexpected %s frame from %s", kind.name, self.server)

    def connection_lost(self) -> list[Call]:
        """The calls to resubmit after reconnecting; with ``max_retries=0`` the ones that may have run
        fail instead (at-most-once)."""
        with self._lock:
            calls = list(self._inflight.values())
            if self.session.max_retries > 0:
                return calls
            self._inflight.clear()
        parts = worker_lost_parts([f"{self.server} (connection lost)"], 1)
        for call in calls:
            self.listener.on_result(call.task_id, Status.WORKER_LOST, parts)
        return []

    def welcome(self, frame: Frame) -> dict[str, object]:
        """Check the server's answer to HELLO; raise what a REJECT means."""
        if frame.kind == Kind.REJECT:
            raise rejection(frame)
        if frame.kind != Kind.WELCOME:
            raise TransportError(f"expected WELCOME from {self.server}, got {frame.kind.name}")
        return parse_json(frame)


class QueuedClientTransport(ClientTransport):
    """What the tcp and zmq client transports share: one I/O thread that owns the socket, an outbox that
    any caller thread appends SUBMIT frames to, and a :class:`Waker` to tell the thread about them."""

    def __init__(self, url: str, options: Options) -> None:
        self.url = url
        self.address = split_hostports(url)[0]
        self._options = options
        self._limits = Limits(**options.extra.get("limits", {}))
        self._client: FramedClient | None = None
        self._outbox: deque[Frame] = deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._waker = Waker()
        self._thread: threading.Thread | None = None

    def submit(self, calls: Sequence[Call]) -> None:
        assert self._client is not None
        frames = self._client.submit_frames(calls)
        with self._lock:
            self._outbox.extend(frames)
        if threading.current_thread() is not self._thread:
            self._waker.wake()

    def _start_thread(self, target: Callable[[], None], name: str) -> None:
        self._thread = threading.Thread(target=target, name=name, daemon=True)
        self._thread.start()

    def _stop_thread(self) -> None:
        """Ask the I/O thread to finish and wait for it (unless called from it)."""
        self._stop.set()
        self._waker.wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
