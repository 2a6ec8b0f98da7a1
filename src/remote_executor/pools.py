"""Named worker pools: a worker serves one pool, and an executor's calls go only to workers of its pool.

A pool is a label, not a place: ``remote-executor worker tcp://h:5555 --pool gpu`` (or the URL
``tcp://h:5555/gpu``) attaches a worker to the pool ``gpu``, and ``RemoteExecutor(transport="tcp://h:5555/gpu")``
sends calls there. Without a name, both sides use :data:`DEFAULT_POOL`. On gearman a pool is the function
name workers register; on our job server it is a field of the HELLO.
"""

from __future__ import annotations

import re
from typing import Final

from .errors import TransportError

DEFAULT_POOL: Final = "default"
_NAME: Final = re.compile(r"[A-Za-z0-9_.\-]{1,200}")


def is_pool_name(name: object) -> bool:
    """True for a usable pool name: 1 to 200 letters, digits, '.', '_' or '-'."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def pool_of_url(url: str, override: str | None = None) -> str:
    """The pool a URL names (``scheme://hosts/POOL``), ``override`` if given, else :data:`DEFAULT_POOL`."""
    path = url.split("://", 1)[1].partition("/")[2].strip("/") if "://" in url else ""
    chosen = override or path or DEFAULT_POOL
    if not is_pool_name(chosen):
        raise TransportError(f"bad pool name {chosen!r} in {url!r}: use 1 to 200 letters, digits, '.', '_' or '-'")
    return chosen
