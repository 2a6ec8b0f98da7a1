"""The scheduler against a model, driven by hypothesis: clients and workers come, work, drain and go.

The model is built only from what the test does and what the scheduler answers (its actions): which
calls each client has outstanding, which server task each worker runs, which executors each worker
connection has had an INIT for, the capacity each client was last told. Every action is checked as it
is applied, and the invariants after every step compare the model with :meth:`Scheduler.status`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from remote_executor.jobserver.scheduler import Action, Close, ConnId, Scheduler, Send
from remote_executor.wire.frames import Frame, Kind, Status
from remote_executor.wire.messages import hello
from remote_executor.wire.serialization import Parts

INTERVAL = 1.0
TIMEOUT = 5.0
INIT_EXECUTOR = 1  # its clients bring an initializer
PLAIN_EXECUTOR = 2  # its clients do not


@dataclass
class ClientModel:
    name: str
    executor_id: int
    max_retries: int
    next_ctid: int = 1
    outstanding: set[int] = field(default_factory=set)  # submitted and not yet answered
    losses: dict[int, list[str]] = field(default_factory=dict)  # ctid -> names of the workers lost with it
    capacity: int | None = None  # the last CAPACITY it was sent


@dataclass
class WorkerModel:
    name: str
    slots: int
    draining: bool = False
    running: dict[int, tuple[ConnId, int]] = field(default_factory=dict)  # server tid -> (client, ctid)
    initialized: set[int] = field(default_factory=set)  # executors it got an INIT for


def payload(client: ConnId, ctid: int) -> bytes:
    return f"{client}:{ctid}".encode()


def unpayload(data: bytes) -> tuple[ConnId, int]:
    client, ctid = data.decode().split(":")
    return int(client), int(ctid)


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.s = Scheduler(heartbeat_interval=INTERVAL, heartbeat_timeout=TIMEOUT)
        self.now = 0.0
        self.next_conn = 1
        self.clients: dict[ConnId, ClientModel] = {}
        self.workers: dict[ConnId, WorkerModel] = {}
        self.expected_done: set[tuple[ConnId, int]] = set()  # results fed this step, not yet forwarded
        self.expected_close: set[ConnId] = set()

    # --- driving ---------------------------------------------------------------------------------------

    def _conn(self) -> ConnId:
        conn = self.next_conn
        self.next_conn += 1
        return conn

    def _step(self, actions: list[Action]) -> None:
        for action in actions:
            self._apply(action)
        assert not self.expected_done, f"results never forwarded: {self.expected_done}"
        assert not self.expected_close, f"never closed: {self.expected_close}"

    def _recv(self, conn: ConnId, frame: Frame) -> None:
        self.s.received(conn, frame, self.now)
        self._step(self.s.take_actions())

    def _lose_in_model(self, conn: ConnId) -> None:
        """What the scheduler must do when a worker is lost: its calls are lost once more."""
        worker = self.workers.pop(conn)
        for client, ctid in worker.running.values():
            if client in self.clients:
                self.clients[client].losses.setdefault(ctid, []).append(worker.name)

    # --- rules -----------------------------------------------------------------------------------------

    @rule(executor_id=st.sampled_from([INIT_EXECUTOR, PLAIN_EXECUTOR]), max_retries=st.integers(0, 2))
    def connect_client(self, executor_id: int, max_retries: int) -> None:
        conn = self._conn()
        self.clients[conn] = ClientModel(f"c{conn}#{conn}", executor_id, max_retries)
        init: Parts | None = [f"init-{executor_id}".encode()] if executor_id == INIT_EXECUTOR else None
        info = {"name": f"c{conn}", "executor_id": executor_id, "max_retries": max_retries}
        self.s.connected(conn, self.now)
        self._recv(conn, hello("client", info, init))
        assert self.clients[conn].capacity is not None, "a new client must be told the capacity"

    @rule(slots=st.integers(1, 2))
    def connect_worker(self, slots: int) -> None:
        conn = self._conn()
        self.workers[conn] = WorkerModel(f"w{conn}#{conn}", slots)
        self.s.connected(conn, self.now)
        self._recv(conn, hello("worker", {"name": f"w{conn}", "slots": slots}))

    @precondition(lambda self: self.clients)
    @rule(data=st.data())
    def submit(self, data: st.DataObject) -> None:
        conn = data.draw(st.sampled_from(sorted(self.clients)), label="client")
        client = self.clients[conn]
        ctid = client.next_ctid
        client.next_ctid += 1
        client.outstanding.add(ctid)
        self._recv(conn, Frame(Kind.SUBMIT, a=ctid, parts=[payload(conn, ctid)]))

    @precondition(lambda self: any(w.running for w in self.workers.values()))
    @rule(data=st.data())
    def complete(self, data: st.DataObject) -> None:
        busy = sorted(c for c, w in self.workers.items() if w.running)
        conn = data.draw(st.sampled_from(busy), label="worker")
        tid = data.draw(st.sampled_from(sorted(self.workers[conn].running)), label="task")
        client, ctid = self.workers[conn].running.pop(tid)
        if client in self.clients:
            self.expected_done.add((client, ctid))
        self._recv(conn, Frame(Kind.RESULT, a=tid, parts=[b"outcome " + payload(client, ctid)]))

    @precondition(lambda self: self.workers)
    @rule(data=st.data())
    def worker_disconnects(self, data: st.DataObject) -> None:
        conn = data.draw(st.sampled_from(sorted(self.workers)), label="worker")
        self._lose_in_model(conn)
        self.s.disconnected(conn, self.now)
        self._step(self.s.take_actions())

    @precondition(lambda self: self.workers)
    @rule(data=st.data())
    def worker_goes_silent(self, data: st.DataObject) -> None:
        conn = data.draw(st.sampled_from(sorted(self.workers)), label="worker")
        self.now += TIMEOUT + 1
        for other in sorted((set(self.clients) | set(self.workers)) - {conn}):
            self._recv(other, Frame(Kind.HEARTBEAT))
        self._lose_in_model(conn)
        self.expected_close.add(conn)
        self.s.tick(self.now)
        self._step(self.s.take_actions())

    @precondition(lambda self: self.clients)
    @rule(data=st.data())
    def client_disconnects(self, data: st.DataObject) -> None:
        conn = data.draw(st.sampled_from(sorted(self.clients)), label="client")
        del self.clients[conn]  # what it had running stays on the workers, its results are dropped
        self.s.disconnected(conn, self.now)
        self._step(self.s.take_actions())

    @precondition(lambda self: any(not w.draining for w in self.workers.values()))
    @rule(data=st.data())
    def drain(self, data: st.DataObject) -> None:
        conn = data.draw(st.sampled_from(sorted(c for c, w in self.workers.items() if not w.draining)),
                         label="worker")
        self.workers[conn].draining = True
        self.s.received(conn, Frame(Kind.DRAIN), self.now)
        actions = self.s.take_actions()
        assert Send(conn, Frame(Kind.DRAIN)) in actions, "a draining worker gets its DRAIN ack"
        self._step(actions)

    # --- checking each action --------------------------------------------------------------------------

    def _apply(self, action: Action) -> None:
        if isinstance(action, Close):
            assert action.conn in self.expected_close, f"unexpected {action}"
            self.expected_close.discard(action.conn)
            return
        conn, frame = action.conn, action.frame
        assert conn in self.clients or conn in self.workers, f"{frame.kind.name} sent to a dead peer {conn}"
        handler = _APPLY.get(frame.kind)
        assert handler is not None, f"unexpected {frame.kind.name} to {conn}"
        handler(self, conn, frame)

    def _on_task(self, conn: ConnId, frame: Frame) -> None:
        worker = self.workers.get(conn)
        assert worker is not None, f"TASK sent to client {conn}"
        assert not worker.draining, f"TASK sent to draining worker {worker.name}"
        assert len(worker.running) < worker.slots, f"TASK sent to full worker {worker.name}"
        client, ctid = unpayload(bytes(frame.parts[0]))
        assert client in self.clients, f"TASK for the call {ctid} of departed client {client}"
        assert ctid in self.clients[client].outstanding, f"TASK for answered call {client}:{ctid}"
        assert frame.b == self.clients[client].executor_id
        for other in self.workers.values():
            assert (client, ctid) not in other.running.values(), f"{client}:{ctid} already on {other.name}"
            assert frame.a not in other.running, f"server task id {frame.a} reused"
        if frame.b == INIT_EXECUTOR:
            assert INIT_EXECUTOR in worker.initialized, f"TASK before INIT on {worker.name}"
        worker.running[frame.a] = (client, ctid)

    def _on_init(self, conn: ConnId, frame: Frame) -> None:
        worker = self.workers[conn]
        assert frame.a == INIT_EXECUTOR, f"INIT for executor {frame.a}, which has no initializer"
        assert frame.parts == [b"init-1"]
        assert frame.a not in worker.initialized, f"second INIT of executor {frame.a} on {worker.name}"
        worker.initialized.add(frame.a)

    def _on_result(self, conn: ConnId, frame: Frame) -> None:
        client = self.clients.get(conn)
        assert client is not None, f"RESULT sent to worker {conn}"
        ctid = frame.a
        assert ctid in client.outstanding, f"second or unknown answer for {conn}:{ctid}"
        assert not any((conn, ctid) in w.running.values() for w in self.workers.values())
        if frame.b == Status.DONE:
            assert (conn, ctid) in self.expected_done, f"DONE for {conn}:{ctid} that no worker finished"
            assert frame.parts == [b"outcome " + payload(conn, ctid)]
            self.expected_done.discard((conn, ctid))
        else:
            assert frame.b == Status.WORKER_LOST
            lost_on = client.losses.get(ctid, [])
            assert len(lost_on) > client.max_retries, f"{conn}:{ctid} failed before its retries were used"
            assert json.loads(bytes(frame.parts[0])) == {"workers": lost_on, "attempts": len(lost_on)}
        client.outstanding.discard(ctid)

    def _on_capacity(self, conn: ConnId, frame: Frame) -> None:
        assert conn in self.clients, f"CAPACITY sent to worker {conn}"
        self.clients[conn].capacity = frame.a

    def _on_requeued(self, conn: ConnId, frame: Frame) -> None:
        """The client is told how often its call was lost, the count it resubmits with elsewhere."""
        assert conn in self.clients, f"REQUEUED sent to worker {conn}"
        client = self.clients[conn]
        assert frame.a in client.outstanding
        assert frame.b == len(client.losses.get(frame.a, [])) <= client.max_retries

    def _on_quiet(self, conn: ConnId, frame: Frame) -> None:
        """WELCOME, HEARTBEAT, DRAIN: nothing for the model."""

    # --- invariants ------------------------------------------------------------------------------------

    def _running_of(self, conn: ConnId) -> set[int]:
        return {ctid for w in self.workers.values() for c, ctid in w.running.values() if c == conn}

    @invariant()
    def every_call_is_in_exactly_one_place(self) -> None:
        status = {c["name"]: c for c in self.s.status()["clients"]}
        assert set(status) == {m.name for m in self.clients.values()}
        for conn, client in self.clients.items():
            running = self._running_of(conn)
            assert running <= client.outstanding
            queued = client.outstanding - running
            seen = status[client.name]
            assert (seen["queued"], seen["running"]) == (len(queued), len(running)), client.name

    @invariant()
    def retries_are_honoured(self) -> None:
        for client in self.clients.values():
            for ctid in client.outstanding:
                assert len(client.losses.get(ctid, [])) <= client.max_retries

    @invariant()
    def workers_match_and_never_run_more_than_their_slots(self) -> None:
        status = {w["name"]: w for w in self.s.status()["workers"]}
        assert set(status) == {m.name for m in self.workers.values()}
        for worker in self.workers.values():
            assert len(worker.running) <= worker.slots
            assert status[worker.name]["running"] == len(worker.running)
            assert status[worker.name]["draining"] == worker.draining

    @invariant()
    def clients_know_the_capacity(self) -> None:
        capacity = sum(w.slots for w in self.workers.values() if not w.draining)
        assert self.s.capacity == capacity
        for client in self.clients.values():
            assert client.capacity == capacity, f"{client.name} was told {client.capacity}, not {capacity}"

    @invariant()
    def no_call_waits_while_a_slot_is_free(self) -> None:
        if any(client.outstanding - self._running_of(conn) for conn, client in self.clients.items()):
            for worker in self.workers.values():
                assert worker.draining or len(worker.running) == worker.slots, f"{worker.name} idles"


_APPLY = {
    Kind.TASK: SchedulerMachine._on_task,
    Kind.INIT: SchedulerMachine._on_init,
    Kind.RESULT: SchedulerMachine._on_result,
    Kind.CAPACITY: SchedulerMachine._on_capacity,
    Kind.REQUEUED: SchedulerMachine._on_requeued,
    Kind.WELCOME: SchedulerMachine._on_quiet,
    Kind.HEARTBEAT: SchedulerMachine._on_quiet,
    Kind.DRAIN: SchedulerMachine._on_quiet,
}

SchedulerMachine.TestCase.settings = settings(max_examples=50, stateful_step_count=30, deadline=None)
TestScheduler = SchedulerMachine.TestCase
