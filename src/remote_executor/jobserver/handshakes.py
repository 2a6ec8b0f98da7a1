"""Connections that have not proved the key yet: how many, from which address, since when; sans I/O.

A job server admits every connection, but one that has not yet shown it holds the key (its first frame
under the session keys verified) gets little: at most ``limit`` such connections at once, each for at most
``timeout`` seconds. Beyond the cap a newcomer takes the place of the oldest connection of the address
holding the most places: at once if the newcomer's address holds fewer (one flooding address cannot lock
out the others), else only once that connection has had a fair chance to finish (a burst of honest peers
connecting together is not churned); failing that, the newcomer itself is refused.

The tcp and zmq job servers share this policy; each closes connections its own way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from typing import Generic, NamedTuple, TypeVar

K = TypeVar("K", bound=Hashable)


class Waiting(NamedTuple):
    host: str
    since: float


class Handshakes(Generic[K]):
    """The connections in handshake of one server, by a key of the server's choosing."""

    def __init__(self, limit: int, timeout: float) -> None:
        if limit < 1:
            raise ValueError("max_handshaking must be at least 1")
        self.limit = limit
        self.timeout = timeout
        # How long a connection has had for a fair chance: after that it may make room for a newcomer from
        # the same address.
        self.evictable_after = min(1.0, timeout / 4)
        # Oldest first. Public for a server's per-event "any at all?" check, which a len() call would slow.
        self.entries: dict[K, Waiting] = {}
        self._per_host: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: object) -> bool:
        return key in self.entries

    def get(self, key: K) -> Waiting | None:
        return self.entries.get(key)

    def count(self, host: str) -> int:
        return self._per_host.get(host, 0)

    def full(self) -> bool:
        return len(self.entries) >= self.limit

    def add(self, key: K, host: str, now: float) -> None:
        self.entries[key] = Waiting(host, now)
        self._per_host[host] += 1

    def remove(self, key: K) -> None:
        """``key`` proved the key, or is gone (nothing if it was not waiting)."""
        entry = self.entries.pop(key, None)
        if entry is not None:
            self._per_host[entry.host] -= 1
            if not self._per_host[entry.host]:
                del self._per_host[entry.host]

    def victim(self, newcomer: str | None, now: float) -> K | None:
        """The connection to close to make room for one from address ``newcomer`` (None: unknown), or None
        if none may go yet. It stays listed until the server, having closed it, removes it."""
        if not self.entries:
            return None
        host = max(self._per_host, key=self._per_host.__getitem__)
        key, entry = next((k, e) for k, e in self.entries.items() if e.host == host)
        fair = newcomer is not None and self.count(newcomer) < self._per_host[host]
        if not fair and now - entry.since < self.evictable_after:
            return None
        return key

    def overdue(self, now: float) -> K | None:
        """The oldest connection past its deadline, if any."""
        for key, entry in self.entries.items():
            return key if now - entry.since >= self.timeout else None
        return None

    def next_deadline(self) -> float | None:
        """When the oldest connection's deadline passes (None: none waits)."""
        for entry in self.entries.values():
            return entry.since + self.timeout
        return None
