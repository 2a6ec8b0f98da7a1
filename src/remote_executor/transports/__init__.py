"""The backend registry: URL scheme -> :class:`~remote_executor.transports.base.Backend`, imported lazily.

:func:`get_backend` is the only place a scheme is looked up (by the executor, the embedded cluster, the
worker process and the command line). Built-in schemes are tcp, zmq, gearman and memory; a third party
registers another with an entry point in the ``remote_executor.transports`` group whose value is a
``Backend`` subclass (or instance)::

    [project.entry-points."remote_executor.transports"]
    toy = "my_pkg.toy:ToyBackend"
"""

from __future__ import annotations

import importlib

from ..errors import TransportError
from .base import Backend

__all__ = ["DEFAULT_SCHEME", "Backend", "get_backend", "scheme_of", "split_hostports"]

DEFAULT_SCHEME = "tcp"
ENTRY_POINT_GROUP = "remote_executor.transports"

# scheme -> ("module:Backend class", the pip extra that provides its dependencies or None)
_BUILTIN: dict[str, tuple[str, str | None]] = {
    "tcp": ("remote_executor.transports.tcp:TcpBackend", None),
    "zmq": ("remote_executor.transports.zmq:ZmqBackend", "zmq"),
    "gearman": ("remote_executor.transports.gearman:GearmanBackend", None),
    "memory": ("remote_executor.transports.memory:MemoryBackend", None),
}
_cache: dict[str, Backend] = {}


def scheme_of(url: str) -> str:
    """The scheme of a URL (``TCP://h:1`` -> ``tcp``) or of a bare scheme (``zmq`` -> ``zmq``), lower-cased."""
    return (url.split("://", 1)[0] if "://" in url else url).strip().lower()


class UnknownSchemeError(TransportError):
    """No backend for a URL's scheme (the message suggests the closest known one)."""


def get_backend(scheme: str) -> Backend:
    """The backend of a scheme (case-insensitive); a clear error for an unknown scheme or a missing extra."""
    scheme = scheme.lower()
    backend = _cache.get(scheme)
    if backend is None:
        backend = _cache[scheme] = _load(scheme)
    return backend


def _load(scheme: str) -> Backend:
    if scheme in _BUILTIN:
        target, extra = _BUILTIN[scheme]
        return _instantiate(_import(target, scheme, extra), target)
    from importlib.metadata import entry_points  # slow to import: only for schemes not built in

    plugins = entry_points(group=ENTRY_POINT_GROUP)
    for ep in plugins:
        if ep.name.lower() == scheme:
            return _instantiate(ep.load(), ep.value)
    known = sorted(set(_BUILTIN) | {ep.name for ep in plugins})
    import difflib  # only for this error

    close = difflib.get_close_matches(scheme, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UnknownSchemeError(f"unknown transport scheme {scheme!r} (known: {', '.join(known)}){hint}")


def _import(target: str, scheme: str, extra: str | None) -> object:
    module_name, attr = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if extra is None or module_name in str(exc):
            raise
        raise TransportError(
            f"the {scheme!r} transport needs an optional dependency ({exc.name}): "
            f"pip install 'remote-executor[{extra}]'"
        ) from exc
    return getattr(module, attr)


def _instantiate(obj: object, where: str) -> Backend:
    backend = obj() if isinstance(obj, type) else obj
    if not isinstance(backend, Backend):
        raise TransportError(f"{where} is not a remote_executor Backend (got {type(backend).__name__})")
    return backend


def split_hostports(url: str) -> list[tuple[str, int]]:
    """``scheme://h1:p1,h2:p2/...`` -> [(h1, p1), (h2, p2)]; a clear error for a malformed URL."""
    from urllib.parse import urlsplit  # with ipaddress, 5 ms: only for a URL, never the embedded cluster

    try:
        netloc = urlsplit(url).netloc if "," not in url else url.split("://", 1)[1].split("/", 1)[0]
    except ValueError as exc:  # "Invalid IPv6 URL": an unclosed [
        raise TransportError(f"malformed URL {url!r}: {exc}") from exc
    result = []
    for item in netloc.split(","):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise TransportError(f"malformed address {item!r} in {url!r}: expected host:port")
        result.append((host.strip("[]"), int(port)))
    return result
