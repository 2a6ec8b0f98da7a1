"""The contracts: between :class:`RemoteExecutor` and a transport, and between a scheme and the rest.

The executor owns futures, the pending queue, the in-flight window, cancellation, ``map`` and shutdown; a
:class:`ClientTransport` only moves serialized calls to workers and serialized outcomes back. The executor
never touches a socket, and a transport never touches a ``Future``.

Threading: :meth:`ClientTransport.submit` is called from any caller thread and must not block on the
network. :class:`Listener` methods are called from the transport's own thread(s); they are quick and never
call back into the transport while holding a lock of the transport's.

Guarantees a transport gives: every call it accepted gets exactly one :meth:`Listener.on_result` (a
result, a worker-lost error or a rejection), unless :meth:`Listener.on_broken` is called, after which the
executor fails every unfinished call itself. An unexpected error on a transport's own thread must end in
``on_broken``, never in silence. Non-guarantees: results arrive in any order; a call may run more than
once when ``max_retries > 0`` (a worker can die after it ran the call but before the result came back).

A :class:`Backend` is everything one URL scheme provides: the client transport, the embedded server of a
local cluster, the standalone job server, the worker loop and the status query. ``get_backend(scheme)``
in :mod:`remote_executor.transports` is the only place a scheme is looked up.
"""

from __future__ import annotations

import abc
import contextlib
import faulthandler
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from ..errors import INITIALIZER_FAILED, BrokenRemoteExecutor, InitializerFailed, TransportError
from ..security import normalize_key
from ..signals import SignalEvent
from ..wire.frames import DEFAULT_LIMITS, Limits, Status
from ..wire.messages import timed_out_error, worker_lost_error
from ..wire.output import Output
from ..wire.serialization import Parts, decode_outcome, error_outcome, run_initializer, run_task_reporting

__all__ = [
    "Backend",
    "Call",
    "ClientTransport",
    "EmbeddedServer",
    "JobServer",
    "Listener",
    "Options",
    "ServerSettings",
    "Session",
    "Status",
    "WorkerCore",
    "WorkerSettings",
    "decode_result",
]

EXIT_TIMED_OUT = 4  # a worker process's exit status after it stopped a call at its time limit
# A worker process's exit status when its job server was stopped with its workers (remote-executor stop
# --workers): for good, so its supervisor does not restart it.
EXIT_STOPPED = 5
# A worker process's exit status when it gave up reaching its job server (--reconnect-timeout): for good.
EXIT_UNREACHABLE = 6
REFUSED = 2  # the exit code of a worker the job server refused (a wrong key, other versions): not restarted
LIFELINE_ENV = "REMOTE_EXECUTOR_LIFELINE_FD"  # the worker's end of the pipe whose closing ends it
SERVING_ENV = "REMOTE_EXECUTOR_SERVING_FD"  # a pipe to the supervisor: one byte once this worker serves
SIBLINGS_DIR_ENV = "REMOTE_EXECUTOR_SIBLINGS_DIR"  # a private directory the workers of one supervisor share
# A call that holds the GIL (a long C loop) starves the watchdog thread; faulthandler's own C thread ends
# the process this long after the limit all the same (and prints where the call was stuck).
HARD_STOP_GRACE = 3.0  # more than the timed-out report may take (1 s for the lock, 1 s to send)

log = logging.getLogger("remote_executor.worker")


@dataclass(slots=True)
class Call:
    """One unit of work on the wire: a single call or a chunk of ``map`` calls."""

    task_id: int
    parts: Parts
    limit: float | None = None  # seconds it may run before its worker process is stopped
    worker: str | None = None  # a broadcast's call: run on this worker only (from broadcast_targets())


@dataclass(frozen=True, slots=True)
class Session:
    """Who is submitting, and what every worker must run before this executor's first call."""

    executor_id: int
    initializer: Parts | None
    max_retries: int


