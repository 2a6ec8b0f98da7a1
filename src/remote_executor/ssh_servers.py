"""The job server of an SSH cluster, per transport, with the wire encrypted wherever the transport can.

- ``tcp``: our job server with TLS. A private CA and a server certificate are made for the cluster; the
  workers verify the server against that CA (its certificate reaches them on the SSH session's standard
  input, after the key) and prove who they are with the key, as every peer of a keyed server does.
- ``zmq``: our job server with CURVE. A key pair is made for the cluster; the workers get its public key
  on their command line (it is public) and make an ephemeral key pair of their own.

Either way the material lives in a private directory (0700) that :meth:`ClusterServer.stop` deletes; a
client elsewhere on this machine (``remote-executor cluster up``) finds it through :attr:`client_options`.
"""

from __future__ import annotations

import base64
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TransportError
from .jobserver.server import ServerCore

SCHEMES = ("tcp", "zmq")


@dataclass
class ClusterServer:
    """A started job server, and what its workers and outside clients need to reach it securely."""

    scheme: str
    core: ServerCore
    material: Path  # the private directory of certificates and keys
    worker_args: list[str] = field(default_factory=list)  # for the remote `remote-executor worker` command
    stdin_lines: list[bytes] = field(default_factory=list)  # sent after the key line, never on a command line
    client_options: dict[str, str] = field(default_factory=dict)  # transport options for clients elsewhere

    @property
    def url(self) -> str:
        return self.core.url

    def stop(self) -> None:
        self.core.stop()
        shutil.rmtree(self.material, ignore_errors=True)


def start_cluster_server(scheme: str, address: str, port: int, key: bytes, material: Path,
                         heartbeat_interval: float, heartbeat_timeout: float) -> ClusterServer:
    """Start the job server of ``scheme`` on ``address:port``, encrypted, with its material in ``material``
    (an existing private directory). :class:`TransportError` for a scheme an SSH cluster cannot run here."""
    timing: dict[str, Any] = {"heartbeat_interval": heartbeat_interval, "heartbeat_timeout": heartbeat_timeout}
    if scheme == "tcp":
        from .tls import TlsConfig, make_cluster_material
        from .transports.tcp.server import TcpServer

        files = make_cluster_material(material, [address])
        # Server-side TLS only: the key already authenticates every worker and client.
        tls = TlsConfig(cert=str(files.server_cert), key=str(files.server_key))
        server: ServerCore = TcpServer(address, port, key=key, tls=tls, **timing)
        server.start()
        return ClusterServer("tcp", server, material, ["--tls-ca", "-"],
                             [base64.b64encode(files.ca.read_bytes())], {"tls_ca": str(files.ca)})
    if scheme == "zmq":
        try:
            import zmq.auth
        except ImportError:
            raise TransportError("an SSH cluster over zmq needs pyzmq: pip install 'remote-executor[zmq]'") from None
        from .transports.zmq.server import ZmqServer

        public_file, secret_file = zmq.auth.create_certificates(str(material), "server")
        public, _ = zmq.auth.load_certificate(public_file)
        server = ZmqServer(address, port, key=key, curve_secret_key=secret_file, **timing)
        server.start()
        return ClusterServer("zmq", server, material, ["--curve-server-key", f"z85:{public.decode()}"], [],
                             {"curve_server_key": str(public_file)})
    raise TransportError(f"an SSH cluster runs a tcp or zmq job server, not {scheme!r}")
