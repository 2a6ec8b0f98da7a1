"""The job server's sans-I/O scheduler on its own: frames in with explicit times, actions out.

No sockets, no threads, no clock: a :class:`Harness` owns the scheduler and the current ``now``, and each
step returns the actions (``Send``/``Close``) the scheduler asked for, which the tests inspect.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from remote_executor.jobserver.scheduler import Action, Close, ConnId, Scheduler, Send, Stop, WorkerState
from remote_executor.wire.frames import FAILED, LOST_ON, NOT_STARTED, Frame, Kind, Status
from remote_executor.wire.messages import hello
from remote_executor.wire.serialization import Parts

EXEC = 7
INTERVAL = 1.0
TIMEOUT = 5.0


def client_hello(name: str = "client", executor_id: int = EXEC, max_retries: int = 0,
                 init: Parts | None = None, **extra: object) -> Frame:
    info = {"name": name, "executor_id": executor_id, "max_retries": max_retries, **extra}
    return hello("client", info, init)


def worker_hello(name: str = "worker", slots: int = 1, **extra: object) -> Frame:
    return hello("worker", {"name": name, "slots": slots, **extra})


def call(label: str) -> Parts:
    return [f"call {label}".encode()]


class Harness:
    """A scheduler and a clock; every step returns the actions it produced."""

    def __init__(self, **kwargs: object) -> None:
        kwargs.setdefault("heartbeat_interval", INTERVAL)
        kwargs.setdefault("heartbeat_timeout", TIMEOUT)
        self.s = Scheduler(**kwargs)  # type: ignore[arg-type]
        self.now = 0.0
        self.workers: set[ConnId] = set()

    def connect(self, conn: ConnId, first: Frame, *, local: bool = False) -> list[Action]:
        self.s.connected(conn, self.now, local=local)
        return self.recv(conn, first)

    def client(self, conn: ConnId, *, local: bool = True, **kwargs: object) -> list[Action]:
        """Clients are in-process by default so that only the workers' heartbeats matter."""
        return self.connect(conn, client_hello(**kwargs), local=local)  # type: ignore[arg-type]

    def worker(self, conn: ConnId, name: str = "worker", slots: int = 1) -> list[Action]:
        self.workers.add(conn)
        return self.connect(conn, worker_hello(name, slots))

    def recv(self, conn: ConnId, frame: Frame) -> list[Action]:
        self.s.received(conn, frame, self.now)
        return self.s.take_actions()

    def submit(self, conn: ConnId, client_tid: int, label: str | None = None) -> list[Action]:
        return self.recv(conn, Frame(Kind.SUBMIT, a=client_tid, parts=call(label or str(client_tid))))

    def result(self, conn: ConnId, tid: int, outcome: bytes = b"outcome") -> list[Action]:
        return self.recv(conn, Frame(Kind.RESULT, a=tid, parts=[outcome]))

    def disconnect(self, conn: ConnId) -> list[Action]:
        self.workers.discard(conn)
        self.s.disconnected(conn, self.now)
        return self.s.take_actions()

    def tick(self, now: float) -> list[Action]:
        self.now = now
        self.s.tick(now)
        return self.s.take_actions()

    def silence(self, conn: ConnId) -> list[Action]:
        """Let ``conn`` stay silent past the timeout while every other worker keeps beating."""
        self.now += TIMEOUT + 1
        for other in self.workers - {conn}:
            assert self.recv(other, Frame(Kind.HEARTBEAT)) == []
        self.workers.discard(conn)
        actions = self.tick(self.now)
        assert [a.conn for a in actions if isinstance(a, Close)] == [conn]
        return [a for a in actions if not is_heartbeat(a)]

    def lose(self, conn: ConnId, how: str) -> list[Action]:
        """Lose a worker by disconnect or by silence; the Close of a silent worker is left out."""
        if how == "disconnect":
            return self.disconnect(conn)
        return [a for a in self.silence(conn) if not isinstance(a, Close)]


def is_heartbeat(action: Action) -> bool:
    return isinstance(action, Send) and action.frame.kind == Kind.HEARTBEAT


def sent(actions: Sequence[Action], conn: ConnId | None = None, kind: Kind | None = None) -> list[Frame]:
    return [a.frame for a in actions if isinstance(a, Send)
            and (conn is None or a.conn == conn) and (kind is None or a.frame.kind == kind)]


def tasks_to(actions: Sequence[Action], conn: ConnId) -> list[bytes]:
    """The call payloads sent to worker ``conn``, in order."""
    return [bytes(f.parts[0]) for f in sent(actions, conn, Kind.TASK)]


