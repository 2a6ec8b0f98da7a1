"""What a gearman worker process refuses to run twice, sans I/O: the clock is passed in.

Every encrypted job carries a random 16-byte job id and an expiry time, both authenticated. A worker
refuses a job that has expired, and remembers the id of every job it accepted until that job expires: a
copy of a job (a replay through gearmand) is refused while it is fresh, and expired once forgotten.

Memory is bounded: ids are kept in buckets by expiry second, expired buckets are dropped as a whole, and
when ``capacity`` ids are held the bucket that expires first is dropped early. Its second becomes a
*floor*: a job expiring at or before the floor is refused, since its id may have been forgotten. So the
guard stays safe under any load; under a sustained flood (more than ``capacity`` jobs per job TTL in one
process) it only shortens how long a job may wait in gearmand's queue before it is refused as too old.
"""

from __future__ import annotations

import heapq
from typing import Final

__all__ = ["DEFAULT_CAPACITY", "MAX_AHEAD", "ReplayGuard"]

DEFAULT_CAPACITY: Final = 250_000  # 25 to 42 MB of ids when full (measured: more with a long job_ttl), per process
MAX_AHEAD: Final = 86_400.0 + 300.0  # a job may expire at most a day (plus clock skew) from now
REPLAYED: Final = "refused a replayed job"  # what the client recognizes in a refusal (see client.py)
EXPIRED: Final = "refused an expired job"


class ReplayGuard:
    """Admits each fresh job id once, until its expiry; see the module docstring."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, not {capacity}")
        self.capacity = capacity
        self._buckets: dict[int, set[bytes]] = {}  # expiry second -> ids of accepted jobs
        self._seconds: list[int] = []  # a min-heap of the buckets' seconds
        self._size = 0
        self.floor = -1  # jobs expiring in this second or before are refused: their ids may be forgotten

    def __len__(self) -> int:
        return self._size

    def admit(self, job_id: bytes, expiry: float, now: float) -> str | None:
        """Record a job and return None if it may run; else why it may not (it is not recorded)."""
        self._forget_expired(now)
        if expiry <= now:
            return (f"{EXPIRED} (it expired {now - expiry:.1f}s ago: it waited in gearmand's queue longer "
                    f"than its job_ttl, or this worker's clock is ahead of its client's)")
        if expiry > now + MAX_AHEAD:
            return (f"refused a job expiring {expiry - now:.0f}s from now, more than a day: the client's clock "
                    f"is ahead of this worker's")
        second = int(expiry)
        bucket = self._buckets.get(second)
        if bucket is not None and job_id in bucket:
            return f"{REPLAYED} (this worker process already accepted job id {job_id.hex()})"
        if second > self.floor and self._size >= self.capacity:
            self._evict_first()
        if second <= self.floor:  # also when the bucket just evicted was this job's own
            return (f"{EXPIRED} (it is older than the oldest job this worker still remembers after "
                    f"{self.capacity} jobs within their TTL: it waited in gearmand's queue too long to be "
                    f"checked for a replay)")
        bucket = self._buckets.get(second)
        if bucket is None:
            bucket = self._buckets[second] = set()
            heapq.heappush(self._seconds, second)
        bucket.add(job_id)
        self._size += 1
        return None

    def _forget_expired(self, now: float) -> None:
        """Drop the buckets whose every job has expired (a replay of them is refused as expired)."""
        while self._seconds and self._seconds[0] + 1 <= now:
            self._drop(heapq.heappop(self._seconds))

    def _evict_first(self) -> None:
        second = heapq.heappop(self._seconds)
        self._drop(second)
        self.floor = max(self.floor, second)

    def _drop(self, second: int) -> None:
        self._size -= len(self._buckets.pop(second))
