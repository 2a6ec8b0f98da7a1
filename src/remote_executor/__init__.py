"""A concurrent.futures.Executor whose calls run in other processes and on other machines."""

from .errors import (
    AuthenticationError,
    BrokenRemoteExecutor,
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
from .executor import RemoteExecutor

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "BrokenRemoteExecutor",
    "InitializerFailed",
    "ProtocolError",
    "RemoteError",
    "RemoteExecutor",
    "RemoteExecutorError",
    "RemoteTraceback",
    "SerializationError",
    "ServerUnavailableError",
    "TransportError",
    "VersionMismatchError",
    "WorkerLostError",
    "__version__",
]