def tids_to(actions: Sequence[Action], conn: ConnId) -> list[int]:
    return [f.a for f in sent(actions, conn, Kind.TASK)]


def capacities(actions: Sequence[Action], conn: ConnId) -> list[int]:
    return [f.a for f in sent(actions, conn, Kind.CAPACITY)]


def assert_rejected(actions: Sequence[Action], conn: ConnId, reason_contains: str) -> str:
    """Exactly one REJECT then a Close for ``conn`` (other peers may get frames as a consequence)."""
    mine = [a for a in actions if a.conn == conn]
    assert len(mine) == 2, mine
    reject, close = mine
    assert isinstance(reject, Send)
    assert reject.frame.kind == Kind.REJECT
    reason = bytes(reject.frame.parts[0]).decode()
    assert reason_contains in reason
    assert isinstance(close, Close)
    return reason


# --- handshake ---------------------------------------------------------------------------------------


def test_client_hello_gets_welcome_then_capacity() -> None:
    h = Harness(name="js-1")
    actions = h.client(1)
    assert [type(a) for a in actions] == [Send, Send]
    welcome, capacity = sent(actions, 1)
    assert welcome.kind == Kind.WELCOME
    assert json.loads(bytes(welcome.parts[0])) == {"server": "js-1", "heartbeat_interval": INTERVAL,
                                            "heartbeat_timeout": TIMEOUT}
    assert (capacity.kind, capacity.a) == (Kind.CAPACITY, 0)


def test_worker_hello_gets_welcome_only() -> None:
    h = Harness()
    actions = h.worker(1, slots=3)
    assert [f.kind for f in sent(actions)] == [Kind.WELCOME]
    assert not [a for a in actions if isinstance(a, Close)]
    assert h.s.capacity == 3


def test_frame_before_hello_is_rejected() -> None:
    h = Harness()
    actions = h.connect(1, Frame(Kind.SUBMIT, a=1, parts=call("early")))
    assert_rejected(actions, 1, "HELLO")
    assert h.s.status()["clients"] == []


def test_unknown_role_is_rejected() -> None:
    h = Harness()
    actions = h.connect(1, hello("overlord", {"name": "x"}))
    assert_rejected(actions, 1, "overlord")
    assert not sent(actions, 1, Kind.WELCOME)


def test_bad_json_hello_is_rejected() -> None:
    h = Harness()
    actions = h.connect(1, Frame(Kind.HELLO, parts=[b'{"role": "client", ']))
    assert_rejected(actions, 1, "JSON")


@pytest.mark.parametrize("role", ["client", "worker"])
def test_version_mismatch_is_rejected_with_a_clear_reason(role: str) -> None:
    h = Harness()
    frame = client_hello() if role == "client" else worker_hello()
    body = json.loads(bytes(frame.parts[0]))
    body["python"] = "2.7"
    frame.parts[0] = json.dumps(body).encode()
    actions = h.connect(1, frame)
    reason = assert_rejected(actions, 1, "version mismatch")
    assert "2.7" in reason
    assert not sent(actions, 1, Kind.WELCOME)


def test_second_hello_is_a_protocol_violation() -> None:
    h = Harness()
    h.worker(1)
    assert_rejected(h.recv(1, worker_hello()), 1, "HELLO")
    assert h.s.capacity == 0


@pytest.mark.parametrize("frame", [client_hello(executor_id=-1), client_hello(max_retries=-1),
                                   worker_hello(slots=0), worker_hello(slots=1 << 16),
                                   hello("client", {"name": "no executor id"})],
                         ids=["negative-executor", "negative-retries", "no-slots", "too-many-slots", "no-executor"])
def test_hello_with_invalid_values_is_rejected(frame: Frame) -> None:
    h = Harness()
    actions = h.connect(1, frame)
    assert [f.kind for f in sent(actions, 1)][-1] == Kind.REJECT
    assert isinstance(actions[-1], Close)
    assert actions[-1].conn == 1
    assert (h.s.status()["clients"], h.s.status()["workers"], h.s.capacity) == ([], [], 0)


# --- capacity ----------------------------------------------------------------------------------------


