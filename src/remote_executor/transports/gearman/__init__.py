"""The gearman transport: ``gearman`` (embedded: a private gearmand) and ``gearman://h1:4730,h2:4730[/POOL]``.

gearmand is the job server; this transport maps calls to Gearman jobs and speaks the binary protocol through
our own small codec (:mod:`.gearman_codec`, :mod:`.gearman_connection`; docs/transports-gearman.md says why)::

    client (gearman_client)                    gearmand (1..n)                 worker (gearman_worker)
    SUBMIT_JOB remote_executor.<POOL>   ──▶    queue per function     ──▶    GRAB_JOB_UNIQ; verify the HMAC
      payload: TASK frame (HMAC)                                              WORK_DATA "started by <name>"
    WORK_COMPLETE: RESULT/BROKEN frame  ◀──                           ◀──    initializer (once), call
    WORK_FAIL: worker lost / refused                                          WORK_COMPLETE (or WORK_FAIL)

A job's payload is one of our frames: ``TASK(a=task id, b=executor id, flags=number of initializer parts,
parts=[*initializer parts, *call parts])``, signed with the key when there is one; the answer is a ``RESULT``
frame (``a`` = task id, parts = outcome) or, when the executor's initializer failed, a ``BROKEN`` frame. Every
job carries its executor's initializer because Gearman cannot send a worker anything but jobs.

This module holds what both sides share (URL, function name, job frames), ``create``, the embedded cluster,
``run_worker`` (for ``python -m remote_executor.worker gearman://...``) and ``status``.
"""

from __future__ import annotations

import os
import re
import secrets
import struct
import threading
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Final

from ...errors import ProtocolError, TransportError
from ...wire.frames import DEFAULT_LIMITS, HEADER, MAC_SIZE, Frame, Kind, Limits, decode_parts, encode
from ...wire.serialization import Buffer
from .. import split_hostports
from ..base import Call, ClientTransport, Listener, Options, Session

__all__ = ["DEFAULT_POOL", "create", "decode_job_frame", "function_name", "parse_url", "run_worker", "status"]

DEFAULT_POOL: Final = "default"
FUNCTION_PREFIX: Final = "remote_executor."
STARTED: Final = b"started by "  # WORK_DATA a worker sends as it starts a job: "started by <worker name>"
REFUSED: Final = b"refused by "  # WORK_DATA before a WORK_FAIL for a job the worker would not run
_POOL_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,200}")


# --- what both sides share ----------------------------------------------------------------------------


def parse_url(url: str, pool: str | None = None) -> tuple[list[tuple[str, int]], str]:
    """``gearman://h1:p1,h2:p2[/POOL]`` -> ([(h1, p1), (h2, p2)], pool); ``pool`` overrides the path."""
    addresses = split_hostports(url)
    path = url.split("://", 1)[1].partition("/")[2].strip("/")
    chosen = pool or path or DEFAULT_POOL
    if not _POOL_RE.fullmatch(chosen):
        raise TransportError(f"bad gearman pool name {chosen!r} in {url!r}: use letters, digits, '.', '_' or '-'")
    return addresses, chosen


def function_name(pool: str) -> bytes:
    """The Gearman function name of a worker pool: ``remote_executor.<pool>``."""
    return f"{FUNCTION_PREFIX}{pool}".encode()


def join(buffers: Sequence[Buffer]) -> bytes:
    return b"".join(buffers)


def encode_job(call: Call, session: Session, key: bytes | None) -> bytes:
    """The payload of the job that runs ``call``: a TASK frame carrying the initializer too."""
    init = session.initializer or []
    frame = Frame(Kind.TASK, a=call.task_id, b=session.executor_id, flags=len(init), parts=[*init, *call.parts])
    return join(encode(frame, key))


def decode_job_frame(payload: Buffer, key: bytes | None, limits: Limits = DEFAULT_LIMITS) -> Frame:
    """Validate one frame that fills a whole job payload; the HMAC is checked before anything is unpickled.

    The same checks as :class:`~remote_executor.wire.frames.FrameReader` (it is :func:`decode_parts` once the
    payload is split), without a staging buffer per job: the parts are views of ``payload``, not copies.
    """
    view = memoryview(payload).cast("B")
    if view.nbytes < HEADER.size:
        raise ProtocolError(f"truncated frame header ({view.nbytes} bytes)")
    nparts = HEADER.unpack_from(view)[3]
    if nparts > limits.max_parts:
        raise ProtocolError(f"frame has {nparts} parts, more than the limit of {limits.max_parts}")
    prefix_size = HEADER.size + 8 * nparts + (MAC_SIZE if key is not None else 0)
    if view.nbytes < prefix_size:
        raise ProtocolError(f"truncated frame prefix ({view.nbytes} of {prefix_size} bytes)")
    lengths = struct.unpack_from(f"!{nparts}Q", view, HEADER.size)
    if prefix_size + sum(lengths) != view.nbytes:
        hint = " (signed with a key here but not there, or the other way round?)"
        raise ProtocolError(f"frame of {view.nbytes} bytes does not match its announced lengths{hint}")
    parts: list[Buffer] = []
    offset = prefix_size
    for length in lengths:
        parts.append(view[offset : offset + length])
        offset += length
    return decode_parts(view[:prefix_size], parts, key, limits)


