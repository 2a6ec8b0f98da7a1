"""The embedded default: a job server in this process and N local worker processes on loopback.

``RemoteExecutor()`` and ``RemoteExecutor(transport="tcp")`` run on a :class:`LocalCluster`; the executor
talks to the in-process server without a socket hop, the workers connect over 127.0.0.1 and prove they
belong to this cluster with a random per-cluster token (or, with a key, HMAC on every frame). Everything
is torn down at shutdown, and the workers exit by themselves if this process dies.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

from .jobserver.client import FramedClient
from .jobserver.server import LocalLink
from .security import TOKEN_ENV, key_to_env, new_token
from .supervisor import Supervisor
from .transports.base import Call, ClientTransport, Listener, Options, Session
from .wire.frames import Frame, Limits


class EmbeddableServer(Protocol):
    @property
    def url(self) -> str: ...

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def attach_local(self, deliver: Any) -> LocalLink: ...


def _make_server(scheme: str, key: bytes | None, token: bytes | None, options: Options) -> EmbeddableServer:
    limits = Limits(**options.extra.get("limits", {}))
    kwargs: dict[str, Any] = dict(key=key, token=token, limits=limits,
                                  heartbeat_interval=options.heartbeat_interval,
                                  heartbeat_timeout=options.heartbeat_timeout)
    if scheme == "zmq":
        from .transports.zmq.server import ZmqServer

        return ZmqServer("127.0.0.1", 0, **kwargs)
    from .transports.tcp.server import TcpServer

    return TcpServer("127.0.0.1", 0, **kwargs)


class LocalCluster:
    """A job server (in this process) and ``workers`` worker processes, all on loopback."""

    def __init__(self, scheme: str = "tcp", workers: int | None = None, options: Options | None = None) -> None:
        self.scheme = scheme
        self.options = options or Options()
        self.workers = workers or os.cpu_count() or 1
        self.token = None if self.options.key is not None else new_token()
        self.server = _make_server(scheme, self.options.key, self.token, self.options)
        self.supervisor: Supervisor | None = None

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> LocalCluster:
        self.server.start()
        env = {TOKEN_ENV: self.token.decode()} if self.token else {}
        env.update(key_to_env(self.options.key))
        args = ("--heartbeat-interval", str(self.options.heartbeat_interval),
                "--heartbeat-timeout", str(self.options.heartbeat_timeout), "--reconnect-timeout", "0")
        self.supervisor = Supervisor(self.url, self.workers, env=env, worker_args=args, name="local-worker")
        self.supervisor.start()
        return self

    def stop(self) -> None:
        """Stop the workers, then the server. Idempotent."""
        if self.supervisor is not None:
            self.supervisor.stop()
        self.server.stop()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class EmbeddedTransport(ClientTransport):
    """A client transport over an in-process :class:`LocalCluster`."""

    def __init__(self, scheme: str, options: Options) -> None:
        self.url = scheme
        self.cluster = LocalCluster(scheme, options.max_workers, options)
        self._client: FramedClient | None = None
        self._link: LocalLink | None = None

    def start(self, session: Session, listener: Listener) -> None:
        self.cluster.start()
        self._client = FramedClient(session, listener, self.cluster.url)
        self._link = self.cluster.server.attach_local(self._deliver)
        self._link.send([self._client.hello(self.cluster.token)])

    def _deliver(self, frame: Frame) -> None:
        assert self._client is not None
        self._client.handle(frame)

    def submit(self, calls: Sequence[Call]) -> None:
        assert self._client is not None and self._link is not None
        self._link.send(self._client.submit_frames(calls))

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
        self.cluster.stop()