def test_capacity_follows_workers_attaching_draining_and_leaving() -> None:
    h = Harness()
    assert capacities(h.client(1), 1) == [0]
    actions = h.worker(10, slots=2)
    assert capacities(actions, 1) == [2]
    actions = h.worker(11, slots=3)
    assert capacities(actions, 1) == [5]
    assert capacities(h.client(2), 2) == [5]
    actions = h.recv(10, Frame(Kind.DRAIN))
    assert (capacities(actions, 1), capacities(actions, 2)) == ([3], [3])
    actions = h.disconnect(11)
    assert (capacities(actions, 1), capacities(actions, 2)) == ([0], [0])
    actions = h.disconnect(10)  # a draining worker leaving changes nothing
    assert sent(actions, kind=Kind.CAPACITY) == []
    assert h.s.capacity == 0


# --- assignment and fairness -------------------------------------------------------------------------


def test_tasks_go_only_to_free_slots() -> None:
    h = Harness()
    h.client(1)
    h.worker(10, slots=2)
    actions: list[Action] = []
    for i in range(4):
        actions += h.submit(1, i)
    assert tasks_to(actions, 10) == [b"call 0", b"call 1"]
    assert h.s.status()["clients"][0]["queued"] == 2
    tid = tids_to(actions, 10)[0]
    actions = h.result(10, tid)
    assert tasks_to(actions, 10) == [b"call 2"]
    actions = h.worker(11, slots=1)
    assert tasks_to(actions, 11) == [b"call 3"]


def test_round_robin_between_two_clients_with_queued_work() -> None:
    h = Harness()
    h.client(1)
    h.client(2)
    for i in range(3):
        h.submit(1, i, f"a{i}")
    for i in range(3):
        h.submit(2, i, f"b{i}")
    actions = h.worker(10, slots=6)
    assert tasks_to(actions, 10) == [b"call a0", b"call b0", b"call a1", b"call b1", b"call a2", b"call b2"]


def test_round_robin_one_slot_at_a_time() -> None:
    h = Harness()
    h.client(1)
    h.client(2)
    for i in range(3):
        h.submit(1, i, f"a{i}")
    for i in range(2):
        h.submit(2, i, f"b{i}")
    actions = h.worker(10, slots=1)
    order = tasks_to(actions, 10)
    for _ in range(4):
        actions = h.result(10, tids_to(actions, 10)[0])
        order += tasks_to(actions, 10)
    assert order == [b"call a0", b"call b0", b"call a1", b"call b1", b"call a2"]


# --- initializers ------------------------------------------------------------------------------------


def test_init_is_sent_once_per_worker_and_executor_before_its_first_task() -> None:
    h = Harness()
    h.client(1, init=[b"init-7"])
    h.client(2, executor_id=8)  # no initializer: no INIT
    actions = h.worker(10, slots=1) + h.submit(1, 1)
    assert [f.kind for f in sent(actions, 10)] == [Kind.WELCOME, Kind.INIT, Kind.TASK]
    (init,) = sent(actions, 10, Kind.INIT)
    assert (init.a, init.parts) == (EXEC, [b"init-7"])
    assert sent(actions, 10, Kind.TASK)[0].b == EXEC
    h.submit(1, 2)  # queued: the only slot is busy
    actions = h.result(10, tids_to(actions, 10)[0])
    assert [f.kind for f in sent(actions, 10)] == [Kind.TASK]  # the second task: no INIT again
    assert tids_to(h.result(10, tids_to(actions, 10)[0]), 10) == []
    actions = h.submit(2, 1)
    assert [(f.kind, f.b) for f in sent(actions, 10)] == [(Kind.TASK, 8)]
    actions = h.worker(11, slots=1) + h.submit(1, 3)
    assert [f.kind for f in sent(actions, 11)] == [Kind.WELCOME, Kind.INIT, Kind.TASK]  # a new worker


def test_init_failed_breaks_every_client_of_the_executor_and_clears_their_queues() -> None:
    h = Harness()
    h.client(1, init=[b"init"])
    h.client(2)  # the same executor, another connection
    h.client(3, executor_id=8)
    h.worker(10, slots=1)
    running = tids_to(h.submit(1, 1, "a1"), 10)
    for i, (conn, label) in enumerate([(1, "a2"), (2, "b1"), (3, "c1")]):
        h.submit(conn, i + 2, label)
    actions = h.recv(10, Frame(Kind.INIT_FAILED, a=EXEC, parts=[b"boom"]))
    assert [(a.conn, a.frame.kind, a.frame.a, a.frame.parts) for a in actions if isinstance(a, Send)] == [
        (1, Kind.BROKEN, EXEC, [b"boom"]), (2, Kind.BROKEN, EXEC, [b"boom"])]
    queued = {c["name"]: c["queued"] for c in h.s.status()["clients"]}
    assert queued == {"client#1": 0, "client#2": 0, "client#3": 1}
    actions = h.result(10, running[0])
    assert sent(actions, 1, Kind.RESULT)[0].b == Status.DONE  # what already ran still answers
    assert tasks_to(actions, 10) == [b"call c1"]  # nothing of the broken executor is dispatched


