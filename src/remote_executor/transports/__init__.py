"""The transport registry: URL scheme -> transport factory, imported lazily.

``create(None)`` and ``create("tcp")`` start an embedded local cluster; ``create("tcp://host:port")``
connects to a running job server; a :class:`ClientTransport` instance is used as it is. Third parties
register a scheme with an entry point in the ``remote_executor.transports`` group whose value is a callable
``factory(url: str, embedded: bool, options: Options) -> ClientTransport``.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from urllib.parse import urlsplit

from ..errors import TransportError
from .base import ClientTransport, Options

Factory = Callable[[str, bool, Options], ClientTransport]

DEFAULT_SCHEME = "tcp"

# scheme -> ("module:function", the pip extra that provides its dependencies or None)
_BUILTIN: dict[str, tuple[str, str | None]] = {
    "tcp": ("remote_executor.transports.tcp:create", None),
    "zmq": ("remote_executor.transports.zmq:create", "zmq"),
    "gearman": ("remote_executor.transports.gearman:create", None),
    "memory": ("remote_executor.transports.memory:create", None),
}


def create(spec: str | ClientTransport | None, options: Options) -> ClientTransport:
    """Resolve ``spec`` (None, a bare scheme, a URL or a transport object) to a client transport."""
    if isinstance(spec, ClientTransport):
        return spec
    url = DEFAULT_SCHEME if spec is None else spec
    if not isinstance(url, str):
        raise TypeError(f"transport must be None, a URL string or a ClientTransport, not {type(url).__name__}")
    scheme = url.split("://", 1)[0].lower() if "://" in url else url.lower()
    embedded = "://" not in url
    return resolve(scheme)(url, embedded, options)


def resolve(scheme: str) -> Factory:
    """The factory for a scheme; a clear error for an unknown scheme or a missing extra."""
    if scheme in _BUILTIN:
        target, extra = _BUILTIN[scheme]
        return _load(target, scheme, extra)
    from importlib.metadata import entry_points  # slow to import: only for schemes not built in

    plugins = entry_points(group="remote_executor.transports")
    for ep in plugins:
        if ep.name == scheme:
            factory: Factory = ep.load()
            return factory
    known = sorted(set(_BUILTIN) | {ep.name for ep in plugins})
    close = difflib.get_close_matches(scheme, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise TransportError(f"unknown transport scheme {scheme!r} (known: {', '.join(known)}){hint}")


def split_hostports(url: str) -> list[tuple[str, int]]:
    """``scheme://h1:p1,h2:p2/...`` -> [(h1, p1), (h2, p2)]; a clear error for a malformed URL."""
    netloc = urlsplit(url).netloc if "," not in url else url.split("://", 1)[1].split("/", 1)[0]
    result = []
    for item in netloc.split(","):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise TransportError(f"malformed address {item!r} in {url!r}: expected host:port")
        result.append((host.strip("[]"), int(port)))
    return result


def _load(target: str, scheme: str, extra: str | None) -> Factory:
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
    factory: Factory = getattr(module, attr)
    return factory
