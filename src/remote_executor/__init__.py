"""A concurrent.futures.Executor whose calls run in other processes and on other machines."""

from __future__ import annotations

from .errors import (
    AuthenticationError,
    BrokenRemoteExecutor,
    CallTimeoutError,
    ConnectionFailedError,
    FrameTooLargeError,
    HandshakeClosedError,
    InitializerFailed,
    KeyRejectedError,
    ProtocolError,
    RemoteError,
    RemoteExecutorError,
    RemoteTraceback,
    SerializationError,
    ServerUnavailableError,
    TransportError,
    VersionMismatchError,
    WorkerLostError,
)
from .progress import progress

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "BrokenRemoteExecutor",
    "CallTimeoutError",
    "ConnectionFailedError",
    "FrameTooLargeError",
    "HandshakeClosedError",
    "InitializerFailed",
    "KeyRejectedError",
    "ProtocolError",
    "RemoteError",
    "RemoteExecutor",
    "RemoteExecutorError",
    "RemoteTraceback",
    "SSHCluster",
    "SSHClusterError",
    "SerializationError",
    "ServerUnavailableError",
    "TlsError",
    "TransportError",
    "VersionMismatchError",
    "WorkerLostError",
    "__version__",
    "cluster_status",
    "connect",
    "get_reusable_executor",
    "progress",
]

# Not typing.TYPE_CHECKING: importing typing would double the time ``import remote_executor`` takes.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .discovery import connect
    from .executor import RemoteExecutor
    from .reusable import get_reusable_executor
    from .ssh import SSHCluster, SSHClusterError
    from .status import cluster_status
    from .tls import TlsError


def __getattr__(name: str) -> Any:
    # Imported on first use (PEP 562), so that ``import remote_executor`` costs little more than
    # ``import concurrent.futures``, and worker processes (which never need the executor) start faster.
    if name == "RemoteExecutor":
        from .executor import RemoteExecutor

        return RemoteExecutor
    if name == "SSHCluster":
        from .ssh import SSHCluster

        return SSHCluster
    if name == "SSHClusterError":
        from .ssh import SSHClusterError

        return SSHClusterError
    if name == "TlsError":
        from .tls import TlsError

        return TlsError
    if name == "cluster_status":
        from .status import cluster_status

        return cluster_status
    if name == "get_reusable_executor":
        from .reusable import get_reusable_executor

        return get_reusable_executor
    if name == "connect":
        from .discovery import connect

        return connect
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