def test_init_failed_for_an_executor_never_initialized_there_rejects_the_worker_not_the_clients() -> None:
    """A worker may only report the failure of an initializer it was sent, once: anything else would let
    one worker break any executor it names."""
    h = Harness()
    h.client(1, init=[b"init"])
    h.worker(10, slots=1)
    h.worker(11, slots=1)
    assert [f.kind for f in sent(h.submit(1, 1, "a1"), 10)] == [Kind.INIT, Kind.TASK]
    actions = h.recv(11, Frame(Kind.INIT_FAILED, a=EXEC, parts=[b"forged"]))
    assert_rejected(actions, 11, "not asked to run")
    assert not sent(actions, 1, Kind.BROKEN)  # the client is not broken (it hears of one slot less)
    actions = h.recv(10, Frame(Kind.INIT_FAILED, a=EXEC, parts=[b"boom"]))
    assert [(f.kind, f.parts) for f in sent(actions, 1)] == [(Kind.BROKEN, [b"boom"])]
    assert_rejected(h.recv(10, Frame(Kind.INIT_FAILED, a=EXEC, parts=[b"again"])), 10, "not asked to run")


# --- results -----------------------------------------------------------------------------------------


def test_result_is_forwarded_with_the_clients_own_task_id() -> None:
    h = Harness()
    h.client(1)
    h.worker(10)
    actions = h.submit(1, 41, "x")
    (task,) = sent(actions, 10, Kind.TASK)
    assert (task.b, task.parts) == (EXEC, call("x"))
    actions = h.result(10, task.a, b"the outcome")
    sends = [(a.conn, a.frame) for a in actions if isinstance(a, Send)]
    assert sends == [(1, Frame(Kind.RESULT, a=41, b=Status.DONE, parts=[b"the outcome"]))]


def test_result_of_a_departed_client_is_dropped_and_the_worker_gets_more_work() -> None:
    h = Harness()
    h.client(1)
    h.client(2)
    h.worker(10, slots=1)
    (tid,) = tids_to(h.submit(1, 1, "a1"), 10)
    h.submit(1, 2, "a2")
    h.submit(2, 1, "b1")
    h.disconnect(1)
    actions = h.result(10, tid)
    assert sent(actions, 1) == []
    assert tasks_to(actions, 10) == [b"call b1"]  # a2 left with its client
    assert not [a for a in actions if isinstance(a, Close)]


def test_result_for_an_unknown_task_is_ignored() -> None:
    h = Harness()
    h.client(1)
    h.worker(10)
    h.worker(11)
    (tid,) = tids_to(h.submit(1, 1), 10)
    assert h.result(11, tid) == []  # not that worker's task
    assert h.result(10, 999) == []
    assert sent(h.result(10, tid), 1, Kind.RESULT)[0].a == 1


# --- worker loss -------------------------------------------------------------------------------------

LOSSES = ["disconnect", "silence"]


@pytest.mark.parametrize("how", LOSSES)
def test_lost_task_is_requeued_at_the_head_and_sent_to_another_worker(how: str) -> None:
    h = Harness()
    h.client(1, max_retries=1)
    h.worker(10, "w1", slots=1)
    h.submit(1, 1, "first")
    h.submit(1, 2, "second")
    actions = h.lose(10, how)
    assert sent(actions, 1, Kind.RESULT) == []
    assert [c["queued"] for c in h.s.status()["clients"]] == [2]
    actions = h.worker(11, "w2", slots=1)
    assert tasks_to(actions, 11) == [b"call first"]  # the head of the queue, before "second"


@pytest.mark.parametrize("how", LOSSES)
def test_lost_task_goes_at_once_to_a_free_worker(how: str) -> None:
    h = Harness()
    h.client(1, max_retries=1)
    h.worker(10, "w1", slots=1)
    h.submit(1, 1, "first")
    h.worker(11, "w2", slots=1)
    actions = h.lose(10, how)
    assert tasks_to(actions, 11) == [b"call first"]


