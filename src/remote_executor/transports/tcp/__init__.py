"""The tcp backend: ``tcp`` (embedded cluster) and ``tcp://host:port`` (a running job server). Standard
library only.

Our job-server protocol (:mod:`remote_executor.jobserver`) over plain TCP sockets, or TLS when the options
say so (``tls_ca``, ``tls_cert``, ``tls_key``, ``tls``; see :mod:`remote_executor.tls`): the job server is
:class:`.server.TcpServer` (one selector loop); clients and workers talk to it through
:class:`.stream.TcpChannel` (:class:`.stream.TlsChannel`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ...errors import TransportError
from ...jobserver.backend import JobServerBackend
from ...jobserver.client import Channel, Connector
from ...tls import TlsConfig
from ...wire.frames import Limits
from .. import split_hostports
from ..base import EmbeddedServer, Options, ServerSettings, Session
from .stream import TcpChannel

if TYPE_CHECKING:
    from .server import TcpServer

__all__ = ["TcpBackend", "TcpServer"]

# What ServerSettings.extra may hold for a tcp:// server (TcpServer's keyword arguments).
SERVER_OPTIONS = frozenset({"tls", "tls_cert", "tls_key", "tls_ca", "max_handshaking", "handshake_timeout"})


class TcpBackend(JobServerBackend):
    scheme = "tcp"
    client_options = frozenset({"limits", "pool", "tls", "tls_ca", "tls_cert", "tls_key"})
    embedded_listens_first = True  # TcpServer binds in its constructor; its loop thread starts with start()

    @property
    def server_class(self) -> type[TcpServer]:
        from .server import TcpServer  # a worker never needs it

        return TcpServer

    def connector(self, url: str, key: bytes | None, extra: Mapping[str, Any], limits: Limits) -> Connector:
        address = split_hostports(url)[0]
        tls = TlsConfig.from_options(extra)
        if tls is None:
            def connect(timeout: float) -> Channel:
                return TcpChannel.connect(address, key, limits, url, timeout)

            return connect

        from .tlsstream import TlsChannel  # ssl only for TLS

        context = tls.client_context()  # loads the files now: a bad one fails the executor's construction

        def connect_tls(timeout: float) -> Channel:
            return TlsChannel.connect_tls(address, key, limits, url, timeout, context)

        return connect_tls

    def embedded_server(self, options: Options, session: Session, workers: int) -> EmbeddedServer:
        if TlsConfig.from_options(options.extra) is not None:
            raise TransportError("TLS is for a running cluster (tcp://HOST:PORT); the embedded cluster's server "
                                 "and workers talk over loopback only")
        return super().embedded_server(options, session, workers)

    def server(self, url: str, settings: ServerSettings) -> TcpServer:
        unknown = sorted(set(settings.extra) - SERVER_OPTIONS)
        if unknown:
            raise TransportError(f"tcp:// servers take no option {', '.join(map(repr, unknown))}")
        server = super().server(url, settings)
        assert isinstance(server, self.server_class)
        return server


def __getattr__(name: str) -> Any:
    if name == "TcpServer":  # imported when asked for (see TcpBackend.server_class)
        from .server import TcpServer

        return TcpServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
