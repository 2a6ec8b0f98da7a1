"""The in-process reference transport: worker threads and a queue, with real pickling.

``RemoteExecutor(transport="memory")`` runs calls in ``max_workers`` (default 4) threads of this process.
Every call and outcome crosses a copy of its serialized parts, so pickling errors, remote tracebacks and
initializers behave as they do on the wire; only sockets and processes are missing. It is the smallest
complete :class:`~remote_executor.transports.base.ClientTransport` and the one to read first.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence

from ..wire.messages import initializer_failed
from ..wire.serialization import Buffer, Parts, run_initializer, run_task
from .base import Backend, Call, ClientTransport, Listener, Options, Session, Status

__all__ = ["MemoryBackend", "MemoryTransport"]

DEFAULT_WORKERS = 4


class MemoryBackend(Backend):
    """``memory`` and ``memory://`` are the same: threads of this process, no cluster, no worker processes."""

    scheme = "memory"
    client_options = frozenset({"limits"})
    in_process = True

    def client(self, url: str, options: Options) -> MemoryTransport:
        return MemoryTransport(options.max_workers or DEFAULT_WORKERS, url=url)


class MemoryTransport(ClientTransport):
    """``workers`` threads that take calls from one queue and report each outcome to the listener."""

    def __init__(self, workers: int = DEFAULT_WORKERS, *, url: str = "memory") -> None:
        self.url = url
        self.workers = workers
        self._queue: queue.SimpleQueue[Call | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()  # set on close and when an initializer failed
        self._closed = False
        self._close_lock = threading.Lock()
        self._newest = 0  # the highest task id queued

    def start(self, session: Session, listener: Listener) -> None:
        for index in range(self.workers):
            name = f"remote_executor-memory-{index}"
            thread = threading.Thread(target=self._work, args=(session, listener), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        listener.on_capacity(self.workers)

    def submit(self, calls: Sequence[Call]) -> None:
        if self._stop.is_set():
            return  # the executor already settled these futures; nobody is listening
        for call in calls:
            # Marked before it is queued: nothing between the two can be interrupted (on Python 3.11+
            # a signal handler runs only after the put), so a submit cut short by Ctrl-C never queues a
            # call that reconcile() would queue again.
            self._newest = call.task_id
            self._queue.put(call)

    def reconcile(self, calls: Sequence[Call]) -> None:
        for call in calls:
            if call.task_id > self._newest:  # never queued (task ids grow)
                self._newest = call.task_id
                self._queue.put(call)

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            if thread is not threading.current_thread():  # close() from a result callback must not self-join
                thread.join()

    def _work(self, session: Session, listener: Listener) -> None:
        initialized = False
        while True:
            call = self._queue.get()
            if call is None or self._stop.is_set():
                return
            if not initialized:
                if not self._initialize(session, listener):
                    return
                initialized = True
            outcome = run_task(_copy(call.parts))
            listener.on_result(call.task_id, Status.DONE, _copy(outcome))

    def _initialize(self, session: Session, listener: Listener) -> bool:
        if session.initializer is None:
            return True
        failure = run_initializer(_copy(session.initializer))
        if failure is None:
            return True
        self._stop.set()  # a broken executor runs nothing more, on any worker
        listener.on_broken(initializer_failed(_copy(failure)))
        return False


def _copy(parts: Sequence[Buffer]) -> Parts:
    """What the other end of a wire would receive: fresh bytes, sharing no memory with the sender."""
    return [bytes(part) for part in parts]