@pytest.mark.parametrize("how", LOSSES)
def test_retries_exhausted_gives_worker_lost_naming_every_worker_in_order(how: str) -> None:
    h = Harness()
    h.client(1, max_retries=2)
    h.submit(1, 5, "doomed")
    h.submit(1, 6, "next")
    for conn, name in [(10, "w1"), (11, "w2")]:
        assert tasks_to(h.worker(conn, name), conn) == [b"call doomed"]
        actions = h.lose(conn, how)
        assert sent(actions, 1, Kind.RESULT) == []
        # the client learns each loss as it comes, to name them if another server gives up on the call
        assert [(f.a, f.parts) for f in sent(actions, 1, Kind.REQUEUED)] == [(5, [LOST_ON, f"{name}#{conn}".encode()])]
    assert tasks_to(h.worker(12, "w3"), 12) == [b"call doomed"]
    actions = h.lose(12, how)
    (result,) = sent(actions, 1, Kind.RESULT)
    assert (result.a, result.b) == (5, Status.WORKER_LOST)
    assert json.loads(bytes(result.parts[0])) == {"workers": ["w1#10", "w2#11", "w3#12"], "attempts": 3}
    assert tasks_to(h.worker(13, "w4"), 13) == [b"call next"]


@pytest.mark.parametrize("how", LOSSES)
def test_max_retries_zero_fails_on_the_first_loss(how: str) -> None:
    h = Harness()
    h.client(1, max_retries=0)
    h.worker(10, "w1", slots=2)
    h.submit(1, 1)
    h.submit(1, 2)
    actions = h.lose(10, how)
    results = sent(actions, 1, Kind.RESULT)
    assert sorted((f.a, f.b) for f in results) == [(1, Status.WORKER_LOST), (2, Status.WORKER_LOST)]
    for f in results:
        assert json.loads(bytes(f.parts[0])) == {"workers": ["w1#10"], "attempts": 1}
    assert tasks_to(h.worker(11), 11) == []


def test_silent_worker_is_closed_on_tick_past_the_timeout() -> None:
    h = Harness()
    h.client(1)
    h.worker(10)
    h.submit(1, 1)
    h.now = TIMEOUT  # exactly the timeout is not yet past it
    assert not [a for a in h.tick(TIMEOUT) if isinstance(a, Close)]
    actions = h.tick(TIMEOUT + 0.1)
    closes = [a for a in actions if isinstance(a, Close)]
    assert [c.conn for c in closes] == [10]
    assert "heartbeat" in closes[0].reason
    assert sent(actions, 1, Kind.RESULT)[0].b == Status.WORKER_LOST
    assert h.s.status()["workers"] == []
    assert h.disconnect(10) == []  # the I/O layer reporting the close afterwards changes nothing


def test_any_frame_from_a_worker_counts_as_a_heartbeat() -> None:
    h = Harness()
    h.client(1)
    h.worker(10, slots=2)
    tids = tids_to(h.submit(1, 1) + h.submit(1, 2), 10)
    h.now = TIMEOUT - 1
    h.result(10, tids[0])
    assert not [a for a in h.tick(TIMEOUT + 1) if isinstance(a, Close)]
    assert [a.conn for a in h.tick(2 * TIMEOUT) if isinstance(a, Close)] == [10]


# --- heartbeats --------------------------------------------------------------------------------------


def test_heartbeats_go_to_idle_remote_peers_after_the_interval_and_never_to_local_ones() -> None:
    h = Harness()
    h.client(1, local=True)
    h.client(2, local=False)
    h.worker(10)
    assert h.tick(INTERVAL / 2) == []
    actions = h.tick(INTERVAL)
    assert sorted(a.conn for a in actions if is_heartbeat(a)) == [2, 10]
    assert [a for a in actions if not is_heartbeat(a)] == []
    assert h.tick(INTERVAL * 1.5) == []  # just sent one
    h.now = INTERVAL * 1.9
    h.submit(1, 1)  # a TASK to the worker is as good as a heartbeat
    actions = h.tick(INTERVAL * 2.5)
    assert [a.conn for a in actions if is_heartbeat(a)] == [2]
    actions = h.tick(INTERVAL * 2.9)
    assert [a.conn for a in actions if is_heartbeat(a)] == [10]


def test_local_peer_is_never_timed_out() -> None:
    h = Harness()
    h.client(1, local=True)
    assert h.tick(100 * TIMEOUT) == []
    assert len(h.s.status()["clients"]) == 1


def test_silent_remote_client_is_dropped_with_its_queue() -> None:
    h = Harness()
    h.client(1, local=False)
    h.submit(1, 1)
    actions = h.tick(TIMEOUT + 1)
    assert [a.conn for a in actions if isinstance(a, Close)] == [1]
    assert h.s.status()["clients"] == []
    assert tasks_to(h.worker(10), 10) == []


