"""``connect()``: an executor of a running cluster, found without writing its URL in the program.

The order (the first that gives an address wins):

1. the ``address`` argument (a URL such as ``tcp://host:5555``);
2. ``$REMOTE_EXECUTOR_ADDRESS``, with the key from ``$REMOTE_EXECUTOR_KEY_FILE`` (or ``$REMOTE_EXECUTOR_KEY``);
3. the cluster recorded by ``remote-executor cluster start`` or ``cluster up`` in
   ``$XDG_CONFIG_HOME/remote_executor/cluster.json`` (default ``~/.config/...``): its URL, key file and the
   file that verifies its job server.

``RemoteExecutor(transport=None)`` is not affected: it always starts an embedded cluster of its own.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import TransportError
from .executor import RemoteExecutor

__all__ = ["ADDRESS_ENV", "KEY_FILE_ENV", "connect", "discover"]

ADDRESS_ENV = "REMOTE_EXECUTOR_ADDRESS"
KEY_FILE_ENV = "REMOTE_EXECUTOR_KEY_FILE"


def discover(address: str | None = None) -> dict[str, Any]:
    """The ``RemoteExecutor`` arguments (``transport``, and ``key_file`` and TLS or CURVE files where known)
    of the cluster :func:`connect` would use; ``TransportError`` if there is none."""
    if address:
        return {"transport": address}
    if address := os.environ.get(ADDRESS_ENV, "").strip():
        key_file = os.environ.get(KEY_FILE_ENV, "").strip()
        return {"transport": address, **({"key_file": key_file} if key_file else {})}
    from .cli_cluster import _alive
    from .ssh import running_cluster, state_path

    try:
        cluster = running_cluster()
    except TransportError:
        raise TransportError(f"no cluster to connect to: pass an address, set ${ADDRESS_ENV}, or start one with "
                             f"`remote-executor cluster start` (none is recorded in {state_path()})") from None
    if not _alive(cluster.pid):
        raise TransportError(f"the cluster recorded in {state_path()} is not running (process {cluster.pid} is "
                             f"gone): start it again, or `remote-executor cluster stop` forgets it")
    return dict(cluster.executor_options())


def connect(address: str | None = None, **options: Any) -> RemoteExecutor:
    """A :class:`RemoteExecutor` of the running cluster found as the module documentation says.

    ``options`` are those of ``RemoteExecutor`` and win over what was found (``key_file=...``, say)."""
    found = discover(address)
    if "key" in options:
        found.pop("key_file", None)
    return RemoteExecutor(**{**found, **options})
