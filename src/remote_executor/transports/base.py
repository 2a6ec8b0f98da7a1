"""The contract between :class:`RemoteExecutor` and a transport.

The executor owns futures, the pending queue, the in-flight window, cancellation, ``map`` and shutdown; a
transport only moves serialized calls to workers and serialized outcomes back. The executor never touches
a socket, and a transport never touches a ``Future``.

Threading: :meth:`ClientTransport.submit` is called from any caller thread and must not block on the
network. :class:`Listener` methods are called from the transport's own thread(s); they are quick and never
call back into the transport while holding a lock of the transport's.

Guarantees a transport gives: every call it accepted gets exactly one :meth:`Listener.on_result` (a
result, a worker-lost error or a rejection), unless :meth:`Listener.on_broken` is called, after which the
executor fails every unfinished call itself. Non-guarantees: results arrive in any order; a call may run
more than once when ``max_retries > 0`` (a worker can die after it ran the call but before the result came
back).
"""

from __future__ import annotations

import abc
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import BrokenRemoteExecutor, WorkerLostError
from ..wire.frames import Status
from ..wire.serialization import Parts, decode_outcome

__all__ = ["Call", "ClientTransport", "Listener", "Options", "Session", "Status", "decode_result"]


@dataclass(slots=True)
class Call:
    """One unit of work on the wire: a single call or a chunk of ``map`` calls."""

    task_id: int
    parts: Parts


@dataclass(frozen=True, slots=True)
class Session:
    """Who is submitting, and what every worker must run before this executor's first call."""

    executor_id: int
    initializer: Parts | None
    max_retries: int


@dataclass(frozen=True, slots=True)
class Options:
    """Settings every transport understands; the executor's keyword arguments, resolved."""

    max_workers: int | None = None
    key: bytes | None = None
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 10.0
    reconnect_timeout: float = 30.0
    connect_timeout: float = 10.0
    extra: dict[str, Any] = field(default_factory=dict)


class Listener(Protocol):
    """What a transport reports to the executor."""

    def on_result(self, task_id: int, status: Status, parts: Parts) -> None:
        """The final word on one call: ``decode_result(status, parts)`` tells what it is."""

    def on_capacity(self, slots: int) -> None:
        """How many calls the attached workers can run at once (changes as workers come and go)."""

    def on_broken(self, error: BrokenRemoteExecutor) -> None:
        """The executor cannot go on (an initializer failed, the server is gone for good)."""


class ClientTransport(abc.ABC):
    """The client side of a transport. Instances are used by one executor, once."""

    url: str = ""

    @abc.abstractmethod
    def start(self, session: Session, listener: Listener) -> None:
        """Connect (or start the embedded cluster) and begin reporting to ``listener``.

        Raises :class:`~remote_executor.errors.TransportError` (or a subclass) if it cannot even start;
        failures after start are reported through the listener instead.
        """

    @abc.abstractmethod
    def submit(self, calls: Sequence[Call]) -> None:
        """Hand calls to the workers. Thread-safe; never blocks on the network; never raises for a
        network failure (that is reported through the listener)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release every thread, socket and process this transport started. Idempotent. Calls still
        running are abandoned (the executor has already decided what happens to their futures)."""


def worker_lost_parts(workers: Sequence[str], attempts: int) -> Parts:
    """The body of a ``Status.WORKER_LOST`` result."""
    return [json.dumps({"workers": list(workers), "attempts": attempts}).encode()]


def decode_result(status: Status, parts: Parts) -> tuple[bool, Any]:
    """``(True, value)`` or ``(False, exception)`` for a result a transport reported.

    For a chunk the value is ``(values, exception_or_None)``.
    """
    if status == Status.DONE:
        return decode_outcome(parts)
    if status == Status.WORKER_LOST:
        info = json.loads(bytes(parts[0]))
        workers = tuple(str(w) for w in info["workers"])
        attempts = int(info["attempts"])
        return False, WorkerLostError(
            f"the call was lost with its worker {attempts} time(s) and not retried further; "
            f"worker(s) lost: {', '.join(workers)}",
            workers,
        )
    return False, BrokenRemoteExecutor(bytes(parts[0]).decode(errors="replace") if parts else "rejected")
