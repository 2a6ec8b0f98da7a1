"""Our job server as the embedded server of a local cluster, and the executor's in-process link to it.

The server listens on 127.0.0.1 (a free port) for the local workers, which prove they belong to this
cluster with a random per-cluster token (or, with a key, the HMAC on every frame); the executor talks to
the server in-process, without a socket hop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..security import TOKEN_ENV, key_to_env, new_token
from ..transports.base import (
    Call,
    ClientTransport,
    EmbeddedServer,
    Listener,
    Options,
    ServerSettings,
    Session,
)
from ..wire.frames import Frame
from .client import ClientSession
from .server import LocalLink, ServerCore

ServerFactory = Callable[[ServerSettings, "bytes | None"], ServerCore]  # (settings, token) -> unstarted server


class EmbeddedJobServer(EmbeddedServer):
    """A job server of ours on loopback for one executor's local workers."""

    def __init__(self, options: Options, make_server: ServerFactory) -> None:
        self.options = options
        self.token = None if options.key is not None else new_token()
        settings = ServerSettings(key=options.key, limits=options.limits(),
                                  heartbeat_interval=options.heartbeat_interval,
                                  heartbeat_timeout=options.heartbeat_timeout)
        self.server = make_server(settings, self.token)
        self.url = self.server.url

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def client(self, options: Options) -> ClientTransport:
        return LocalClient(self.server, self.token)

    def worker_env(self) -> dict[str, str]:
        env = {TOKEN_ENV: self.token.decode()} if self.token is not None else {}
        env.update(key_to_env(self.options.key))
        return env

    def worker_args(self) -> tuple[str, ...]:
        # Local workers never outlive the cluster: no reconnecting to a server that is gone.
        return ("--heartbeat-interval", str(self.options.heartbeat_interval),
                "--heartbeat-timeout", str(self.options.heartbeat_timeout), "--reconnect-timeout", "0")


class LocalClient(ClientTransport):
    """The executor's transport to a job server in the same process: frames, but no socket."""

    def __init__(self, server: ServerCore, token: bytes | None) -> None:
        self.url = server.url
        self._server = server
        self._token = token
        self._session: ClientSession | None = None
        self._link: LocalLink | None = None

    def start(self, session: Session, listener: Listener) -> None:
        self._session = ClientSession(session, listener, self.url)
        self._link = self._server.attach_local(self._deliver)
        self._link.send([self._session.hello(self._token)])

    def _deliver(self, frame: Frame) -> None:
        assert self._session is not None
        self._session.handle(frame)

    def submit(self, calls: Sequence[Call]) -> None:
        assert self._session is not None and self._link is not None
        self._link.send(self._session.submit_frames(calls))

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
