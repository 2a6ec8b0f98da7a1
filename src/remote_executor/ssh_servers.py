"""The job server of an SSH cluster, per transport, with the wire encrypted wherever the transport can.

- ``tcp``: our job server with TLS. A private CA and a server certificate are made for the cluster; the
  workers verify the server against that CA (its certificate reaches them on the SSH session's standard
  input, after the key) and prove who they are with the key, as every peer of a keyed server does.
- ``zmq``: our job server with CURVE. A key pair is made for the cluster; the workers get its public key
  on their command line (it is public) and make an ephemeral key pair of their own.
- ``gearman``: gearmand, here or started over SSH on a host (``remote-executor gearmand``, which ends with
  its session); every job and result is sealed with the key (AES-GCM), since gearmand authenticates nobody.

Our servers' material lives in a private directory (0700) that :meth:`ClusterServer.stop` deletes; a client
elsewhere on this machine (``remote-executor cluster up``) finds it through :attr:`client_options`.
"""

from __future__ import annotations

import abc
import base64
import logging
import shlex
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TransportError
from .jobserver.server import ServerCore
from .privatedirs import PrivateDir
from .transports.base import ClientTransport, Options

SCHEMES = ("tcp", "zmq", "gearman")
GEARMAND_PORT = 4730
GEARMAND_START_TIMEOUT = 60.0

log = logging.getLogger("remote_executor.ssh")


@dataclass
class ClusterServer(abc.ABC):
    """A started job server, and what its workers and outside clients need to reach it securely."""

    url: str
    material: PrivateDir  # certificates and keys, deleted at stop
    worker_args: list[str] = field(default_factory=list)  # for the remote `remote-executor worker` command
    stdin_lines: list[bytes] = field(default_factory=list)  # sent after the key line, never on a command line
    client_options: dict[str, str] = field(default_factory=dict)  # transport options for clients elsewhere

    @abc.abstractmethod
    def workers(self) -> list[dict[str, Any]]:
        """The workers attached now: ``name`` (as the worker command named them) and ``draining``."""

    @abc.abstractmethod
    def status(self) -> dict[str, Any]:
        """What ``remote-executor status`` shows for this server."""

    @abc.abstractmethod
    def client(self, pool: str, options: Options) -> ClientTransport:
        """The transport of an executor of this process whose calls go to ``pool``."""

    @abc.abstractmethod
    def ended(self) -> bool:
        """True once the server stopped on its own (``remote-executor stop``, a crash) rather than by us."""

    def stop(self) -> None:
        self.material.remove()


@dataclass
class JobServer(ClusterServer):
    """Our job server (tcp or zmq) in this process: status read in place, clients linked without a socket."""

    core: ServerCore | None = None

    def workers(self) -> list[dict[str, Any]]:
        return list(self.status().get("workers", []))

    def status(self) -> dict[str, Any]:
        assert self.core is not None
        with self.core.drive_lock:
            status: dict[str, Any] = self.core.scheduler.status()
        return status

    def client(self, pool: str, options: Options) -> ClientTransport:
        from .jobserver.embedded import LocalClient

        assert self.core is not None
        return LocalClient(self.core, pool)

    def ended(self) -> bool:
        return self.core is not None and self.core.stopping.is_set()

    def stop(self) -> None:
        if self.core is not None:
            self.core.stop()
        super().stop()


@dataclass
class Gearmand(ClusterServer):
    """gearmand: a child of this process, or a ``remote-executor gearmand`` in an SSH session on a host."""

    host: str = ""  # where gearmand runs, as ssh names it ("" for this machine)
    process: Any = None  # the local GearmandProcess
    session: subprocess.Popen[bytes] | None = None  # the SSH session of a remote gearmand
    output: list[str] = field(default_factory=list)

    @property
    def address(self) -> tuple[str, int]:
        host, _, port = self.url.removeprefix("gearman://").rpartition(":")
        return host, int(port)

    def workers(self) -> list[dict[str, Any]]:
        from .transports.gearman.connection import GearmanConnectionError, admin_workers

        try:
            found = admin_workers(*self.address, timeout=5.0)
        except (GearmanConnectionError, OSError):
            return []
        return [{"name": w.client_id, "functions": list(w.functions)} for w in found
                if any(f.startswith("remote_executor.") for f in w.functions)]

    def status(self) -> dict[str, Any]:
        from .transports import get_backend

        status = get_backend("gearman").status(self.url, Options())
        status["workers"] = self.workers()
        return status

    def client(self, pool: str, options: Options) -> ClientTransport:
        from .transports import get_backend

        return get_backend("gearman").client(f"{self.url}/{pool}", options)

    def ended(self) -> bool:
        if self.process is not None:
            return not bool(self.process.is_running())
        return self.session is not None and self.session.poll() is not None

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        if self.session is not None:
            if self.session.stdin is not None:
                self.session.stdin.close()  # `remote-executor gearmand --exit-on-stdin-eof` stops gearmand
            try:
                self.session.wait(10)
            except subprocess.TimeoutExpired:
                self.session.kill()
                self.session.wait()
        super().stop()


