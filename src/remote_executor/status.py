"""Where a cluster stands, as typed data: its workers, clients and queues.

:func:`cluster_status` asks the job server(s) of a URL (or gearmand); ``RemoteExecutor.status()`` asks the
executor's own job server. Both return a :class:`ClusterStatus`, the same data ``remote-executor status``
prints as JSON; :func:`render` draws it as the text ``remote-executor status --watch`` refreshes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ProtocolError

__all__ = ["ClientStatus", "ClusterStatus", "PoolStatus", "ServerStatus", "WorkerStatus", "cluster_status",
           "render"]


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """One worker process (one connection to a job server). None: the server cannot know it (gearmand)."""

    name: str  # unique per server: what broadcast() keys its futures by
    host: str
    pid: int | None
    pool: str
    slots: int
    running: int | None  # calls it runs now
    done: int | None  # calls it has answered since it attached, failed ones included
    uptime: float | None  # seconds since it attached
    draining: bool = False
    # ... of which the outcome was an error: the call raised (a chunk: one of its calls did), could not be
    # unpickled or its result pickled, or it was stopped at its time limit. None: the server cannot know
    # (gearmand, or a worker too old to say, counts as 0).
    failed: int | None = None


@dataclass(frozen=True, slots=True)
class ClientStatus:
    """One executor's connection."""

    name: str
    pool: str
    queued: int | None  # calls waiting for a worker
    running: int | None  # calls a worker has


@dataclass(frozen=True, slots=True)
class PoolStatus:
    """One worker pool of a server."""

    name: str
    workers: int
    capacity: int  # slots of its workers that take calls
    clients: int | None
    queued: int  # calls waiting for one of its workers


@dataclass(frozen=True, slots=True)
class ServerStatus:
    """One job server (or gearmand) of a URL."""

    server: str
    workers: tuple[WorkerStatus, ...] = ()
    clients: tuple[ClientStatus, ...] = ()
    pools: tuple[PoolStatus, ...] = ()
    done: int | None = None  # calls answered since it started: calls/s is its change over time
    uptime: float | None = None
    stopping: bool = False
    error: str | None = None  # it did not answer (the other servers of the URL did)


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    """Every job server of a URL; the properties add them up."""

    url: str
    servers: tuple[ServerStatus, ...]
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)  # the JSON it came from

    @property
    def workers(self) -> tuple[WorkerStatus, ...]:
        return tuple(w for s in self.servers for w in s.workers)

    @property
    def clients(self) -> tuple[ClientStatus, ...]:
        return tuple(c for s in self.servers for c in s.clients)

    @property
    def queued(self) -> dict[str, int]:
        """Calls waiting for a worker, per pool."""
        counts: dict[str, int] = {}
        for server in self.servers:
            for pool in server.pools:
                counts[pool.name] = counts.get(pool.name, 0) + pool.queued
        return counts

    @property
    def done(self) -> int | None:
        """Calls answered by every server since it started (None if no server can tell)."""
        counts = [s.done for s in self.servers if s.done is not None]
        return sum(counts) if counts else None

    @classmethod
    def from_dict(cls, info: Mapping[str, Any], url: str = "") -> ClusterStatus:
        """The typed form of a ``Backend.status`` answer (one server, several, or gearmand's)."""
        try:
            if "function" in info:  # gearmand
                function = str(info["function"])
                pool = str(info.get("pool", function))  # (the pool's own name; older versions sent only this)
                servers = tuple(_gearman_server(entry, function, pool) for entry in info["servers"])
                return cls(str(info.get("url", url)), servers, info)
            entries = info.get("servers", [info])
            return cls(str(info.get("url", url or info.get("server", ""))),
                       tuple(_server(entry) for entry in entries), info)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(f"malformed status answer: {type(exc).__name__}: {exc}") from exc


