"""A concurrent.futures.Executor whose calls run in other processes and on other machines."""

from typing import TYPE_CHECKING, Any

from .errors import (
    AuthenticationError,
    BrokenRemoteExecutor,
    CallTimeoutError,
    FrameTooLargeError,
    InitializerFailed,
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
    "FrameTooLargeError",
    "InitializerFailed",
    "ProtocolError",
    "RemoteError",
    "RemoteExecutor",
    "RemoteExecutorError",
    "RemoteTraceback",
    "SSHCluster",
    "SerializationError",
    "ServerUnavailableError",
    "TransportError",
    "VersionMismatchError",
    "WorkerLostError",
    "__version__",
    "cluster_status",
    "connect",
    "get_reusable_executor",
    "progress",
]

if TYPE_CHECKING:
    from .discovery import connect
    from .executor import RemoteExecutor
    from .reusable import get_reusable_executor
    from .ssh import SSHCluster
    from .status import cluster_status


def __getattr__(name: str) -> Any:
    # Imported on first use, so that worker processes (which never need the executor) start faster.
    if name == "RemoteExecutor":
        from .executor import RemoteExecutor

        return RemoteExecutor
    if name == "SSHCluster":
        from .ssh import SSHCluster

        return SSHCluster
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
