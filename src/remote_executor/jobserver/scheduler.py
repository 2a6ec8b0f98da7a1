"""The job server's brain, sans I/O: shared by the tcp and zmq servers and tested on its own.

The I/O layer assigns each connection an integer id and feeds events in; the scheduler answers with
actions (send a frame to a connection, close a connection) collected by :meth:`Scheduler.take_actions`.
It never reads a clock, a socket or a pickle: time comes in as ``now``, payloads stay opaque bytes.

Who is who::

    client  -- SUBMIT -->  queue (one deque per client, served round-robin)  -- TASK -->  worker
    client  <-- RESULT --  task table (server task id -> client, client task id)  <-- RESULT --  worker

Pools: every client and worker names one (the default pool unless it says otherwise); a client's calls go
only to workers of its pool, and the queues, the free workers and the capacity a client is told are kept per
pool.

Worker loss (disconnect, or silence past ``heartbeat_timeout``) requeues the calls it ran at the head of
their client's queue (and tells the client, REQUEUED) until they have been lost ``max_retries + 1`` times,
counting the losses a client reports when it resubmits a call after losing another server; then the
client gets a WORKER_LOST result naming every worker lost here. A call with a time limit is never
requeued once its limit has passed: its worker stops it by exiting (and says so first, RESULT with
TIMED_OUT); a worker lost after the deadline, or still silent about it a heartbeat timeout later, settles
the call as TIMED_OUT too. Initializers are sent (INIT) before the first task of an
executor on each worker; an INIT_FAILED is forwarded (BROKEN) to the executor's clients.

Broadcast: a client asks which workers of its pool take calls now (WORKERS), then submits one call pinned
to each (SUBMIT with PINNED). A pinned call waits in its worker's own queue and starts as soon as that
worker has a free slot, before any call of the pool's queues; it never runs elsewhere: if its worker is
gone, draining or lost while it waits or runs, the call fails at once (WORKER_LOST), never requeued.

Stop (an admin's STOP): no queued call starts any more; once the running ones have finished, the workers
are told to exit for good (if asked) and the server stops (the :class:`Stop` action).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import AuthenticationError, ProtocolError, VersionMismatchError
from ..logsafe import limited, owner, printable
from ..pools import DEFAULT_POOL, is_pool_name
from ..wire.frames import FAILED, LIMITED, LOST_ON, NOT_STARTED, PINNED, Frame, Kind, Status
from ..wire.messages import (
    RejectCode,
    call_frame,
    check_versions,
    json_frame,
    parse_json,
    reject,
    split_limit,
    split_pinned,
    timed_out_parts,
    worker_lost_parts,
)
from ..wire.serialization import Parts

log = logging.getLogger("remote_executor.jobserver.server")

ConnId = int


@dataclass(frozen=True, slots=True)
class Send:
    conn: ConnId
    frame: Frame


@dataclass(frozen=True, slots=True)
class Close:
    conn: ConnId
    reason: str
    hung_pid: int = 0  # a worker given up as hung (silent, or past a call's limit): the pid it announced


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop serving: an admin asked, and what had to finish first has finished."""

    reason: str


Action = Send | Close | Stop


@dataclass(slots=True)
class Task:
    tid: int
    client: ConnId
    client_tid: int
    executor_id: int
    parts: Parts
    attempts: int = 0
    lost_on: list[str] = field(default_factory=list)
    limit: float | None = None  # run-time limit in seconds
    deadline: float | None = None  # when the limit runs out, once a worker has it
    worker: str | None = None  # pinned to this worker (a broadcast): it never runs elsewhere

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


@dataclass(slots=True)
class Peer:
    conn: ConnId
    last_recv: float
    last_send: float
    local: bool = False  # an in-process client: no heartbeats either way
    role: str = ""  # "" until HELLO, then client / worker / admin
    name: str = ""


@dataclass(slots=True)
class ClientState:
    executor_id: int
    max_retries: int
    pool: str = DEFAULT_POOL
    queue: deque[Task] = field(default_factory=deque)
    tasks: dict[int, Task] = field(default_factory=dict)  # server tid -> task, queued or running