@dataclass(frozen=True)
class RemoteGearmand:
    """Where an SSH cluster starts gearmand: the host (as ssh names it), the ssh command that runs
    :func:`gearmand_command` there, and the address and port everyone reaches it at."""

    host: str
    argv: list[str]
    address: str
    port: int


def start_cluster_server(scheme: str, address: str, port: int, key: bytes, material: PrivateDir, *,
                         heartbeat_interval: float, heartbeat_timeout: float,
                         gearmand: RemoteGearmand | None = None) -> ClusterServer:
    """Start the job server of ``scheme`` on ``address:port``, encrypted, with its material in ``material``
    (an existing private directory); for gearman, on the host ``gearmand`` names if given."""
    timing: dict[str, Any] = {"heartbeat_interval": heartbeat_interval, "heartbeat_timeout": heartbeat_timeout}
    if scheme == "tcp":
        from .tls import TlsConfig, make_cluster_material
        from .transports.tcp.server import TcpServer

        files = make_cluster_material(Path(material.path), [address])
        # Server-side TLS only: the key already authenticates every worker and client.
        tls = TlsConfig(cert=str(files.server_cert), key=str(files.server_key))
        tcp = TcpServer(address, port, key=key, tls=tls, **timing)
        tcp.start()
        return JobServer(tcp.url, material, ["--tls-ca", "-"], [base64.b64encode(files.ca.read_bytes())],
                         {"tls_ca": str(files.ca)}, core=tcp)
    if scheme == "zmq":
        try:
            import zmq.auth
        except ImportError:
            raise TransportError("an SSH cluster over zmq needs pyzmq: pip install 'remote-executor[zmq]'") from None
        from .transports.zmq.server import ZmqServer

        public_file, secret_file = zmq.auth.create_certificates(material.path, "server")
        public, _ = zmq.auth.load_certificate(public_file)
        zmq_server = ZmqServer(address, port, key=key, curve_secret_key=secret_file, **timing)
        zmq_server.start()
        return JobServer(zmq_server.url, material, ["--curve-server-key", f"z85:{public.decode()}"], [],
                         {"curve_server_key": str(public_file)}, core=zmq_server)
    if scheme == "gearman":
        from .wire.aead import require_cryptography

        require_cryptography("an SSH cluster over gearman (its jobs are sealed)")
        if gearmand is None:
            from .transports.gearman.gearmand import GearmandProcess

            process = GearmandProcess(host=address, port=port or None).start()
            return Gearmand(f"gearman://{address}:{process.port}", material, process=process)
        return _remote_gearmand(gearmand.host, gearmand.argv, gearmand.address, gearmand.port, material)
    raise TransportError(f"an SSH cluster runs a tcp, zmq or gearman job server, not {scheme!r}")


def _remote_gearmand(host: str, argv: list[str], address: str, port: int, material: PrivateDir) -> Gearmand:
    """gearmand on a host, in an SSH session: started and announced, or a clear error with its output."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    server = Gearmand(f"gearman://{address}:{port}", material, host=host, session=proc)
    ready = threading.Event()

    def read_output() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            server.output.append(line)
            log.debug("gearmand on %s: %s", host, line)
            if line.startswith("gearmand serving "):
                ready.set()
        ready.set()  # the session ended: its output says why

    threading.Thread(target=read_output, name=f"remote-executor-gearmand {host}", daemon=True).start()
    if not ready.wait(GEARMAND_START_TIMEOUT) or proc.poll() is not None:
        server.stop()
        tail = " | ".join(server.output[-4:]) or "no output"
        raise TransportError(f"gearmand did not start on {host}: {tail}")
    log.info("gearmand on %s at %s", host, server.url)
    return server


def gearmand_command(remote_command: str, port: int) -> str:
    """The shell command that runs gearmand on a host for as long as its SSH session lasts."""
    return f"{remote_command} gearmand --listen 0.0.0.0 --port {shlex.quote(str(port))} --exit-on-stdin-eof"