def check_heartbeats(interval: float, timeout: float,
                     names: tuple[str, str] = ("heartbeat_interval", "heartbeat_timeout")) -> None:
    """``ValueError`` unless ``timeout`` is longer than ``interval``: a peer that says it is alive every
    ``interval`` seconds would otherwise count as lost between two heartbeats, healthy workers as hung."""
    if not timeout > interval:
        raise ValueError(f"{names[1]} ({timeout:g}s) must be longer than {names[0]} ({interval:g}s): "
                         f"every peer would count as lost between two of its heartbeats")


@dataclass(frozen=True, slots=True)
class Options:
    """Settings every transport understands; the executor's keyword arguments, resolved."""

    max_workers: int | None = None
    key: bytes | None = None
    insecure: bool = False  # no key was given and none is wanted (never the per-user key)
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 10.0
    reconnect_timeout: float = 30.0
    connect_timeout: float = 10.0
    extra: dict[str, Any] = field(default_factory=dict)
    start_method: str | None = None  # how an embedded cluster starts its workers (None: "forkserver")
    worker_name: str = "local-worker"  # an embedded cluster's workers are named WORKER_NAME-0, -1, ...

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", normalize_key(self.key))  # the one rule for keys, however built

    def limits(self) -> Limits:
        """Frame limits from ``limits={...}`` among the extra options (the defaults otherwise)."""
        return Limits(**self.extra.get("limits", {}))


class Listener(Protocol):
    """What a transport reports to the executor."""

    def on_result(self, task_id: int, status: Status, parts: Parts) -> None:
        """The final word on one call: ``decode_result(status, parts)`` tells what it is."""

    def on_capacity(self, slots: int) -> None:
        """How many calls the attached workers can run at once (changes as workers come and go)."""

    def on_broken(self, error: BrokenRemoteExecutor) -> None:
        """The executor cannot go on (an initializer failed, the server is gone for good)."""

    def on_started(self, task_id: int) -> None:
        """A worker has taken a call that has a time limit (its clock starts now). Optional: the executor
        uses it to fail the call itself if no result comes well after the limit."""


class ClientTransport(abc.ABC):
    """The client side of a transport. Instances are used by one executor, once."""

    url: str = ""
    # True if it enforces ``Call.limit``: the call's worker process is stopped at the limit and the call is
    # reported as ``Status.TIMED_OUT``, never retried. The executor refuses time limits otherwise.
    time_limits: bool = False

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

    def submitter(self) -> Callable[[Sequence[Call]], None]:
        """What the executor calls instead of :meth:`submit` once :meth:`start` returned: ``submit``
        itself, or that of the transport this one hands every call to (it never changes after start)."""
        return self.submit

    def reconcile(self, calls: Sequence[Call]) -> None:
        """A :meth:`submit` on the caller's thread was cut short by a signal handler's exception (Ctrl-C)
        at an unknown point; ``calls`` are every call the executor has in flight, in the order they were
        numbered. Submit those this transport never received, and make sure each one it did receive runs
        or is reported: never twice beyond ``max_retries``, never lost. Called right away, on that thread
        (Ctrl-C held off), before any later call is submitted: the calls never received are the newest
        ``submit`` was given, which tells them from calls settled meanwhile.

        The default does nothing: right for a transport whose ``submit`` records each call in one step
        that cannot be cut in half."""
        return None

    def broadcast_targets(self, timeout: float) -> list[str]:
        """The names of the workers that take this executor's calls now: the targets of a broadcast, to be
        submitted as calls with ``Call.worker`` set. A transport that cannot address one worker raises
        ``NotImplementedError`` saying why."""
        raise NotImplementedError(f"the transport {self.url or type(self).__name__!r} cannot run a call on "
                                  f"one chosen worker, so it cannot broadcast")

    def query_status(self, timeout: float) -> dict[str, Any]:
        """The cluster's view, as ``remote-executor status`` prints it (``Backend.status``)."""
        raise NotImplementedError(f"the transport {self.url or type(self).__name__!r} has no status query")


