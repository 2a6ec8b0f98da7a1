"""What a backend that speaks our job-server protocol is made of: a channel, and a server class.

The tcp and zmq backends differ only in how frames travel (a :class:`~.client.Channel`, and a
:class:`~.server.ServerCore` subclass that listens); the client, the embedded cluster, the worker loop and
``status`` are the same code, here.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import ConnectionFailedError, RemoteExecutorError, TransportError
from ..pools import pool_of_url
from ..transports import split_hostports
from ..transports.base import (
    Backend,
    ClientTransport,
    EmbeddedServer,
    Options,
    ServerSettings,
    Session,
    WorkerCore,
    WorkerSettings,
)
from ..wire.frames import DEFAULT_LIMITS, Frame, Kind, Limits
from .client import Connector, JobServerClient, admin_request, fetch_status

if TYPE_CHECKING:  # a worker process never runs a server: it does not import one (nor the scheduler)
    from .server import ServerCore


class JobServerBackend(Backend):
    """A backend for our job server over some kind of connection."""

    @property
    @abc.abstractmethod
    def server_class(self) -> type[ServerCore]:
        """The server this backend runs (a plain class attribute will do; the built-in backends import it
        only when asked, so a worker process starts without the server and its scheduler)."""

    @abc.abstractmethod
    def connector(self, url: str, key: bytes | None, extra: Mapping[str, Any], limits: Limits) -> Connector:
        """Opens channels to the job server at ``url`` (one ``scheme://host:port``)."""

    def servers(self, url: str, key: bytes | None, extra: Mapping[str, Any],
                limits: Limits = DEFAULT_LIMITS) -> list[tuple[str, Connector]]:
        """Each job server of ``scheme://h1:p1,h2:p2``: its own URL and how to open a channel to it."""
        urls = [f"{self.scheme}://[{host}]:{port}" if ":" in host else f"{self.scheme}://{host}:{port}"
                for host, port in split_hostports(url)]
        return [(one, self.connector(one, key, extra, limits)) for one in urls]

    def check_url(self, url: str) -> None:
        split_hostports(url)
        pool_of_url(url)  # (a bad pool name)

    def client(self, url: str, options: Options) -> ClientTransport:
        return JobServerClient(url, options, self.servers(url, options.key, options.extra, options.limits()))

    def embedded_server(self, options: Options, session: Session, workers: int) -> EmbeddedServer:
        from .embedded import EmbeddedJobServer

        return EmbeddedJobServer(options, lambda settings: self.server_class.from_settings("127.0.0.1", 0, settings))

    def server(self, url: str, settings: ServerSettings) -> ServerCore:
        host, port = one_address(url)
        return self.server_class.from_settings(host, port, settings)

    def run_worker(self, settings: WorkerSettings, core: WorkerCore) -> int:
        """The worker loop, with the backend's options from ``settings.extra`` (TLS or CURVE files)."""
        from .worker import run_worker  # only worker processes need it

        return run_worker(self.servers(settings.url, settings.key, settings.extra), settings, core)

    def status(self, url: str, options: Options) -> dict[str, Any]:
        """One server's status; with several, each one's (or its error) under ``servers``."""
        servers = self.servers(url, options.key, options.extra)
        if len(servers) == 1:
            return fetch_status(servers[0][1], options.key, options.connect_timeout)
        found: list[dict[str, Any]] = []
        for one, connect in servers:
            try:
                found.append(fetch_status(connect, options.key, options.connect_timeout))
            except RemoteExecutorError as exc:
                found.append({"server": one, "error": str(exc)})
        if all("error" in entry for entry in found):
            raise ConnectionFailedError("; ".join(entry["error"] for entry in found))
        return {"url": url, "servers": found}

    def stop(self, url: str, options: Options, workers: bool) -> list[dict[str, Any]]:
        """STOP every server of ``url`` (each answers at once; it stops when its running calls are done)."""
        return [admin_request(connect, options.key, Frame(Kind.STOP, b=int(workers)), options.connect_timeout)
                for _, connect in self.servers(url, options.key, options.extra)]


def one_address(url: str) -> tuple[str, int]:
    """The one address a job server of ours listens on (``tcp://h1:1,h2:2`` is a client's list of servers)."""
    addresses = split_hostports(url)
    if len(addresses) > 1:
        raise TransportError(f"a job server listens on one address, not {len(addresses)}: start one "
                             f"`remote-executor server` per address of {url}")
    return addresses[0]
