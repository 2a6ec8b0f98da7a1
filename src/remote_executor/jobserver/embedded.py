"""Our job server as the embedded server of a local cluster, and the executor's in-process link to it.

The server listens on 127.0.0.1 (a free port) for the local workers. The cluster always has a key (the
executor's, else a random one made for this cluster and handed to the workers through their environment),
so another local user who finds the port can neither attach nor send anything that gets parsed. The
executor talks to the server in-process, without a socket hop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..pools import DEFAULT_POOL
from ..security import generate_key, key_to_env
from ..transports.base import (
    Call,
    ClientTransport,
    EmbeddedServer,
    Listener,
    Options,
    ServerSettings,
    Session,
)
from ..wire.frames import DEFAULT_LIMITS, Frame, Kind, Status
from ..wire.messages import oversize
from ..wire.serialization import error_outcome
from .client import ClientSession, ask, worker_names
from .server import LocalLink, ServerCore

ServerFactory = Callable[[ServerSettings], ServerCore]  # settings -> an unstarted server on 127.0.0.1


class EmbeddedJobServer(EmbeddedServer):
    """A job server of ours on loopback for one executor's local workers."""

    def __init__(self, options: Options, make_server: ServerFactory) -> None:
        self.options = options
        self.key = options.key if options.key is not None else generate_key()
        settings = ServerSettings(key=self.key, limits=options.limits(),
                                  heartbeat_interval=options.heartbeat_interval,
                                  heartbeat_timeout=options.heartbeat_timeout)
        self.server = make_server(settings)
        self.url = self.server.url

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def client(self, options: Options) -> ClientTransport:
        return LocalClient(self.server)

    def worker_env(self) -> dict[str, str]:
        return key_to_env(self.key)

    def on_hung_worker(self, kill: Callable[[int | str, float | None], object]) -> None:
        self.server.on_hung_worker = kill

    def on_silent_worker(self, computing: Callable[[int], bool]) -> None:
        self.server.scheduler.computing = computing

    def attached_workers(self) -> int:
        with self.server.drive_lock:  # the server loop changes the scheduler's pools meanwhile
            return self.server.scheduler.capacity  # one slot per local worker process

    def worker_args(self) -> tuple[str, ...]:
        # Local workers never outlive the cluster: no reconnecting to a server that is gone.
        return ("--heartbeat-interval", str(self.options.heartbeat_interval),
                "--heartbeat-timeout", str(self.options.heartbeat_timeout), "--reconnect-timeout", "0",
                "--log-level", "WARNING")  # the executor's own terminal: only what needs attention


class LocalClient(ClientTransport):
    """The executor's transport to a job server in the same process: frames, but no socket."""

    time_limits = True

    def __init__(self, server: ServerCore, pool: str = DEFAULT_POOL) -> None:
        self.url = server.url
        self.pool = pool
        self._server = server
        self._session: ClientSession | None = None
        self._link: LocalLink | None = None
        # The server's limit, as a socket would apply it: only checked when lowered (limits={"max_frame": N}),
        # so the default path costs nothing for it.
        limit = server.limits.max_frame
        self._limit = limit if limit < DEFAULT_LIMITS.max_frame else None

    def start(self, session: Session, listener: Listener) -> None:
        self._session = ClientSession(session, listener, self.url, self.pool)
        self._link = self._server.attach_local(self._session.handle)
        self._link.send([self._session.hello()])

    def submit(self, calls: Sequence[Call]) -> None:
        assert self._session is not None and self._link is not None
        refused: Sequence[tuple[Call, Exception]] = ()
        if self._limit is not None:
            calls, refused = self._split_oversized(calls)
        link = self._link
        self._session.submit_into(calls, link.inbox, link.inbox_lock, link.conn)
        link.poke()
        for call, error in refused:  # after the others are on their way, which keeps them in order
            self._session.listener.on_result(call.task_id, Status.DONE, error_outcome(error))

    def _split_oversized(self, calls: Sequence[Call]) -> tuple[list[Call], list[tuple[Call, Exception]]]:
        """The calls within the server's limit, and the others with their ``FrameTooLargeError``: they fail
        at once, as through a socket (the contract lets ``submit`` report a result)."""
        assert self._limit is not None
        fitting: list[Call] = []
        refused: list[tuple[Call, Exception]] = []
        for call in calls:
            error = oversize(Frame(Kind.SUBMIT, call.task_id, 0, call.parts), True, self._limit,
                             "the call (its function and arguments)")
            if error is None:
                fitting.append(call)
            else:
                refused.append((call, error))
        return fitting, refused

    def reconcile(self, calls: Sequence[Call]) -> None:
        assert self._session is not None
        unknown = self._session.unknown(calls)
        if unknown:
            self.submit(unknown)

    def broadcast_targets(self, timeout: float) -> list[str]:
        return worker_names(self._ask(Kind.WORKERS, timeout))

    def query_status(self, timeout: float) -> dict[str, Any]:
        return self._ask(Kind.STATUS, timeout)

    def _ask(self, kind: Kind, timeout: float) -> dict[str, Any]:
        assert self._session is not None and self._link is not None
        link = self._link
        return ask(self._session, lambda frame: link.send([frame]), kind, timeout)

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