class ForwardingTransport(ClientTransport):
    """A transport that starts servers or workers of its own, then hands every call to a client of them
    (``_client``, set in ``start``): the embedded cluster, an SSH cluster."""

    _client: ClientTransport | None = None

    def _started(self) -> ClientTransport:
        if self._client is None:
            raise RuntimeError(f"{type(self).__name__} was not started")
        return self._client

    def submit(self, calls: Sequence[Call]) -> None:
        self._started().submit(calls)

    def submitter(self) -> Callable[[Sequence[Call]], None]:
        if type(self).submit is not ForwardingTransport.submit:  # a subclass that does more in submit()
            return self.submit
        return self._started().submitter()

    def reconcile(self, calls: Sequence[Call]) -> None:
        self._started().reconcile(calls)

    def broadcast_targets(self, timeout: float) -> list[str]:
        return self._started().broadcast_targets(timeout)

    def query_status(self, timeout: float) -> dict[str, Any]:
        return self._started().query_status(timeout)


def decode_result(status: Status, parts: Parts,
                  on_output: Callable[[Output], object] | None = None) -> tuple[bool, Any]:
    """``(True, value)`` or ``(False, exception)`` for a result a transport reported.

    For a chunk the value is ``(values, exception_or_None)``. What the call printed, if its worker captured
    it (``forward_output``), goes to ``on_output`` first.
    """
    if status == Status.DONE:
        return decode_outcome(parts, on_output)
    if status == Status.WORKER_LOST:
        return False, worker_lost_error(parts)
    if status == Status.TIMED_OUT:
        return False, timed_out_error(parts)
    return False, BrokenRemoteExecutor(bytes(parts[0]).decode(errors="replace") if parts else "rejected")


# --- the worker side ------------------------------------------------------------------------------------


@dataclass
class WorkerSettings:
    """What a backend's worker loop needs to know: where to connect, how, and when to stop."""

    url: str
    name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    key: bytes | None = None
    insecure: bool = False  # no key was given and none is wanted (never the per-user key)
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 10.0
    reconnect_timeout: float = float("inf")
    connect_timeout: float = 10.0
    drain: SignalEvent = field(default_factory=SignalEvent)  # set by SIGTERM: finish, then exit
    serving: threading.Event = field(default_factory=threading.Event)  # set by the loop at its first handshake
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific (TLS or CURVE files), as Options.extra
    pool: str | None = None  # the worker pool to serve (None: the URL's path, else the default pool)

    def __post_init__(self) -> None:
        self.key = normalize_key(self.key)  # the one rule for keys: a worker and its clients agree on it


class WorkerCore:
    """Runs calls for any number of executors; remembers which initializers ran (and how).

    Every backend's worker loop hands it the parts of INIT and TASK messages; it never raises."""

    def __init__(self, name: str | None = None) -> None:
        self._init_failures: dict[int, Parts | None] = {}  # executor id -> None (ok) or error outcome
        # How this worker signs the output it forwards to clients that ask for it.
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"

    def initialize(self, executor_id: int, parts: Parts) -> Parts | None:
        """Run an executor's initializer once per process; its error outcome if it raised."""
        if executor_id not in self._init_failures:
            self._init_failures[executor_id] = run_initializer(parts)
            if self._init_failures[executor_id] is not None:
                log.error("initializer of executor %x failed", executor_id)
        return self._init_failures[executor_id]

    def run(self, executor_id: int, parts: Parts, limit: float | None = None,
            on_timeout: Callable[[], object] | None = None) -> Parts:
        """The serialized outcome of one call (or chunk); never raises.

        With a ``limit`` (seconds), a call still running then is stopped by ending this process: first
        ``on_timeout()`` reports it (from another thread), then the process exits with
        :data:`EXIT_TIMED_OUT` and its supervisor starts a fresh one. A thread cannot be stopped from outside
        in Python; a process can, and the call's leftovers (locks, half-written state) go with it."""
        return self.run_reporting(executor_id, parts, limit, on_timeout)[0]

    def run_reporting(self, executor_id: int, parts: Parts, limit: float | None = None,
                      on_timeout: Callable[[], object] | None = None) -> tuple[Parts, bool]:
        """:meth:`run`, and whether the outcome is an error (what a worker reports as a failed call)."""
        if self._init_failures.get(executor_id) is not None:
            return error_outcome(InitializerFailed(INITIALIZER_FAILED)), True
        if limit is None:
            return run_task_reporting(parts, self.name)
        with _Watchdog(limit, on_timeout):
            return run_task_reporting(parts, self.name)


