"""The exceptions a caller of :class:`RemoteExecutor` can see, and the remote traceback carrier."""

from __future__ import annotations

import pickle
from concurrent.futures import BrokenExecutor
from concurrent.futures import TimeoutError as FuturesTimeoutError


class RemoteExecutorError(Exception):
    """Base class of every error this package raises on its own account."""


class RemoteTraceback(Exception):
    """Carries the traceback text of a call that raised remotely; set as the ``__cause__`` of that error.

    Mirrors ``concurrent.futures.process._RemoteTraceback``: printing the caller's traceback shows the
    remote frames first, and ``except ValueError:`` in the caller still catches the original type.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


class RemoteError(RemoteExecutorError):
    """A remote exception that could not cross the wire (unpicklable there, or not importable here)."""

    def __init__(self, type_name: str, message: str, traceback_text: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text

    def __reduce__(self) -> tuple[type[RemoteError], tuple[str, str, str]]:
        return (type(self), (self.type_name, self.message, self.traceback_text))


class SerializationError(RemoteExecutorError, pickle.PicklingError):
    """A call, an argument, a result or an exception could not be pickled or unpickled.

    The message names what failed (for example ``argument 1`` or ``keyword argument 'data'``); the
    original error is the ``__cause__``. Only the future of the call concerned fails.
    """


class WorkerLostError(RemoteExecutorError):
    """The worker(s) running a call died, hung past the heartbeat timeout or lost their connection.

    Raised after the call was resubmitted ``max_retries`` times. ``workers`` names every worker lost
    while running this call, in order. This is an infrastructure failure, never the call's own error.
    """

    def __init__(self, message: str, workers: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.workers = workers

    def __reduce__(self) -> tuple[type[WorkerLostError], tuple[str, tuple[str, ...]]]:
        return (type(self), (str(self), self.workers))


class FrameTooLargeError(RemoteExecutorError):
    """A call (its function and arguments) or its result is larger than the job server accepts.

    Only that call fails, at once and without a retry: sending it again could never succeed. The job
    server's limit is its ``--max-frame-size``; pass large data another way (a file or store that the
    workers can read) or raise the limit.
    """

class CallTimeoutError(RemoteExecutorError, FuturesTimeoutError):
    """A call ran past its time limit (``call_timeout``, ``with_options(timeout=...)``) and was stopped.

    The worker process running it was ended (and replaced); the call is never retried. It is a
    ``concurrent.futures.TimeoutError`` (on Python 3.11+ that is the built-in ``TimeoutError``), so
    ``except TimeoutError`` catches it there; ``except CallTimeoutError`` tells it apart from a
    ``future.result(timeout)`` that merely stopped waiting. ``limit`` is the limit in seconds, ``worker``
    the worker that ran the call (empty if unknown).
    """

    def __init__(self, message: str, limit: float = 0.0, worker: str = "") -> None:
        super().__init__(message)
        self.limit = limit
        self.worker = worker

    def __reduce__(self) -> tuple[type[CallTimeoutError], tuple[str, float, str]]:
        return (type(self), (str(self), self.limit, self.worker))


class BrokenRemoteExecutor(BrokenExecutor, RemoteExecutorError):
    """The executor cannot run calls any more: a worker initializer failed or the job server is gone."""


INITIALIZER_FAILED = "A worker initializer failed, the executor is not usable anymore"


class InitializerFailed(BrokenRemoteExecutor):
    """A worker's initializer raised; the remote exception is the ``__cause__``."""


class ServerUnavailableError(BrokenRemoteExecutor):
    """The job server could not be reached for longer than the configured ``reconnect_timeout``."""


class ProtocolError(RemoteExecutorError):
    """A peer sent a frame that breaks the wire protocol (bad header, oversized, truncated)."""


class AuthenticationError(ProtocolError):
    """A frame's HMAC did not verify, a handshake had no key or a wrong one."""


class KeyRejectedError(AuthenticationError):
    """The job server answered that our key is not its own. That answer is unsigned (the server shares no
    key with us), so anyone who can answer on its address can forge it: a worker retries it for a few
    seconds, and a client that had a session retries it like a lost connection, before believing it."""


class VersionMismatchError(RemoteExecutorError):
    """Client, job server and worker run different Python or cloudpickle versions."""


class TransportError(RemoteExecutorError):
    """A transport could not be created or reached (bad URL, missing extra, connection refused)."""


class ConnectionFailedError(TransportError):
    """Connecting to a peer failed, or a live connection broke: transient, so reconnect loops retry it.

    The message names the URL; the socket's (or pyzmq's, or gearmand's) own error is the ``__cause__``."""


class NotOurServerError(ConnectionFailedError):
    """What answered at a job server's address, before proving it holds the key, sent something no job
    server of ours sends (another service on that port, a corrupted connection or a forged answer). Not
    believed: reconnect loops retry it, and a client with several servers tries the next one."""


class HandshakeClosedError(ConnectionFailedError, AuthenticationError):
    """The job server hung up before answering HELLO: most likely a wrong key (a server drops a frame it
    cannot authenticate without a word), possibly a server going down, so reconnect loops retry it."""
