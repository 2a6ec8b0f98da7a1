"""What a backend that speaks our job-server protocol is made of: a channel, and a server class.

The tcp and zmq backends differ only in how frames travel (a :class:`~.client.Channel`, and a
:class:`~.server.ServerCore` subclass that listens); the client, the embedded cluster, the worker loop and
``status`` are the same code, here.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar

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
from ..wire.frames import DEFAULT_LIMITS, Limits
from .client import Connector, JobServerClient, fetch_status
from .embedded import EmbeddedJobServer
from .server import ServerCore
from .worker import run_worker


class JobServerBackend(Backend):
    """A backend for our job server over some kind of connection."""

    server_class: ClassVar[type[ServerCore]]

    @abc.abstractmethod
    def connector(self, url: str, key: bytes | None, extra: Mapping[str, Any], limits: Limits) -> Connector:
        """Opens channels to the first job server of ``url``."""

    def client(self, url: str, options: Options) -> ClientTransport:
        return JobServerClient(url, options, self.connector(url, options.key, options.extra, options.limits()))

    def embedded_server(self, options: Options, session: Session, workers: int) -> EmbeddedServer:
        return EmbeddedJobServer(options, lambda settings, token: self.server_class.from_settings(
            "127.0.0.1", 0, settings, token))

    def server(self, url: str, settings: ServerSettings) -> ServerCore:
        host, port = split_hostports(url)[0]
        return self.server_class.from_settings(host, port, settings)

    def run_worker(self, settings: WorkerSettings, core: WorkerCore) -> int:
        return run_worker(self.connector(settings.url, settings.key, {}, DEFAULT_LIMITS), settings, core)

    def status(self, url: str, options: Options) -> dict[str, Any]:
        return fetch_status(self.connector(url, options.key, options.extra, DEFAULT_LIMITS), options.connect_timeout)