def test_tick_returns_when_the_next_check_is_due() -> None:
    h = Harness()
    assert h.s.tick(3.0) == pytest.approx(3.0 + INTERVAL / 2)


def test_a_silent_worker_vouched_for_as_on_a_cpu_is_kept_until_it_is_not() -> None:
    h = Harness()
    h.client(1)
    h.connect(10, worker_hello("busy", pid=4242))
    asked: list[int] = []
    on_cpu = [True]
    h.s.computing = lambda pid: asked.append(pid) is None and on_cpu[0]
    assert tasks_to(h.submit(1, 1, "long"), 10) == [b"call long"]
    assert not [a for a in h.tick(TIMEOUT + 1) if isinstance(a, Close)]  # silent, but computing: kept
    assert asked == [4242]
    on_cpu[0] = False  # stopped now (SIGSTOP), or asleep: lost after another heartbeat timeout of silence
    assert not [a for a in h.tick(TIMEOUT + 2) if isinstance(a, Close)]
    assert [a.conn for a in h.tick(2 * TIMEOUT + 2) if isinstance(a, Close)] == [10]
    h.connect(11, worker_hello("idle", pid=4343))
    asked.clear()
    on_cpu[0] = True
    assert [a.conn for a in h.tick(4 * TIMEOUT) if isinstance(a, Close)] == [11]  # idle: no call to vouch for
    assert asked == []


# --- drain -------------------------------------------------------------------------------------------


def test_drain_acks_stops_new_tasks_drops_capacity_and_still_forwards_results() -> None:
    h = Harness()
    h.client(1)
    h.worker(10, slots=2)
    (tid,) = tids_to(h.submit(1, 1, "running"), 10)
    actions = h.recv(10, Frame(Kind.DRAIN))
    assert sent(actions, 10) == [Frame(Kind.DRAIN)]
    assert capacities(actions, 1) == [0]
    assert tasks_to(h.submit(1, 2, "queued"), 10) == []  # a slot is free, but the worker drains
    actions = h.result(10, tid)
    assert [(f.a, f.b) for f in sent(actions, 1, Kind.RESULT)] == [(1, Status.DONE)]
    assert tasks_to(actions, 10) == []
    assert h.s.status()["workers"][0] == {"name": "worker#10", "host": "", "pid": 0, "pool": "default", "slots": 2,
                                          "running": 0, "done": 1, "failed": 0, "uptime": 0.0, "draining": True}
    actions = h.worker(11, slots=1)
    assert tasks_to(actions, 11) == [b"call queued"]
    assert capacities(actions, 1) == [1]


def test_stop_now_tells_each_client_which_of_its_calls_never_started_then_stops() -> None:
    h = Harness()
    h.client(1)
    h.client(2)
    h.worker(10)
    h.submit(1, 7, "running")
    h.submit(2, 8, "queued")  # no free slot: it waits
    h.submit(2, 9, "queued too")
    h.s.stop_now("stopped by a signal")
    actions = h.s.take_actions()
    assert sent(actions, 1) == []  # its call runs: lost with the server, as in a crash
    assert [(f.kind, f.a, f.parts) for f in sent(actions, 2)] == [(Kind.REQUEUED, 8, [NOT_STARTED]),
                                                                 (Kind.REQUEUED, 9, [NOT_STARTED])]
    assert [a.reason for a in actions if isinstance(a, Stop)] == ["stopped by a signal"]
    h.s.stop_now("again")
    assert h.s.take_actions() == []


# --- protocol violations -----------------------------------------------------------------------------


def test_a_client_may_not_send_result() -> None:
    h = Harness()
    h.client(1)
    assert_rejected(h.result(1, 1), 1, "RESULT")
    assert h.s.status()["clients"] == []


def test_a_worker_may_not_submit_and_its_running_tasks_are_requeued() -> None:
    h = Harness()
    h.client(1, max_retries=1)
    h.worker(10, "w1")
    h.submit(1, 1, "x")
    h.worker(11, "w2")
    actions = h.recv(10, Frame(Kind.SUBMIT, a=1, parts=call("sneaky")))
    assert_rejected(actions, 10, "SUBMIT")
    assert tasks_to(actions, 11) == [b"call x"]
    assert capacities(actions, 1) == [1]
    assert h.s.status()["clients"][0]["queued"] == 0