def _server(entry: Mapping[str, Any]) -> ServerStatus:
    if "error" in entry:
        return ServerStatus(str(entry["server"]), error=str(entry["error"]))
    workers = tuple(
        WorkerStatus(str(w["name"]), str(w.get("host", "")), w.get("pid"), str(w["pool"]), int(w["slots"]),
                     int(w["running"]), w.get("done"), w.get("uptime"), bool(w.get("draining", False)),
                     w.get("failed"))
        for w in entry["workers"])
    clients = tuple(ClientStatus(str(c["name"]), str(c["pool"]), int(c["queued"]), int(c["running"]))
                    for c in entry["clients"])
    pools = tuple(PoolStatus(str(name), int(p["workers"]), int(p["capacity"]), int(p["clients"]), int(p["queued"]))
                  for name, p in entry["pools"].items())
    return ServerStatus(str(entry["server"]), workers, clients, pools, entry.get("done"), entry.get("uptime"),
                        bool(entry.get("stopping", False)))


def _gearman_server(entry: Mapping[str, Any], function: str, pool: str) -> ServerStatus:
    """gearmand knows its connections and the queue per function name (one per pool), not pids, uptimes or
    counts done."""
    address = str(entry["address"])
    if "error" in entry:
        return ServerStatus(address, error=str(entry["error"]))
    pools = tuple(PoolStatus(pool, int(s["workers"]), int(s["workers"]), None,
                             int(s["total"]) - int(s["running"]))
                  for s in entry["status"] if s["function"] == function)
    workers = tuple(WorkerStatus(str(w["client_id"]), str(w["address"]), None, pool, 1, None, None, None)
                    for w in entry["workers"] if function in w["functions"])
    return ServerStatus(address, workers, (), pools)


def cluster_status(url: str, *, key: bytes | str | None = None, key_file: str | os.PathLike[str] | None = None,
                   timeout: float = 10.0, **options: Any) -> ClusterStatus:
    """Ask the job server(s) at ``url`` (tcp://, zmq://, gearman://) where the cluster stands.

    ``key``/``key_file`` as for :class:`~remote_executor.RemoteExecutor`; other keyword arguments are its
    transport options (``tls_ca=...``, ``curve_server_key=...``). Raises
    :class:`~remote_executor.errors.ConnectionFailedError` if no server of the URL answers in ``timeout``.
    """
    from .security import resolve_key
    from .transports import get_backend, scheme_of
    from .transports.base import Options

    backend = get_backend(scheme_of(url))
    info = backend.status(url, Options(key=resolve_key(key, key_file), connect_timeout=timeout, extra=options))
    return ClusterStatus.from_dict(info, url)


# --- the live view -----------------------------------------------------------------------------------------


def render(status: ClusterStatus, previous: ClusterStatus | None = None, elapsed: float = 0.0) -> str:
    """The text of one refresh of ``remote-executor status --watch``: workers, queues and calls/s (the change
    of the calls answered since ``previous``, taken ``elapsed`` seconds earlier)."""
    lines = [f"{status.url}  {len(status.workers)} worker(s), {len(status.clients)} client(s), "
             f"{_rate(status, previous, elapsed)}"]
    for server in status.servers:
        if server.error is not None:
            lines.append(f"  {server.server}: not answering: {server.error}")
            continue
        state = "  (stopping)" if server.stopping else ""
        lines.append(f"  server {server.server}  up {_duration(server.uptime)}{state}")
        for pool in server.pools:
            lines.append(f"    pool {pool.name}: {pool.workers} worker(s), {pool.capacity} slot(s), "
                         f"{pool.queued} queued")
        if server.workers:
            lines.append(f"    {'WORKER':<32} {'HOST':<20} {'PID':>7} {'POOL':<12} {'RUN':>4} {'DONE':>7} "
                         f"{'FAILED':>6}  UP")
        for w in server.workers:
            flag = " draining" if w.draining else ""
            lines.append(f"    {w.name:<32} {w.host:<20} {_num(w.pid):>7} {w.pool:<12} "
                         f"{_num(w.running):>2}/{w.slots:<1} {_num(w.done):>7} {_num(w.failed):>6}  "
                         f"{_duration(w.uptime)}{flag}")
    return "\n".join(lines)


def _rate(status: ClusterStatus, previous: ClusterStatus | None, elapsed: float) -> str:
    now, before = status.done, previous.done if previous is not None else None
    if now is None or before is None or elapsed <= 0:
        return "calls/s: -"
    return f"calls/s: {max(now - before, 0) / elapsed:.1f}"


def _num(value: int | None) -> str:
    return "-" if value is None else str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
