"""The tcp backend: ``tcp`` (embedded cluster) and ``tcp://host:port`` (a running job server). Standard
library only.

Our job-server protocol (:mod:`remote_executor.jobserver`) over plain TCP sockets: the job server is
:class:`.server.TcpServer` (one selector loop); clients and workers talk to it through
:class:`.stream.TcpChannel`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...errors import TransportError
from ...jobserver.backend import JobServerBackend
from ...jobserver.client import Channel, Connector
from ...wire.frames import Limits
from .. import split_hostports
from ..base import ServerSettings
from .server import TcpServer
from .stream import TcpChannel

__all__ = ["TcpBackend", "TcpServer"]


class TcpBackend(JobServerBackend):
    scheme = "tcp"
    server_class = TcpServer

    def connector(self, url: str, key: bytes | None, extra: Mapping[str, Any], limits: Limits) -> Connector:
        address = split_hostports(url)[0]

        def connect(timeout: float) -> Channel:
            return TcpChannel.connect(address, key, limits, url, timeout)

        return connect

    def server(self, url: str, settings: ServerSettings) -> TcpServer:
        if settings.extra:
            raise TransportError(f"tcp:// servers take no option {', '.join(map(repr, settings.extra))}")
        server = super().server(url, settings)
        assert isinstance(server, TcpServer)
        return server
