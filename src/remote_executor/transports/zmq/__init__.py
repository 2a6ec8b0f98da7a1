"""The zmq backend: ``zmq`` (embedded cluster) and ``zmq://host:port`` (a running job server).

Our job-server protocol (:mod:`remote_executor.jobserver`) over ZeroMQ: the job server is
:class:`.server.ZmqServer` (a ROUTER socket); clients and workers talk to it through
:class:`.sockets.ZmqChannel` (a DEALER socket per session). ``pip install 'remote-executor[zmq]'``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ...jobserver.backend import JobServerBackend
from ...jobserver.client import Channel, Connector
from ...wire.frames import Limits
from .. import split_hostports
from .sockets import Curve, ZmqChannel

if TYPE_CHECKING:
    from .server import ZmqServer

__all__ = ["Curve", "ZmqBackend", "ZmqServer"]


class ZmqBackend(JobServerBackend):
    scheme = "zmq"
    client_options = frozenset({"limits", "pool", "curve_server_key", "curve_client_key"})

    @property
    def server_class(self) -> type[ZmqServer]:
        from .server import ZmqServer  # a worker never needs it

        return ZmqServer

    def connector(self, url: str, key: bytes | None, extra: Mapping[str, Any], limits: Limits) -> Connector:
        """CURVE from ``curve_server_key`` in ``extra`` (else ``$REMOTE_EXECUTOR_CURVE_SERVER_KEY``), with
        this side's key pair from ``curve_client_key`` (else an ephemeral one). Key files are read here,
        once, so a bad one fails at construction."""
        address = split_hostports(url)[0]
        curve = Curve.from_options(extra)

        def connect(timeout: float) -> Channel:
            return ZmqChannel.connect(address, key, limits, curve, url)

        return connect


def __getattr__(name: str) -> Any:
    if name == "ZmqServer":  # imported when asked for (see ZmqBackend.server_class)
        from .server import ZmqServer

        return ZmqServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