@dataclass(slots=True)
class WorkerState:
    slots: int
    pool: str = DEFAULT_POOL
    running: dict[int, Task] = field(default_factory=dict)
    initialized: set[int] = field(default_factory=set)
    draining: bool = False
    pinned: deque[Task] = field(default_factory=deque)  # calls for this worker only, waiting for a slot
    host: str = ""
    pid: int = 0
    attached: float = 0.0  # when it said HELLO (the scheduler's clock)
    done: int = 0  # calls it has answered
    failed: int = 0  # ... of which the outcome was an error (RESULT with FAILED) or a stop at the time limit

    def free(self) -> int:
        return 0 if self.draining else self.slots - len(self.running)


@dataclass(slots=True)
class Pool:
    """One pool's share of the scheduler: whose calls wait, which workers have room, what clients are told."""

    ready: deque[ConnId] = field(default_factory=deque)  # clients with queued tasks, in round-robin order
    # Workers with a free slot, least recently freed first (a dict as an ordered set): assignment costs the
    # same with 10 workers or 10,000, where scanning every worker per call grew with their number.
    free: dict[ConnId, None] = field(default_factory=dict)
    capacity: int = 0  # slots of its workers that are not draining
    clients: int = 0
    workers: int = 0


class Scheduler:
    """Queues, assignment, fairness, heartbeats and requeue-on-loss for one job server."""

    def __init__(
        self,
        *,
        name: str = "job server",
        heartbeat_interval: float = 1.0,
        heartbeat_timeout: float = 10.0,
        max_frame: int | None = None,
    ) -> None:
        self.name = name
        self.max_frame = max_frame  # announced in WELCOME, so peers fail an oversized frame before sending it
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self._peers: dict[ConnId, Peer] = {}
        self._clients: dict[ConnId, ClientState] = {}
        self._workers: dict[ConnId, WorkerState] = {}
        self._initializers: dict[int, Parts] = {}  # executor id -> initializer parts
        self._pools: dict[str, Pool] = {}  # only pools with a client or a worker attached
        self._worker_names: dict[str, ConnId] = {}  # a worker's status name -> its connection
        self._since: float | None = None  # the first event's time: the server's uptime counts from there
        self._done = 0  # calls answered by every worker, ever: a status reader derives calls/s from it
        self._stopping: str | None = None  # why, once an admin sent STOP
        self._stop_workers = False
        self._stop_deadline: float | None = None  # workers told to exit: stop when they have, or then
        self._stopped = False
        self._next_tid = 1
        # Set where the workers are local processes (the embedded cluster): computing(pid) is True while that
        # process is on a CPU. A call holding the interpreter lock in C code (a long regex, big-number
        # arithmetic) lets no heartbeat out, yet its worker is not hung: it is kept, as a thread pool would
        # wait for it. The only outside look the scheduler takes, and only at a silent worker.
        self.computing: Callable[[int], bool] | None = None
        # What to do, in order: read by the server loop without a call (it runs twice per call), taken with
        # take_actions().
        self.actions: list[Action] = []
        self._now = 0.0

    # --- events in -------------------------------------------------------------------------------

    def connected(self, conn: ConnId, now: float, *, local: bool = False) -> None:
        self._now = now
        if self._since is None:
            self._since = now
        self._peers[conn] = Peer(conn, now, now, local)

    def received(self, conn: ConnId, frame: Frame, now: float) -> None:
        """Handle one authenticated frame; a peer that breaks the protocol is closed."""
        self._now = now
        peer = self._peers.get(conn)
        if peer is None:
            return
        peer.last_recv = now
        try:
            self._dispatch_frame(peer, frame)
        except AuthenticationError as exc:
            self._reject(peer, RejectCode.AUTHENTICATION, str(exc))
        except VersionMismatchError as exc:
            self._reject(peer, RejectCode.VERSION, str(exc))
        except (ProtocolError, KeyError, ValueError, TypeError) as exc:
            self._reject(peer, RejectCode.PROTOCOL, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a bug, or input nobody foresaw: that peer goes, the server serves on
            log.exception("unexpected error handling a %s frame from %s", frame.kind.name,
                          printable(peer.name) or conn)
            self._reject(peer, RejectCode.PROTOCOL, f"internal error: {type(exc).__name__}")

    def disconnected(self, conn: ConnId, now: float) -> None:
        self._now = now
        peer = self._peers.pop(conn, None)
        if peer is None:
            return
        if conn in self._workers:
            self._lose_worker(peer, "connection closed")
        elif conn in self._clients:
            self._drop_client(conn)
        self._check_stopped()

    def excuse(self, seconds: float) -> None:
        """Forgive every peer ``seconds`` of silence that was the server's own: its loop did not run (a
        stopped or starved process, a paused VM), so what peers sent meanwhile may not have been read yet.
        A server loop calls this with how late a tick runs, before the tick."""
        for peer in self._peers.values():
            peer.last_recv += seconds

    def tick(self, now: float) -> float:
        """Check heartbeats; returns when the next check is due."""
        self._now = now
        for peer in list(self._peers.values()):
            if peer.local:
                continue
            if now - peer.last_recv > self.heartbeat_timeout:  # also a connection that never said HELLO
                self._silent(peer, now)
            elif self._overdue(peer.conn, now):
                self._close_peer(peer, f"a call is {self.heartbeat_timeout:g}s past its time limit")
            elif peer.role and now - peer.last_send >= self.heartbeat_interval:
                self._send(peer.conn, Frame(Kind.HEARTBEAT))
        self._check_stopped()
        return now + min(self.heartbeat_interval, self.heartbeat_timeout) / 2

    def take_actions(self) -> list[Action]:
        actions, self.actions = self.actions, []
        return actions

    # --- views -----------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Free-or-busy slots of every attached worker that is not draining, all pools together."""
        return sum(pool.capacity for pool in self._pools.values())

    def status(self) -> dict[str, Any]:
        """What ``remote-executor status`` shows (and ``cluster_status`` returns, typed)."""
        now = self._now
        workers = [
            {"name": self._peers[c].name, "host": w.host, "pid": w.pid, "pool": w.pool, "slots": w.slots,
             "running": len(w.running), "done": w.done, "failed": w.failed, "uptime": round(now - w.attached, 3),
             "draining": w.draining}
            for c, w in self._workers.items()
        ]
        clients = [
            {"name": self._peers[c].name, "pool": s.pool, "queued": len(s.queue),
             "running": len(s.tasks) - len(s.queue)}
            for c, s in self._clients.items()
        ]
        pools = {
            name: {"workers": pool.workers, "capacity": pool.capacity, "clients": pool.clients,
                   "queued": sum(len(self._clients[c].queue) for c in pool.ready)}
            for name, pool in sorted(self._pools.items())
        }
        uptime = 0.0 if self._since is None else round(now - self._since, 3)
        return {"server": self.name, "capacity": self.capacity, "workers": workers, "clients": clients,
                "pools": pools, "done": self._done, "uptime": uptime, "stopping": self._stopping is not None}

    # --- frames ----------------------------------------------------------------------------------

    def _dispatch_frame(self, peer: Peer, frame: Frame) -> None:
        if not peer.role:
            if frame.kind != Kind.HELLO:
                raise ProtocolError(f"expected HELLO first, got {frame.kind.name}")
            self._hello(peer, frame)
            return
        handler = _HANDLERS.get((peer.role, frame.kind))
        if handler is None:
            raise ProtocolError(f"a {peer.role} may not send {frame.kind.name}")
        handler(self, peer, frame)

    def _hello(self, peer: Peer, frame: Frame) -> None:
        info = parse_json(frame)
        role = info.get("role")
        if role not in ("client", "worker", "admin"):
            raise ProtocolError(f"unknown role {role!r}")
        peer.name = f"{info.get('name', '?')}#{peer.conn}"
        if role != "admin":
            check_versions(info, f"{role} {peer.name}", self.name)
        state = self._client_state(info) if role == "client" else self._worker_state(info) if role == "worker" else None
        peer.role = str(role)  # validated: from here on the peer is welcome
        welcome = {"server": self.name, "heartbeat_interval": self.heartbeat_interval,
                   "heartbeat_timeout": self.heartbeat_timeout}
        if self.max_frame is not None:
            welcome["max_frame"] = self.max_frame
        self._send_json(peer.conn, Kind.WELCOME, welcome)
        if isinstance(state, ClientState):
            self._add_client(peer, state, frame.parts[1:])
        elif isinstance(state, WorkerState):
            self._add_worker(peer, state)

    @staticmethod
    def _client_state(info: dict[str, Any]) -> ClientState:
        executor_id = _integer(info, "executor_id", None)
        max_retries = _integer(info, "max_retries", 0)
        if not 0 <= executor_id < 1 << 64 or not 0 <= max_retries < 1 << 16:
            raise ValueError("executor_id must be a uint64 and max_retries in 0..65535")
        return ClientState(executor_id, max_retries, _pool_name(info))

    @staticmethod
    def _worker_state(info: dict[str, Any]) -> WorkerState:
        slots = _integer(info, "slots", 1)
        if not 0 < slots < 1 << 16:
            raise ValueError(f"a worker must offer 1..65535 slots, not {slots}")
        pid = _integer(info, "pid", 0)
        host = info.get("host", "")
        if not isinstance(host, str) or len(host) > 255 or not 0 <= pid < 1 << 32:
            raise ValueError("HELLO fields 'host' (a name of at most 255 characters) and 'pid' are malformed")
        return WorkerState(slots, _pool_name(info), host=host, pid=pid)

    def _pool(self, name: str) -> Pool:
        pool = self._pools.get(name)
        if pool is None:
            pool = self._pools[name] = Pool()
        return pool

    def _forget_if_unused(self, name: str) -> None:
        """Drop a pool nobody is attached to: pool names come from peers and must not pile up."""
        pool = self._pools.get(name)
        if pool is not None and pool.clients == 0 and pool.workers == 0:
            del self._pools[name]

    def _add_client(self, peer: Peer, state: ClientState, init_parts: Parts) -> None:
        self._clients[peer.conn] = state
        pool = self._pool(state.pool)
        pool.clients += 1
        if init_parts:
            self._initializers[state.executor_id] = list(init_parts)
        self._send(peer.conn, Frame(Kind.CAPACITY, a=pool.capacity))

    def _add_worker(self, peer: Peer, state: WorkerState) -> None:
        self._workers[peer.conn] = state
        self._worker_names[peer.name] = peer.conn
        state.attached = self._now
        pool = self._pool(state.pool)
        pool.workers += 1
        pool.free[peer.conn] = None
        log.info("worker %s attached to pool %s with %d slot(s)", printable(peer.name), state.pool, state.slots)
        self._capacity_changed(state.pool)
        self._assign(pool)

    def _on_submit(self, peer: Peer, frame: Frame) -> None:
        state = self._clients[peer.conn]
        if frame.b > state.max_retries:
            raise ValueError(f"a call that ran {frame.b} time(s) is beyond max_retries={state.max_retries}")
        # frame.b: how often the call may already have run (on servers this client lost): counted here too,
        # so that max_retries bounds its executions across servers.
        target, limit, parts = None, None, frame.parts
        if frame.flags & (PINNED | LIMITED):  # (a plain call skips two parsers)
            target, frame = split_pinned(frame)
            limit, parts = split_limit(frame)
        task = Task(self._next_tid, peer.conn, frame.a, state.executor_id, parts, attempts=frame.b, limit=limit,
                    worker=target)
        self._next_tid += 1
        if target is not None:
            self._submit_pinned(state, task, target)
            return
        state.tasks[task.tid] = task
        pool = self._pools[state.pool]
        if not state.queue:
            pool.ready.append(peer.conn)
        state.queue.append(task)
        if self._stopping is not None:  # it will never start here: the client may send it elsewhere
            self._send(peer.conn, self._requeued(task))
        self._assign(pool)

    def _submit_pinned(self, state: ClientState, task: Task, target: str) -> None:
        """A broadcast's call for one worker: it waits for that worker only, or fails now if it is gone."""
        conn = self._worker_names.get(target)
        worker = self._workers.get(conn) if conn is not None else None
        if conn is None or worker is None or worker.pool != state.pool or worker.draining:
            self._send_pinned_lost(task, "was gone (or draining) before the call reached it", ran=False)
            return
        state.tasks[task.tid] = task
        worker.pinned.append(task)
        self._start_pinned(conn, worker)

    def _start_pinned(self, conn: ConnId, worker: WorkerState) -> None:
        """Start the worker's pinned calls its free slots can take (before any call of the pool's queue)."""
        started = False
        while worker.pinned and worker.free() > 0:
            self._start(conn, worker, worker.pinned.popleft())
            started = True
        if started and worker.free() <= 0:
            self._pools[worker.pool].free.pop(conn, None)

    def _on_workers(self, peer: Peer, frame: Frame) -> None:
        """The workers of the client's pool that take calls now: the targets of its broadcast."""
        pool = self._clients[peer.conn].pool
        names = [self._peers[c].name for c, w in self._workers.items() if w.pool == pool and not w.draining]
        self._send(peer.conn, Frame(Kind.WORKERS, a=frame.a, parts=json_frame(Kind.WORKERS, {"workers": names}).parts))

    def _on_result(self, peer: Peer, frame: Frame) -> None:
        worker = self._workers[peer.conn]
        task = worker.running.pop(frame.a, None)
        if task is None:
            return  # a task of a client that has gone
        worker.done += 1
        self._done += 1
        timed_out = frame.b == Status.TIMED_OUT and task.limit is not None
        if timed_out or frame.flags & FAILED:
            worker.failed += 1
        client = self._clients.get(task.client)
        if client is not None:
            del client.tasks[task.tid]
            if timed_out:
                log.info("worker %s stopped a call at its time limit of %gs", printable(peer.name), task.limit)
                self._send_timed_out(task, peer.name)
            else:
                self._send(task.client, Frame(Kind.RESULT, a=task.client_tid, b=Status.DONE, parts=frame.parts))
        if timed_out:  # the worker process is exiting, whoever the call was for: no new call may go to it
            worker.draining = True
            self._fail_pinned_queue(worker, peer.name, "is exiting after it stopped a call at its time limit")
            self._capacity_changed(worker.pool)
        if worker.pinned:
            self._start_pinned(peer.conn, worker)
        pool = self._pools[worker.pool]
        if not worker.draining and worker.slots > len(worker.running):  # worker.free() > 0, inline
            pool.free[peer.conn] = None
        else:
            pool.free.pop(peer.conn, None)  # full, or draining since it timed a call out
        if worker.draining and not worker.running:
            log.info("worker %s drained", printable(peer.name))
        self._assign(pool)
        if self._stopping is not None:
            self._check_stopped()

    def _on_init_failed(self, peer: Peer, frame: Frame) -> None:
        executor_id = frame.a
        worker = self._workers[peer.conn]
        if executor_id not in worker.initialized:  # it was sent no INIT of that executor (or answered it)
            raise ProtocolError(f"INIT_FAILED for executor {executor_id:x}, whose initializer this worker was "
                                f"not asked to run")
        worker.initialized.discard(executor_id)
        log.error("initializer of executor %x failed on worker %s", executor_id, printable(peer.name))
        for conn, state in list(self._clients.items()):
            if state.executor_id == executor_id:
                self._send(conn, Frame(Kind.BROKEN, a=executor_id, parts=frame.parts))
                self._clear_queue(conn, state)

    def _on_drain(self, peer: Peer, frame: Frame) -> None:
        worker = self._workers[peer.conn]
        worker.draining = True
        self._pools[worker.pool].free.pop(peer.conn, None)
        self._fail_pinned_queue(worker, peer.name, "began draining before it could run the call")
        log.info("worker %s is draining", printable(peer.name))
        self._send(peer.conn, Frame(Kind.DRAIN))  # after this, no TASK can be on its way to the worker
        self._capacity_changed(worker.pool)

    def _on_status(self, peer: Peer, frame: Frame) -> None:
        self._send(peer.conn, Frame(Kind.STATUS, a=frame.a, parts=json_frame(Kind.STATUS, self.status()).parts))

    def _on_stop(self, peer: Peer, frame: Frame) -> None:
        """An admin stops this server: running calls finish first; with b=1 its workers exit for good."""
        running = sum(len(w.running) + len(w.pinned) for w in self._workers.values())
        if self._stopping is None:
            self._stopping = f"stopped by {peer.name}"
            log.warning("%s (with its workers: %s); %d call(s) still running", self._stopping,
                        "yes" if frame.b else "no", running)
            for conn, state in self._clients.items():  # their queued calls will not start here
                for task in state.queue:
                    self._send(conn, self._requeued(task))
        self._stop_workers = self._stop_workers or bool(frame.b)
        self._send_json(peer.conn, Kind.STOP, {"server": self.name, "running": running,
                                                "workers": len(self._workers)})
        self._check_stopped()

    def stop_now(self, reason: str) -> None:
        """Stop at once (``remote-executor server`` got SIGTERM): first tell each client which of its calls
        never started here, so that it resubmits them elsewhere without counting an attempt. The calls
        running are lost with this server, as in a crash: the client counts them."""
        if self._stopped:
            return
        if self._stopping is None:
            self._stopping = reason
            for conn, state in self._clients.items():
                for task in state.queue:
                    self._send(conn, self._requeued(task))
        self._stopped = True
        self.actions.append(Stop(self._stopping))

    def _check_stopped(self) -> None:
        """Once stopping and no call runs: tell the workers to exit (if asked), then stop."""
        if self._stopping is None or self._stopped:
            return
        if any(w.running or w.pinned for w in self._workers.values()):
            return
        if self._stop_workers and self._workers:
            if self._stop_deadline is None:
                self._stop_deadline = self._now + self.heartbeat_timeout
                for conn in self._workers:
                    self._send(conn, Frame(Kind.DRAIN, b=1))
            if self._now < self._stop_deadline:
                return  # each worker closes its connection as it exits; the last one to go stops us
        # Nothing runs here now and nothing will: every call a client sent and has no answer for (one on its
        # way as this server stopped, sent into the slot a last result freed) never started here.
        for conn in self._clients:
            self._send(conn, Frame(Kind.STOP))
        self._stopped = True
        self.actions.append(Stop(self._stopping))

    def _on_heartbeat(self, peer: Peer, frame: Frame) -> None:
        """Receiving any frame already refreshed ``last_recv``."""

    # --- assignment --------------------------------------------------------------------------------

    def _assign(self, pool: Pool) -> None:
        """Hand a pool's queued tasks to its free worker slots, one client at a time in round-robin order."""
        while pool.ready and pool.free and self._stopping is None:
            conn = next(iter(pool.free))
            worker = self._workers[conn]
            self._start(conn, worker, self._next_task(pool))
            if worker.free() <= 0:
                del pool.free[conn]

    def _next_task(self, pool: Pool) -> Task:
        conn = pool.ready.popleft()
        state = self._clients[conn]
        task = state.queue.popleft()
        if state.queue:
            pool.ready.append(conn)
        return task

    def _start(self, conn: ConnId, worker: WorkerState, task: Task) -> None:
        if task.executor_id not in worker.initialized:
            worker.initialized.add(task.executor_id)
            init = self._initializers.get(task.executor_id)
            if init is not None:
                self._send(conn, Frame(Kind.INIT, a=task.executor_id, parts=init))
        worker.running[task.tid] = task
        if task.limit is not None:
            task.deadline = self._now + task.limit
            self._send(task.client, Frame(Kind.STARTED, a=task.client_tid))
        self._send(conn, call_frame(Kind.TASK, task.tid, task.executor_id, task.parts, task.limit))

    # --- loss --------------------------------------------------------------------------------------

    def _overdue(self, conn: ConnId, now: float) -> bool:
        """A worker that neither answered nor went away a heartbeat timeout after a call's deadline."""
        worker = self._workers.get(conn)
        return worker is not None and any(t.expired(now - self.heartbeat_timeout) for t in worker.running.values())

    def _silent(self, peer: Peer, now: float) -> None:
        worker = self._workers.get(peer.conn)
        if worker is not None and worker.running and worker.pid and self.computing is not None \
                and self.computing(worker.pid):
            limited(log, logging.WARNING, (owner(self), "computing"), "worker %s has sent no heartbeat for %.1fs "
                    "but is on a CPU: a call holding the interpreter lock; waiting for it", printable(peer.name),
                    now - peer.last_recv, now=now)
            peer.last_recv = now  # judged again a heartbeat timeout from now
            return
        self._close_peer(peer, f"no heartbeat for {now - peer.last_recv:.1f}s")

    def _close_peer(self, peer: Peer, reason: str) -> None:
        """Close a peer that failed us (a silent one, a worker past a call's limit); requeue its calls."""
        limited(log, logging.WARNING, (owner(self), "silent", peer.role), "%s %s: %s, closing",
                peer.role or "connection", printable(peer.name or f"#{peer.conn}"), reason, now=self._now)
        worker = self._workers.get(peer.conn)
        self.actions.append(Close(peer.conn, reason, worker.pid if worker is not None else 0))
        del self._peers[peer.conn]
        if peer.conn in self._workers:
            self._lose_worker(peer, reason)
        elif peer.conn in self._clients:
            self._drop_client(peer.conn)

    def _lose_worker(self, peer: Peer, reason: str) -> None:
        worker = self._workers.pop(peer.conn)
        self._worker_names.pop(peer.name, None)
        self._fail_pinned_queue(worker, peer.name, f"was lost before it could run the call ({reason})")
        pool = self._pools[worker.pool]
        pool.free.pop(peer.conn, None)
        pool.workers -= 1
        if worker.running:
            log.warning("worker %s lost with %d call(s) running: %s", printable(peer.name), len(worker.running),
                        printable(reason))
        for task in worker.running.values():
            self._requeue_or_fail(task, peer.name)
        self._capacity_changed(worker.pool)
        self._assign(pool)
        self._forget_if_unused(worker.pool)

    def _requeue_or_fail(self, task: Task, worker_name: str) -> None:
        client = self._clients.get(task.client)
        if client is None:
            return
        if task.expired(self._now):  # lost because it ran out of time (or just after): never run again
            del client.tasks[task.tid]
            self._send_timed_out(task, worker_name)
            return
        if task.worker is not None:  # a broadcast's call: reported lost, never run elsewhere
            del client.tasks[task.tid]
            self._send_pinned_lost(task, "was lost while running the call")
            return
        task.attempts += 1
        task.lost_on.append(worker_name)
        if task.attempts <= client.max_retries:
            if not client.queue:
                self._pools[client.pool].ready.append(task.client)
            client.queue.appendleft(task)
            # The client keeps the count and the names too, for when it must resubmit the call to another
            # server: its WorkerLostError then names the workers lost on every server.
            self._send(task.client, self._requeued(task, worker_name))
            return
        del client.tasks[task.tid]
        parts = worker_lost_parts(task.lost_on, task.attempts)
        self._send(task.client, Frame(Kind.RESULT, a=task.client_tid, b=Status.WORKER_LOST, parts=parts))

    def _requeued(self, task: Task, lost_on: str | None = None) -> Frame:
        """REQUEUED for a queued call: how often it may have run, and, once this server is stopping (no
        queued call starts any more), that it will not run here: the client resubmits it to the server
        that takes this one's place without counting an attempt. Else ``lost_on``, the worker just lost
        with it, if that is why it was queued again."""
        parts: Parts = [NOT_STARTED] if self._stopping is not None else []
        if lost_on is not None:  # (an older client reads NOT_STARTED only alone: it then counts one more)
            parts += [LOST_ON, lost_on.encode(errors="replace")]
        return Frame(Kind.REQUEUED, a=task.client_tid, b=task.attempts, parts=parts)

    def _fail_pinned_queue(self, worker: WorkerState, name: str, what: str) -> None:
        """Fail every pinned call still waiting for ``worker`` (it is going): none may run elsewhere."""
        while worker.pinned:
            task = worker.pinned.popleft()
            client = self._clients.get(task.client)
            if client is not None:
                client.tasks.pop(task.tid, None)
                self._send_pinned_lost(task, what, ran=False)

    def _send_pinned_lost(self, task: Task, what: str, ran: bool = True) -> None:
        assert task.worker is not None
        reason = (f"the worker {task.worker} {what}; a broadcast call runs on its own worker only and is "
                  f"never retried elsewhere")
        parts = worker_lost_parts([task.worker], task.attempts + ran, reason)
        self._send(task.client, Frame(Kind.RESULT, a=task.client_tid, b=Status.WORKER_LOST, parts=parts))

    def _send_timed_out(self, task: Task, worker_name: str) -> None:
        assert task.limit is not None
        parts = timed_out_parts(worker_name, task.limit)
        self._send(task.client, Frame(Kind.RESULT, a=task.client_tid, b=Status.TIMED_OUT, parts=parts))

    def _drop_client(self, conn: ConnId) -> None:
        state = self._clients.pop(conn)
        self._clear_queue(conn, state)
        self._pools[state.pool].clients -= 1
        self._forget_if_unused(state.pool)
        if not any(s.executor_id == state.executor_id for s in self._clients.values()):
            self._initializers.pop(state.executor_id, None)

    def _clear_queue(self, conn: ConnId, state: ClientState) -> None:
        for task in state.queue:
            state.tasks.pop(task.tid, None)
        state.queue.clear()
        ready = self._pools[state.pool].ready
        if conn in ready:
            ready.remove(conn)
        for worker in self._workers.values():  # its broadcast calls waiting for their workers
            if any(task.client == conn for task in worker.pinned):
                for task in [t for t in worker.pinned if t.client == conn]:
                    worker.pinned.remove(task)
                    state.tasks.pop(task.tid, None)

    def _reject(self, peer: Peer, code: RejectCode, reason: str) -> None:
        limited(log, logging.WARNING, (owner(self), "reject", code), "rejecting %s: %s",
                printable(peer.name or f"connection #{peer.conn}"), printable(reason), now=self._now)
        self._send(peer.conn, reject(code, reason))
        self.actions.append(Close(peer.conn, reason))
        self.disconnected(peer.conn, peer.last_recv)

    # --- output --------------------------------------------------------------------------------------

    def _capacity_changed(self, name: str) -> None:
        """Recount a pool's slots after a worker came, went or began draining; tell its clients if it moved."""
        pool = self._pools[name]
        capacity = sum(0 if w.draining else w.slots for w in self._workers.values() if w.pool == name)
        if capacity == pool.capacity:
            return
        pool.capacity = capacity
        for conn, state in self._clients.items():
            if state.pool == name:
                self._send(conn, Frame(Kind.CAPACITY, a=capacity))

    def _send(self, conn: ConnId, frame: Frame) -> None:
        peer = self._peers.get(conn)
        if peer is not None:
            peer.last_send = self._now
        self.actions.append(Send(conn, frame))

    def _send_json(self, conn: ConnId, kind: Kind, body: dict[str, Any]) -> None:
        self._send(conn, json_frame(kind, body))


_HANDLERS = {
    ("client", Kind.SUBMIT): Scheduler._on_submit,
    ("client", Kind.HEARTBEAT): Scheduler._on_heartbeat,
    ("client", Kind.WORKERS): Scheduler._on_workers,
    ("client", Kind.STATUS): Scheduler._on_status,
    ("worker", Kind.RESULT): Scheduler._on_result,
    ("worker", Kind.INIT_FAILED): Scheduler._on_init_failed,
    ("worker", Kind.DRAIN): Scheduler._on_drain,
    ("worker", Kind.HEARTBEAT): Scheduler._on_heartbeat,
    ("admin", Kind.STATUS): Scheduler._on_status,
    ("admin", Kind.STOP): Scheduler._on_stop,
    ("admin", Kind.HEARTBEAT): Scheduler._on_heartbeat,
}


def _pool_name(info: dict[str, Any]) -> str:
    """The pool a HELLO names (the default pool if it names none); checked, since it comes from a peer."""
    name = info.get("pool", DEFAULT_POOL)
    if not is_pool_name(name):
        raise ValueError(f"HELLO field 'pool' must be 1 to 200 letters, digits, '.', '_' or '-', not {name!r}")
    return str(name)


def _integer(info: dict[str, Any], name: str, default: int | None) -> int:
    """An integer field of a HELLO; JSON can hold anything, so check rather than trust."""
    value = info.get(name, default)
    if type(value) is not int:
        raise ValueError(f"HELLO field {name!r} must be an integer, not {value!r}")
    return value
