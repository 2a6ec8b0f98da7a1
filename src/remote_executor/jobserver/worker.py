"""The worker loop of our job-server protocol, whatever carries it (tcp, zmq): one TASK/INIT/DRAIN loop.

Threading::

    main thread: connect (with backoff) → HELLO → take TASK / INIT / DRAIN frames, run them, reply
    heartbeat thread: while a call runs, HEARTBEAT (and DRAIN once SIGTERM asked for it), so a long call is
        not taken for a dead worker; while idle the main thread keeps the connection alive itself

The channel is shared under one lock: the main thread holds it while it waits for a frame (in slices of
:data:`POLL_SLICE`, so a drain or a due heartbeat is never late) and releases it while a call runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import ConnectionFailedError, RemoteExecutorError
from ..netio import retry_with_backoff
from ..transports.base import WorkerCore, WorkerSettings
from ..wire.frames import Frame, Kind
from ..wire.messages import hello, rejection
from ..wire.serialization import Parts
from .client import POLL_SLICE, Channel, Connector, open_session

log = logging.getLogger("remote_executor.worker")

FOREVER = float("inf")


def run_worker(connect: Connector, settings: WorkerSettings, core: WorkerCore) -> int:
    """Serve a job server until drained (0), unreachable for ``reconnect_timeout`` (1) or refused (2),
    reconnecting in between. SIGTERM (``settings.drain``) ends it whether connected or not."""
    info: dict[str, Any] = {"name": settings.name, "slots": 1}
    if settings.token is not None:
        info["token"] = settings.token.decode()
    first = hello("worker", info)
    while True:
        log.info("connecting to %s", settings.url)
        try:
            channel = retry_with_backoff(
                lambda: open_session(connect, first, settings.connect_timeout, settings.drain),
                settings.reconnect_timeout, settings.drain,
                lambda exc, delay: log.info("connecting to %s: %s", settings.url, exc),
                transient=(ConnectionFailedError,))
        except ConnectionFailedError as exc:
            log.error("cannot reach %s: %s", settings.url, exc)
            return 1
        except RemoteExecutorError as exc:
            log.error("%s refused this worker: %s", settings.url, exc)
            return 2
        if channel is None:
            log.info("drained while not connected to %s; exiting", settings.url)
            return 0
        code = _Session(channel, settings, core).run()
        if code is not None:
            return code


class _Session:
    """One connection's life: None from :meth:`run` means reconnect, a number is the exit code."""

    def __init__(self, channel: Channel, settings: WorkerSettings, core: WorkerCore) -> None:
        self.channel = channel
        self.settings = settings
        self.core = core
        self.lock = threading.Lock()
        self.busy = False
        self.stopped = threading.Event()
        self.last_send = self.last_recv = time.monotonic()
        self.drain_sent = False

    def run(self) -> int | None:
        beat = threading.Thread(target=self._beat_while_busy, name="remote-executor-heartbeat", daemon=True)
        beat.start()
        try:
            return self._work()
        except RemoteExecutorError as exc:  # the connection failed or the server sent garbage
            log.warning("lost %s: %s; reconnecting", self.settings.url, exc)
            return None
        finally:
            self.stopped.set()
            beat.join()
            self.channel.close()

    def _work(self) -> int | None:
        settings = self.settings
        while True:
            with self.lock:
                frame = self.channel.next_frame(POLL_SLICE)
                now = time.monotonic()
                if frame is None:
                    if now - self.last_recv > settings.heartbeat_timeout:
                        log.warning("no heartbeat from %s for %.1fs; reconnecting", settings.url, now - self.last_recv)
                        return None
                    self._keep_alive()
                    continue
                self.last_recv = now
            if frame.kind == Kind.TASK:
                self._reply(Kind.RESULT, frame.a, self.core.run, frame.b, frame.parts)
            elif frame.kind == Kind.INIT:
                self._reply(Kind.INIT_FAILED, frame.a, self.core.initialize, frame.a, frame.parts)
            elif frame.kind == Kind.DRAIN:
                log.info("drained; exiting")
                return 0
            elif frame.kind == Kind.REJECT:
                log.error("%s closed this worker: %s", settings.url, rejection(frame, settings.url))
                return 2

    def _reply(self, kind: Kind, a: int, work: Callable[..., Parts | None], *args: Any) -> None:
        """Run ``work`` with the heartbeat thread covering for us; send its parts (if any) as ``kind``."""
        self.busy = True
        try:
            parts = work(*args)
        finally:
            with self.lock:
                self.busy = False
        if parts is not None:
            with self.lock:
                if self.settings.drain.is_set() and not self.drain_sent:
                    # DRAIN before the result: the server marks us draining before our slot frees, so no
                    # queued call can be handed to a worker that is about to exit.
                    self._send(Frame(Kind.DRAIN))
                    self.drain_sent = True
                self._send(Frame(kind, a=a, parts=parts))

    def _send(self, frame: Frame) -> None:
        """Lock held."""
        self.channel.send(frame, FOREVER)
        self.last_send = time.monotonic()

    def _keep_alive(self) -> None:
        """DRAIN once if SIGTERM asked for it, else a HEARTBEAT when one is due. Lock held."""
        if self.settings.drain.is_set() and not self.drain_sent:
            self._send(Frame(Kind.DRAIN))
            self.drain_sent = True
        elif time.monotonic() - self.last_send >= self.settings.heartbeat_interval:
            self._send(Frame(Kind.HEARTBEAT))

    def _beat_while_busy(self) -> None:
        while not self.stopped.wait(min(self.settings.heartbeat_interval, POLL_SLICE)):
            if not self.busy:  # a racy peek, so an idle worker's main thread is not disturbed
                continue
            with self.lock:
                try:
                    if self.busy:  # again under the lock: the main thread may just have taken the channel back
                        self._keep_alive()
                except RemoteExecutorError:
                    return  # the main thread sees the broken connection when it next uses it
