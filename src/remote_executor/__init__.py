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
    "progress",
]

if TYPE_CHECKING:
    from .executor import RemoteExecutor
    from .ssh import SSHCluster


def __getattr__(name: str) -> Any:
    # Imported on first use, so that worker processes (which never need the executor) start faster.
    if name == "RemoteExecutor":
        from .executor import RemoteExecutor

        return RemoteExecutor
    if name == "SSHCluster":
        from .ssh import SSHCluster

        return SSHCluster
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
