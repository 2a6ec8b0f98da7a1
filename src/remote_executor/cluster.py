"""The embedded default: a job server started for one executor and N local worker processes, any backend.

``RemoteExecutor()`` (tcp), ``transport="zmq"`` and ``transport="gearman"`` all run on a :class:`LocalCluster`:
the backend supplies the server (our job server in this process, or a private gearmand) and what its
workers need to join it; this module starts the supervised worker processes, hands the executor its
transport, and tears everything down at shutdown. The workers exit by themselves if this process dies.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from . import forkhere, forkserver
from .errors import BrokenRemoteExecutor, TransportError
from .supervisor import Supervisor
from .transports import UnknownSchemeError, get_backend, scheme_of
from .transports.base import (
    Backend,
    ClientTransport,
    EmbeddedServer,
    ForwardingTransport,
    Listener,
    Options,
    Session,
    Status,
)
from .wire.serialization import Parts

DEFAULT_SCHEME = "tcp"
# The built-in schemes whose bare name starts local workers, and their Backend.embedded_listens_first (known
# here without importing the backend, so that the fork server starts before that import, not after it).
_FORKED_SCHEMES = {"tcp": True, "zmq": False, "gearman": False}


def make_transport(spec: str | ClientTransport | None, options: Options) -> ClientTransport:
    """Resolve what ``RemoteExecutor(transport=...)`` was given: None or a bare scheme (an embedded local
    cluster), a URL (a running cluster) or a transport object (used as it is)."""
    method = _start_method(options.start_method)
    if isinstance(spec, ClientTransport):
        if options.start_method is not None:
            raise ValueError("start_method is for an embedded cluster (RemoteExecutor() or a bare scheme); "
                             "a transport object has no local workers to start")
        return spec
    url = DEFAULT_SCHEME if spec is None else spec
    if not isinstance(url, str):
        raise TypeError(f"transport must be None, a URL string or a ClientTransport, not {type(url).__name__}")
    scheme = scheme_of(url)
    embedded = "://" not in url
    if embedded and scheme in _FORKED_SCHEMES and method != "spawn" and not (
            method == "fork" and _FORKED_SCHEMES[scheme] and forkhere.possible()):
        # Started first, so that it imports the worker modules while this process imports the backend and
        # starts the job server (unless the first workers will be forked from this process).
        forkserver.shared(scheme)
    try:
        backend = get_backend(scheme)
    except UnknownSchemeError as exc:
        if not embedded:
            raise
        if any(mark in url for mark in ":/"):  # "host:5555", "[::1]:5555": a URL without its scheme://
            raise UnknownSchemeError(f"expected a URL like tcp://host:port, got {url!r}") from None
        if "did you mean" in str(exc):  # a typo of a scheme ("tpc")
            raise
        # RemoteExecutor(4, "prefix"): ThreadPoolExecutor's second positional argument is thread_name_prefix
        raise UnknownSchemeError(f"{exc} (the second positional argument of RemoteExecutor is the transport; "
                                 f"ThreadPoolExecutor's thread_name_prefix is a keyword argument here)") from None
    _check_options(backend, options)
    if not embedded or backend.in_process:
        if options.start_method is not None:
            raise ValueError(f"start_method is for an embedded cluster (RemoteExecutor() or a bare scheme); "
                             f"{url!r} has no local workers to start")
        return backend.client(url, options)
    return EmbeddedTransport(backend, options)


START_METHODS = ("forkserver", "spawn", "fork")


def _start_method(method: str | None) -> str:
    if method is None:
        return "forkserver"
    if method not in START_METHODS:
        raise ValueError(f"start_method must be one of {', '.join(map(repr, START_METHODS))}, not {method!r}")
    return method


def _check_options(backend: Backend, options: Options) -> None:
    """A keyword argument no part of this transport reads is a mistake (a typo: ``tranport=``), not an
    option to ignore silently."""
    known = backend.client_options
    if known is None:
        return
    unknown = sorted(set(options.extra) - known)
    if not unknown:
        return
    from difflib import get_close_matches

    hints = [f"{name!r} (did you mean {close[0]!r}?)" if (close := get_close_matches(name, [*known, *_PARAMETERS], 1))
             else repr(name) for name in unknown]
    raise TypeError(f"RemoteExecutor() got unexpected keyword argument(s) {', '.join(hints)} for the "
                    f"{backend.scheme} transport (its options: {', '.join(sorted(known)) or 'none'})")


# RemoteExecutor's own keyword arguments, for the hint when one is misspelt.
_PARAMETERS = ("transport", "max_workers", "initializer", "initargs", "key", "key_file", "insecure", "max_retries",
               "heartbeat_interval", "heartbeat_timeout", "reconnect_timeout", "connect_timeout", "call_timeout",
               "no_workers_warning", "forward_output", "prefetch", "start_method")


class LocalCluster:
    """A backend's embedded server and ``workers`` supervised worker processes, all on loopback."""

    def __init__(self, backend: Backend, workers: int | None, options: Options, session: Session) -> None:
        self.backend = backend
        self.options = options
        self.workers = workers or os.cpu_count() or 1
        self.start_method = _start_method(options.start_method)
        self.server: EmbeddedServer = backend.embedded_server(options, session, self.workers)
        self.supervisor: Supervisor | None = None

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> LocalCluster:
        if self.start_method == "fork" and self.backend.embedded_listens_first and forkhere.possible():
            return self._start_forked_here()
        self.server.start()
        try:
            launched = self.server.url
            self.supervisor = self._supervise(launched)  # the workers retry until the server accepts them
            self.server.wait_started()
            if self.server.url != launched:  # it had to move to another port: the workers follow
                self.supervisor.stop()
                self.supervisor = self._supervise(self.server.url)
            self._wait_ready(self.options.connect_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_forked_here(self) -> LocalCluster:
        """Fork the workers from this process before the server's loop thread starts (the only thread then
        is the caller's: see :mod:`.forkhere`), then start it."""
        try:
            self.supervisor = self._supervise(self.server.url, fork_here=True)
            self.server.start()
            self._wait_ready(self.options.connect_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _supervise(self, url: str, *, fork_here: bool = False) -> Supervisor:
        supervisor = Supervisor(url, self.workers, env=self.server.worker_env(), worker_args=self.server.worker_args(),
                                name=self.options.worker_name, fork_here=fork_here,
                                fork_server=None if self.start_method == "spawn" else self.backend.scheme,
                                sibling_records=self.backend.sibling_records)
        supervisor.start()
        self.server.on_hung_worker(supervisor.kill_hung)
        self.server.on_silent_worker(supervisor.computing)
        return supervisor

    def _wait_ready(self, timeout: float) -> None:
        """Return once every worker can take calls, so the first calls run at once (and
        ``shutdown(cancel_futures=True)`` right after them cancels only what a thread pool would have);
        a clear error if they cannot start. The wait is the workers' own start-up, nothing added."""
        assert self.supervisor is not None
        deadline = time.monotonic() + timeout
        changed = self.supervisor.changed
        while True:
            changed.clear()  # before looking: a change from now on ends the wait below at once
            attached = self.server.attached_workers()
            if attached is None or attached >= self.workers:
                return
            exits = [(name, code) for name, code in self.supervisor.exits if code != 0]
            if exits or time.monotonic() > deadline:
                why = ("; ".join(f"{name} exited with status {code}" for name, code in exits[:3])
                       + " (its error output is above)") if exits else f"not within {timeout:g}s"
                raise TransportError(f"the local {self.backend.scheme} cluster's worker processes did not start: "
                                     f"{attached} of {self.workers} attached, {why}")
            # A worker says it serves once the server has counted it (before answering its handshake), and
            # an exit is announced too: the timeout only covers a server that would count a worker later.
            changed.wait(0.05)

    def stop(self) -> None:
        """Stop the workers, then the server. Idempotent."""
        if self.supervisor is not None:
            self.supervisor.stop()
        self.server.stop()


class _CapacityWatch:
    """The executor's listener, passed through; ``reached`` is set once the capacity reported is ``wanted``."""

    def __init__(self, listener: Listener, wanted: int) -> None:
        self._listener = listener
        self._wanted = wanted
        self.reached = threading.Event()
        # Every call's report goes straight to the executor, not through a method of ours that passes it on.
        self.on_result: Callable[[int, Status, Parts], None] = listener.on_result
        self.on_started: Callable[[int], None] = listener.on_started

    def on_capacity(self, slots: int) -> None:
        self._listener.on_capacity(slots)
        if slots >= self._wanted:
            self.reached.set()

    def on_broken(self, error: BrokenRemoteExecutor) -> None:
        self._listener.on_broken(error)
        self.reached.set()


class EmbeddedTransport(ForwardingTransport):
    """``RemoteExecutor(transport=SCHEME)``: a :class:`LocalCluster` and the executor's client of it."""

    def __init__(self, backend: Backend, options: Options) -> None:
        self.url = backend.scheme
        self._backend = backend
        self._options = options
        self.cluster: LocalCluster | None = None
        self._client: ClientTransport | None = None

    def start(self, session: Session, listener: Listener) -> None:
        self.cluster = LocalCluster(self._backend, self._options.max_workers, self._options, session).start()
        self._client = self.cluster.server.client(self._options)
        ready = _CapacityWatch(listener, self.cluster.workers)
        self._client.start(session, ready)
        # The workers are attached; the executor learns so from the server asynchronously: wait for that
        # too, else its first calls would still find no capacity.
        if not ready.reached.wait(self._options.connect_timeout):
            raise TransportError(f"the local {self._backend.scheme} cluster's server did not report its "
                                 f"{self.cluster.workers} worker(s) within {self._options.connect_timeout:g}s")
        self.time_limits = self._client.time_limits

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self.cluster is not None:
            self.cluster.stop()
