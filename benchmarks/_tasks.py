"""The benchmark's calls, in a module of their own so that every executor sends them by reference (as a
module and a name), the way an application's functions usually travel. ``bench.py`` also has a copy of
``noop`` defined in ``__main__``, for the row that measures a function shipped by value."""

from __future__ import annotations


def noop(x: int) -> int:
    """The no-op call of the throughput and latency rows."""
    return x


def echo(payload: bytes) -> bytes:
    """The payload rows: the argument comes back as the result."""
    return payload