# --- the registry's entry point --------------------------------------------------------------------------


def create(url: str, embedded: bool, options: Options) -> ClientTransport:
    if embedded:
        return EmbeddedGearmanTransport(options)
    from .client import GearmanClientTransport

    return GearmanClientTransport(url, options)


class GearmanCluster:
    """A private gearmand (loopback, free port, ``-j``) and N supervised worker processes.

    gearmand has no authentication, so the cluster always runs with a key (a random one unless the executor
    has its own): another local user who finds the port cannot make the workers run code. gearmand is
    started and stopped by an owner thread of the cluster, because the kernel kills it when the thread
    that started it exits (PR_SET_PDEATHSIG) and the executor may be created on a short-lived thread.
    """

    def __init__(self, workers: int, max_retries: int, key: bytes | None = None) -> None:
        self.workers = workers
        self.max_retries = max_retries
        self.key = key if key is not None else secrets.token_bytes(32)
        self.gearmand: Any = None  # a GearmandProcess once started
        self.supervisor: Any = None  # a Supervisor once started
        self._started = threading.Event()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._owner: threading.Thread | None = None

    @property
    def url(self) -> str:
        return str(self.gearmand.url)

    def start(self) -> GearmanCluster:
        self._owner = threading.Thread(target=self._own_gearmand, name="remote-executor-gearmand", daemon=True)
        self._owner.start()
        self._started.wait()
        if self._error is not None:
            self._owner.join()
            raise self._error
        from ...security import key_to_env
        from ...supervisor import Supervisor

        self.supervisor = Supervisor(self.url, self.workers, env=key_to_env(self.key), name="local-worker")
        self.supervisor.start()
        return self

    def stop(self) -> None:
        """Stop the workers, then gearmand. Idempotent."""
        if self.supervisor is not None:
            self.supervisor.stop()
        self._stop.set()
        if self._owner is not None and self._owner is not threading.current_thread():
            self._owner.join()

    def _own_gearmand(self) -> None:
        from .gearmand import GearmandNotFoundError, GearmandProcess

        try:
            self.gearmand = GearmandProcess(threads=0, job_retries=self.max_retries + 1).start()
        except GearmandNotFoundError as exc:
            self._error = TransportError(f'transport="gearman" needs gearmand: {exc}')
        except BaseException as exc:
            self._error = exc
        self._started.set()
        if self._error is None:
            self._stop.wait()
            self.gearmand.stop()


class EmbeddedGearmanTransport(ClientTransport):
    """``transport="gearman"``: a :class:`GearmanCluster` and a client of its gearmand."""

    def __init__(self, options: Options) -> None:
        self.url = "gearman"
        self._options = options
        self.cluster: GearmanCluster | None = None
        self._client: ClientTransport | None = None

    def start(self, session: Session, listener: Listener) -> None:
        from .client import GearmanClientTransport

        workers = self._options.max_workers or os.cpu_count() or 1
        self.cluster = GearmanCluster(workers, session.max_retries, self._options.key).start()
        options = replace(self._options, key=self.cluster.key)
        # The workers will register; until they do, gearmand queues the jobs. Starts are counted client-side
        # too, but gearmand's -j already fails a job after max_retries + 1 lost workers.
        self._client = GearmanClientTransport(self.cluster.url, options, capacity=workers)
        self._client.start(session, listener)

    def submit(self, calls: Sequence[Call]) -> None:
        assert self._client is not None
        self._client.submit(calls)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self.cluster is not None:
            self.cluster.stop()


# --- worker and admin entry points -------------------------------------------------------------------


def run_worker(settings: Any, core: Any) -> int:
    """Serve every gearmand of ``settings.url`` until drained (0) or no server is reachable (1)."""
    from .worker import GearmanWorker

    return GearmanWorker(settings, core).run()


def status(url: str, key: bytes | None, timeout: float = 5.0) -> dict[str, object]:
    """gearmand's admin ``status`` and ``workers`` of every job server (for ``remote-executor status``).

    ``key`` is unused: the admin protocol of gearmand has no authentication.
    """
    from .connection import GearmanConnectionError, admin_command, admin_status, admin_workers

    addresses, pool = parse_url(url)
    servers: list[dict[str, object]] = []
    errors = []
    for host, port in addresses:
        entry: dict[str, object] = {"address": f"{host}:{port}"}
        try:
            entry["version"] = " ".join(admin_command(host, port, "version", timeout=timeout))
            entry["status"] = [vars(s) for s in admin_status(host, port, timeout=timeout)]
            entry["workers"] = [
                {**vars(w), "functions": list(w.functions)} for w in admin_workers(host, port, timeout=timeout)
            ]
        except (GearmanConnectionError, OSError) as exc:
            entry["error"] = str(exc)
            errors.append(str(exc))
        servers.append(entry)
    if len(errors) == len(addresses):
        raise TransportError("; ".join(errors))
    return {"url": url, "function": function_name(pool).decode(), "servers": servers}