def test_an_admin_gets_status_but_may_not_submit() -> None:
    h = Harness(name="js")
    h.connect(5, hello("admin", {"name": "ops"}))
    (frame,) = sent(h.recv(5, Frame(Kind.STATUS)), 5)
    assert frame.kind == Kind.STATUS
    assert json.loads(bytes(frame.parts[0])) == h.s.status()
    assert_rejected(h.submit(5, 1), 5, "SUBMIT")


# --- status ------------------------------------------------------------------------------------------


def test_status_content() -> None:
    h = Harness(name="js-7")
    h.client(1, name="alice")
    h.client(2, name="bob", executor_id=8)
    h.connect(10, worker_hello("w1", slots=2, host="node-a", pid=4242))
    h.workers.add(10)
    h.now = 2.5
    h.worker(11, "w2", slots=1)
    h.now = 4.0
    h.submit(1, 1)
    h.submit(1, 2)
    h.submit(2, 1)
    h.submit(1, 3)
    # w2 answers bob's first call (its outcome an error) and takes alice's third
    actions = h.recv(11, Frame(Kind.RESULT, a=3, parts=[b"outcome"], flags=FAILED))
    assert tids_to(actions, 11) == [4]
    assert [(f.a, f.flags) for f in sent(actions, 2, Kind.RESULT)] == [(1, 0)]  # the flag stays here
    h.submit(1, 5)
    h.recv(11, Frame(Kind.DRAIN))
    h.submit(2, 2)
    assert h.s.status() == {
        "server": "js-7",
        "capacity": 2,
        "workers": [
            {"name": "w1#10", "host": "node-a", "pid": 4242, "pool": "default", "slots": 2, "running": 2,
             "done": 0, "failed": 0, "uptime": 4.0, "draining": False},
            {"name": "w2#11", "host": "", "pid": 0, "pool": "default", "slots": 1, "running": 1, "done": 1,
             "failed": 1, "uptime": 1.5, "draining": True},
        ],
        "clients": [
            {"name": "alice#1", "pool": "default", "queued": 1, "running": 3},
            {"name": "bob#2", "pool": "default", "queued": 1, "running": 0},
        ],
        "pools": {"default": {"workers": 2, "capacity": 2, "clients": 2, "queued": 2}},
        "done": 1,
        "uptime": 4.0,
        "stopping": False,
    }


@pytest.mark.parametrize(
    "frame",
    [
        client_hello(executor_id=None),  # type: ignore[arg-type]
        client_hello(executor_id=[1]),  # type: ignore[arg-type]
        client_hello(max_retries={"n": 1}),  # type: ignore[arg-type]
        worker_hello(slots=None),  # type: ignore[arg-type]
        worker_hello(slots=[2]),  # type: ignore[arg-type]
    ],
    ids=["executor_id-null", "executor_id-list", "max_retries-object", "slots-null", "slots-list"],
)
def test_hello_with_a_non_integer_field_is_rejected_not_raised(frame: Frame) -> None:
    h = Harness()
    actions = h.connect(1, frame)
    assert [f.kind for f in sent(actions, 1)][-1] == Kind.REJECT
    assert isinstance(actions[-1], Close)
    assert actions[-1].conn == 1


@pytest.mark.parametrize(
    "frame", [client_hello(executor_id=-1), worker_hello(slots=0)], ids=["executor-neg", "slots-0"]
)
def test_invalid_hello_gets_no_welcome(frame: Frame) -> None:
    actions = Harness().connect(1, frame)
    assert Kind.WELCOME not in [f.kind for f in sent(actions, 1)]
    assert_rejected(actions, 1, "")


def test_connection_that_never_says_hello_is_closed_after_the_timeout() -> None:
    h = Harness()
    h.s.connected(1, 0.0)
    assert [a.conn for a in h.tick(TIMEOUT + 1) if isinstance(a, Close)] == [1]


def test_assignment_does_not_scan_the_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """With 1,000 busy workers, one result and the next submit look at a handful of workers, not all of
    them (counted, so it holds on a loaded machine): the per-call cost stays flat as a cluster grows."""
    h = Harness()
    h.client(1)
    for conn in range(2, 1002):
        h.worker(conn, f"w{conn}")
    tids = {}
    for i in range(1000):
        (send,) = [a for a in h.submit(1, i) if isinstance(a, Send) and a.frame.kind == Kind.TASK]
        tids[send.conn] = send.frame.a
    looked_at = 0
    original = WorkerState.free

    def counting_free(self: WorkerState) -> int:
        nonlocal looked_at
        looked_at += 1
        return original(self)

    monkeypatch.setattr(WorkerState, "free", counting_free)
    h.submit(1, 1000)  # queued: every worker is busy
    actions = h.result(500, tids[500])
    assert [a.frame.kind for a in actions if isinstance(a, Send)] == [Kind.RESULT, Kind.TASK]
    assert looked_at <= 4, looked_at