class _Watchdog:
    """Ends this process if the block it guards is still running after ``limit`` seconds."""

    def __init__(self, limit: float, on_timeout: Callable[[], object] | None) -> None:
        self._limit = limit
        self._on_timeout = on_timeout
        self._lock = threading.Lock()  # the block's end and the timer's firing: exactly one of them wins
        self._finished = False
        self._timer = threading.Timer(limit, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> None:
        self._timer.start()
        with contextlib.suppress(Exception):  # no usable stderr: the watchdog thread alone will do
            faulthandler.dump_traceback_later(self._limit + HARD_STOP_GRACE, exit=True)

    def __exit__(self, *exc: object) -> None:
        with self._lock:  # blocks for good if the timer fired: the process is exiting
            self._finished = True
        self._timer.cancel()
        faulthandler.cancel_dump_traceback_later()

    def _fire(self) -> None:
        with self._lock:
            if self._finished:
                return
            log.info("a call ran past its time limit of %gs: stopping this worker process", self._limit)
            try:
                if self._on_timeout is not None:
                    self._on_timeout()
            except BaseException:  # the exit below matters more than a report that could not be sent
                log.exception("could not report the timed-out call")
            finally:
                logging.shutdown()
                os._exit(EXIT_TIMED_OUT)


# --- servers and backends -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """How a standalone job server (``remote-executor server URL``) runs."""

    key: bytes | None = None
    insecure: bool = False  # listen on a non-loopback address without a key
    limits: Limits = DEFAULT_LIMITS
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 10.0
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific (e.g. a CURVE secret key file)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", normalize_key(self.key))  # frozen: set once, here


class JobServer(Protocol):
    """A job server of ours, standalone or embedded."""

    @property
    def url(self) -> str: ...

    def serve_forever(self) -> None:
        """Serve in this thread until :meth:`stop`."""

    def start(self) -> None:
        """Serve on a thread of its own."""

    def stop(self) -> None:
        """Stop serving and release every socket; idempotent."""


class EmbeddedServer(abc.ABC):
    """The job server of one executor's local cluster, and what its local workers need to join it."""

    url: str = ""

    @abc.abstractmethod
    def start(self) -> None:
        """Start serving; return once workers can connect (raise TransportError if it cannot start), or,
        for a server that takes a while to start, as soon as its :attr:`url` is known: the local workers then
        start meanwhile and :meth:`wait_started` waits for the rest."""

    def wait_started(self) -> None:
        """Return once the server accepts workers, at :attr:`url` (which may have changed since
        :meth:`start` returned); raise TransportError if it could not start."""
        return  # a server whose start() waits until it accepts workers has nothing left to wait for

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop serving; idempotent."""

    @abc.abstractmethod
    def client(self, options: Options) -> ClientTransport:
        """The executor's transport to this server (not started yet)."""

    def worker_env(self) -> dict[str, str]:
        """Environment for the worker processes (secrets travel here, never on a command line)."""
        return {}

    def attached_workers(self) -> int | None:
        """How many local workers can take calls now; None if this server cannot tell (the executor's
        constructor then returns without waiting for them)."""
        return None

    def worker_args(self) -> tuple[str, ...]:
        """Extra arguments for ``python -m remote_executor.worker URL``."""
        return ()

    def on_hung_worker(self, kill: Callable[[int | str, float | None], object]) -> None:
        """Call ``kill(pid, None)`` or ``kill(name, since)`` (the pid the worker announced, or its
        ``--name`` and a ``time.monotonic()`` it has been running since) when the server gives up a worker
        as hung (a process stuck in C code never notices its lost connection): the cluster kills it if it is
        one of its own and starts another. A server that cannot tell which process hung ignores this."""
        return None

    def on_silent_worker(self, computing: Callable[[int], bool]) -> None:
        """Before giving up a worker that runs a call and has sent no heartbeat for the heartbeat timeout,
        ask ``computing(pid)``: True (its process is on a CPU, in a call that holds the interpreter lock)
        keeps it. A server that does not judge its workers by heartbeats ignores this."""
        return None


class Backend(abc.ABC):
    """Everything one URL scheme provides. Subclass it and register it under the entry-point group
    ``remote_executor.transports`` (``toy = "my_pkg.toy:ToyBackend"``): the executor, the embedded cluster,
    ``remote-executor server|worker|status|ping`` and the worker process then all know the scheme.

    Only :meth:`client` is required; the other methods raise :class:`TransportError` unless overridden."""

    scheme: ClassVar[str]
    in_process: ClassVar[bool] = False  # True: the bare scheme runs in this process (no cluster, no workers)
    # The keyword arguments of RemoteExecutor this scheme's client understands (Options.extra); another is a
    # TypeError naming it, as a misspelt argument of any function is. None: the backend does not say (any).
    client_options: ClassVar[frozenset[str] | None] = None
    # True: the embedded server listens at its final url from its creation and starts no thread before
    # start(), so its local workers may connect first (they wait in its listen backlog): the cluster then
    # starts them before the server, forked from the executor's own process where that is safe.
    embedded_listens_first: ClassVar[bool] = False
    # True: the worker processes of one supervisor (the embedded cluster, ``worker --processes N``) share a
    # private directory, named by SIBLINGS_DIR_ENV in their environment (gearman: start records).
    sibling_records: ClassVar[bool] = False
    # Why stop(..., workers=True) is refused (a usage error of `remote-executor stop --workers`), if it is.
    cannot_stop_workers: ClassVar[str | None] = None

    @abc.abstractmethod
    def client(self, url: str, options: Options) -> ClientTransport:
        """A transport that connects to the running cluster at ``url`` (not started yet)."""

    def check_url(self, url: str) -> None:
        """Raise :class:`TransportError` saying what is wrong with a ``url`` this scheme cannot use; the
        command line calls it before anything starts (a usage error). The default accepts any."""
        return None

    def embedded_server(self, options: Options, session: Session, workers: int) -> EmbeddedServer:
        """The server of a local cluster for ``RemoteExecutor(transport=SCHEME)`` (not started yet)."""
        raise TransportError(f"the {self.scheme!r} transport has no embedded cluster: give a {self.scheme}:// URL")

    def server(self, url: str, settings: ServerSettings) -> JobServer:
        """A standalone job server listening at ``url`` (``remote-executor server URL``)."""
        raise TransportError(f"{self.scheme}:// has no job server of ours")

    def run_worker(self, settings: WorkerSettings, core: WorkerCore) -> int:
        """Serve ``settings.url`` until drained (0), unreachable (1) or refused (2): the worker process."""
        raise TransportError(f"{self.scheme}:// has no worker loop")

    def status(self, url: str, options: Options) -> dict[str, Any]:
        """The cluster's view (workers, clients, queues) for ``remote-executor status|ping``."""
        raise TransportError(f"{self.scheme}:// has no status query")

    def stop(self, url: str, options: Options, workers: bool) -> list[dict[str, Any]]:
        """Ask every job server of ``url`` to stop once its running calls have finished (``remote-executor
        stop``), and with ``workers`` to make its workers exit for good; each server's answer."""
        raise TransportError(f"{self.scheme}:// has no job server of ours to stop")