def test_fair_shares_between_many_clients_on_many_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scale simulation of benchmarks/scheduler_scale.py, small: 200 workers, 7 clients that keep their
    queues full; every call completes and each client's share of results is within 10% of the others'."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "scheduler_scale.py"
    spec = importlib.util.spec_from_file_location("scheduler_scale", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    messages, _, fairness = module.simulate(200, 7, 5000)
    assert messages == 2 * 5000  # one SUBMIT and one RESULT in per call, nothing resent
    assert fairness <= 1.1
    assert module.queued_call_bytes(3, 3000) < 1024  # bounded memory per queued call


def test_the_worker_freed_longest_ago_gets_the_next_call() -> None:
    h = Harness()
    h.client(1)
    for conn in (2, 3, 4):
        h.worker(conn, f"w{conn}")
    started = {}
    for i in range(3):
        (send,) = [a for a in h.submit(1, i) if isinstance(a, Send) and a.frame.kind == Kind.TASK]
        started[send.conn] = send.frame.a
    assert sorted(started) == [2, 3, 4]  # one call per idle worker
    h.result(3, started[3])  # w3 frees first, then w2
    h.result(2, started[2])
    order = [a.conn for i in (3, 4) for a in h.submit(1, i) if isinstance(a, Send) and a.frame.kind == Kind.TASK]
    assert order == [3, 2]


# --- pools ---------------------------------------------------------------------------------------------


def test_calls_go_only_to_workers_of_their_pool() -> None:
    h = Harness()
    h.client(1, name="cpu-client")
    h.connect(2, client_hello("gpu-client", executor_id=8, pool="gpu"), local=True)
    h.worker(10, "cpu-worker")
    actions = h.connect(11, worker_hello("gpu-worker", pool="gpu"))
    assert capacities(actions, 2) == [1] and capacities(actions, 1) == []  # only the gpu pool grew
    assert tasks_to(h.submit(2, 1, "g1"), 11) == [b"call g1"]
    assert tasks_to(h.submit(2, 2, "g2"), 10) == []  # the cpu worker is idle, but not of the pool
    assert tasks_to(h.submit(1, 1, "c1"), 10) == [b"call c1"]
    pools = h.s.status()["pools"]
    assert pools == {"default": {"workers": 1, "capacity": 1, "clients": 1, "queued": 0},
                     "gpu": {"workers": 1, "capacity": 1, "clients": 1, "queued": 1}}


def test_a_call_waits_for_a_worker_of_its_pool_and_a_lost_one_is_retried_there() -> None:
    h = Harness()
    h.connect(1, client_hello(pool="gpu", max_retries=1), local=True)
    h.worker(10, "cpu-worker")
    assert tasks_to(h.submit(1, 1, "g"), 10) == []
    assert h.s.status()["pools"]["gpu"] == {"workers": 0, "capacity": 0, "clients": 1, "queued": 1}
    (tid,) = tids_to(h.connect(11, worker_hello("gpu-1", pool="gpu")), 11)
    actions = h.disconnect(11)
    assert [f.b for f in sent(actions, 1, Kind.REQUEUED)] == [1]
    assert tasks_to(actions, 10) == []  # requeued in its pool, not given to the idle cpu worker
    assert tasks_to(h.connect(12, worker_hello("gpu-2", pool="gpu")), 12) == [b"call g"]
    assert tid != 0


def test_pools_nobody_uses_are_forgotten() -> None:
    h = Harness()
    for i in range(50):
        h.connect(100 + i, client_hello(f"c{i}", executor_id=i, pool=f"p{i}"), local=True)
        h.connect(200 + i, worker_hello(f"w{i}", pool=f"p{i}"))
    assert len(h.s.status()["pools"]) == 50
    for i in range(50):
        h.disconnect(100 + i)
        h.disconnect(200 + i)
    assert h.s.status()["pools"] == {}


@pytest.mark.parametrize("pool", ["", "a/b", "x" * 201, 7, None, "gpu pool"])
def test_a_bad_pool_name_is_rejected(pool: object) -> None:
    h = Harness()
    assert_rejected(h.connect(1, worker_hello(pool=pool)), 1, "pool")
    assert h.s.status()["pools"] == {}
