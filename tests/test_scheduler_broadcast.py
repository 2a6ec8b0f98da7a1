"""The scheduler's side of broadcast (WORKERS, pinned SUBMIT), of a client's STATUS and of an admin's STOP,
on its own: frames in with explicit times, actions out."""

from __future__ import annotations

import json

from remote_executor.jobserver.scheduler import Close, Send, Stop
from remote_executor.wire.frames import LOST_ON, NOT_STARTED, Frame, Kind, Status
from remote_executor.wire.messages import call_frame, hello, pinned, worker_lost_error

from .test_scheduler import TIMEOUT, Harness, call, sent, tasks_to


def ask_workers(h: Harness, client: int, request_id: int = 9) -> list[str]:
    replies = sent(h.recv(client, Frame(Kind.WORKERS, a=request_id)), client, Kind.WORKERS)
    assert [f.a for f in replies] == [request_id]
    names: list[str] = json.loads(bytes(replies[0].parts[0]))["workers"]
    return names


def submit_pinned(h: Harness, client: int, client_tid: int, worker: str, label: str = "b",
                  limit: float | None = None) -> list[Send | Close | Stop]:
    frame = pinned(call_frame(Kind.SUBMIT, client_tid, 0, call(label), limit), worker)
    return h.recv(client, frame)


def results(actions: list[Send | Close | Stop], client: int) -> dict[int, Frame]:
    return {f.a: f for f in sent(actions, client, Kind.RESULT)}


def test_workers_names_the_workers_of_the_clients_pool_that_take_calls() -> None:
    h = Harness()
    h.client(1)
    h.client(2, pool="gpu")
    h.worker(10, "a")
    h.worker(11, "b")
    h.connect(12, hello("worker", {"name": "g", "slots": 1, "pool": "gpu"}))
    h.recv(11, Frame(Kind.DRAIN))  # a draining worker is about to exit: not a target
    assert ask_workers(h, 1) == ["a#10"]
    assert ask_workers(h, 2, request_id=3) == ["g#12"]


def test_a_pinned_call_runs_on_its_worker_only_and_before_queued_calls() -> None:
    h = Harness()
    h.client(1)
    h.worker(10, "a")
    h.worker(11, "b")
    assert tasks_to(h.submit(1, 1, "x"), 10) == [b"call x"]  # a is busy from now on
    actions = submit_pinned(h, 1, 2, "b#11", "to-b")
    assert tasks_to(actions, 11) == [b"call to-b"]  # b was free: it starts at once
    actions = submit_pinned(h, 1, 3, "a#10", "to-a")
    assert tasks_to(actions, 10) == []  # waits for a's slot
    h.submit(1, 4, "queued")  # a normal call queued after it
    actions = h.result(10, 1)
    assert tasks_to(actions, 10) == [b"call to-a"]  # the pinned call goes first on a
    assert tasks_to(actions, 11) == []
    assert 1 in results(actions, 1)


def test_a_pinned_call_for_a_worker_that_is_gone_fails_at_once() -> None:
    h = Harness()
    h.client(1, max_retries=3)
    h.connect(12, hello("worker", {"name": "g", "slots": 1, "pool": "gpu"}))
    for tid, target in enumerate(["nobody#99", "g#12"], start=1):  # unknown, and of another pool
        got = results(submit_pinned(h, 1, tid, target), 1)
        assert got[tid].b == Status.WORKER_LOST
        error = worker_lost_error(got[tid].parts)
        assert target in str(error) and "never retried elsewhere" in str(error)
        assert error.workers == (target,)
    assert h.s.status()["clients"][0]["running"] == 0


def test_a_lost_worker_fails_its_pinned_calls_running_or_waiting_and_never_requeues_them() -> None:
    h = Harness()
    h.client(1, max_retries=5)
    h.worker(10, "a")
    h.worker(11, "b")
    submit_pinned(h, 1, 1, "a#10", "first")
    submit_pinned(h, 1, 2, "a#10", "second")  # waits behind the first
    actions = h.lose(10, "disconnect")
    got = results(actions, 1)
    assert sorted(got) == [1, 2] and all(f.b == Status.WORKER_LOST for f in got.values())
    assert "while running" in str(worker_lost_error(got[1].parts))
    assert "before it could run" in str(worker_lost_error(got[2].parts))
    assert tasks_to(actions, 11) == []  # nothing went to the other worker
    assert not sent(actions, 1, Kind.REQUEUED)


def test_a_silent_worker_fails_its_pinned_call() -> None:
    h = Harness()
    h.client(1, max_retries=5)
    h.worker(10, "a")
    h.worker(11, "b")
    submit_pinned(h, 1, 1, "a#10")
    got = results(h.lose(10, "silence"), 1)
    assert got[1].b == Status.WORKER_LOST


def test_draining_fails_the_pinned_calls_still_waiting_and_finishes_the_running_one() -> None:
    h = Harness()
    h.client(1)
    h.worker(10, "a")
    submit_pinned(h, 1, 1, "a#10", "running")
    submit_pinned(h, 1, 2, "a#10", "waiting")
    got = results(h.recv(10, Frame(Kind.DRAIN)), 1)
    assert list(got) == [2] and got[2].b == Status.WORKER_LOST
    got = results(h.result(10, 1), 1)
    assert list(got) == [1] and got[1].b == Status.DONE


def test_a_client_that_goes_takes_its_waiting_pinned_calls_with_it() -> None:
    h = Harness()
    h.client(1)
    h.client(2, executor_id=8)
    h.worker(10, "a")
    h.submit(2, 1, "other")  # a is busy with client 2's call
    submit_pinned(h, 1, 1, "a#10", "never")
    h.disconnect(1)
    actions = h.result(10, 1)
    assert tasks_to(actions, 10) == []


def test_pinned_calls_do_not_change_the_capacity_clients_are_told() -> None:
    h = Harness()
    h.client(1)
    h.worker(10, "a", slots=2)
    actions = submit_pinned(h, 1, 1, "a#10") + submit_pinned(h, 1, 2, "a#10")
    assert not sent(actions, 1, Kind.CAPACITY)
    assert h.s.status()["pools"]["default"]["capacity"] == 2


def test_a_client_may_ask_for_the_status_and_gets_its_request_id_back() -> None:
    h = Harness(name="js")
    h.client(1)
    (reply,) = sent(h.recv(1, Frame(Kind.STATUS, a=42)), 1, Kind.STATUS)
    assert reply.a == 42
    assert json.loads(bytes(reply.parts[0]))["server"] == "js"


# --- STOP ----------------------------------------------------------------------------------------------------


def admin(h: Harness, conn: int) -> None:
    h.connect(conn, hello("admin", {"name": "op"}))


def test_stop_waits_for_running_calls_starts_no_queued_one_and_then_stops() -> None:
    h = Harness()
    h.client(1)
    h.worker(10, "a")
    h.submit(1, 1, "running")
    h.submit(1, 2, "queued")
    admin(h, 50)
    actions = h.recv(50, Frame(Kind.STOP))
    (ack,) = sent(actions, 50, Kind.STOP)
    assert json.loads(bytes(ack.parts[0]))["running"] == 1
    assert not [a for a in actions if isinstance(a, Stop)]
    actions = h.result(10, 1)
    assert results(actions, 1)[1].b == Status.DONE
    assert tasks_to(actions, 10) == []  # the queued call is not started
    assert [a for a in actions if isinstance(a, Stop)]
    assert not sent(actions, 10, Kind.DRAIN)  # without --workers the workers stay (and reconnect later)
    assert h.s.status()["stopping"] is True


def test_a_stopping_server_tells_clients_which_calls_it_will_never_start() -> None:
    """So that a client resubmits them to the next server without counting an attempt (max_retries=0 would
    otherwise fail calls that never ran): the queued ones at the STOP, those submitted or requeued after it."""
    h = Harness()
    h.client(1, max_retries=2)
    h.client(2, max_retries=2)
    h.worker(10, "a", slots=2)
    h.submit(1, 1, "running")
    h.submit(2, 1, "running too")
    h.submit(1, 2, "queued")
    admin(h, 50)
    actions = h.recv(50, Frame(Kind.STOP))
    assert [(f.a, f.b, [bytes(p) for p in f.parts]) for f in sent(actions, 1, Kind.REQUEUED)] == \
        [(2, 0, [NOT_STARTED])]
    assert sent(actions, 2, Kind.REQUEUED) == []  # its call runs: it finishes there
    actions = h.submit(2, 2, "after the stop")
    assert [(f.a, [bytes(p) for p in f.parts]) for f in sent(actions, 2, Kind.REQUEUED)] == [(2, [NOT_STARTED])]
    actions = h.disconnect(10)  # the worker is lost with both running calls: requeued, never to start here
    for client in (1, 2):  # (and the worker they were lost with, for WorkerLostError.workers)
        assert [(f.a, f.b, [bytes(p) for p in f.parts]) for f in sent(actions, client, Kind.REQUEUED)] == \
            [(1, 1, [NOT_STARTED, LOST_ON, b"a#10"])]


def test_a_requeued_call_of_a_running_server_is_not_marked() -> None:
    """Not NOT_STARTED: the worker it was lost with instead."""
    h = Harness()
    h.client(1, max_retries=2)
    h.worker(10, "a")
    h.submit(1, 1, "running")
    actions = h.disconnect(10)
    assert [(f.a, f.b, f.parts) for f in sent(actions, 1, Kind.REQUEUED)] == [(1, 1, [LOST_ON, b"a#10"])]


def test_a_worker_reconnecting_to_a_stopping_server_is_welcomed_but_given_no_queued_call() -> None:
    """Refused, it would take the refusal for a wrong key and exit for good; it is to wait for the next server."""
    h = Harness()
    h.client(1)
    h.worker(10, "a")
    h.submit(1, 1, "running")
    h.submit(1, 2, "queued")
    admin(h, 50)
    h.recv(50, Frame(Kind.STOP))
    actions = h.worker(11, "b")
    assert not [a for a in actions if isinstance(a, Close)]
    assert tasks_to(actions, 11) == []


def test_stop_with_workers_tells_them_to_exit_for_good_and_stops_when_they_have() -> None:
    h = Harness()
    h.worker(10, "a")
    h.worker(11, "b")
    admin(h, 50)
    actions = h.recv(50, Frame(Kind.STOP, b=1))
    assert [(f.kind, f.b) for f in sent(actions, 10)] == [(Kind.DRAIN, 1)]
    assert [(f.kind, f.b) for f in sent(actions, 11)] == [(Kind.DRAIN, 1)]
    assert not [a for a in actions if isinstance(a, Stop)]
    assert not [a for a in h.disconnect(10) if isinstance(a, Stop)]
    assert [a for a in h.disconnect(11) if isinstance(a, Stop)]


def test_stop_with_workers_stops_anyway_once_a_worker_stays_past_the_heartbeat_timeout() -> None:
    h = Harness()
    h.worker(10, "a")
    admin(h, 50)
    h.recv(50, Frame(Kind.STOP, b=1))
    h.recv(10, Frame(Kind.HEARTBEAT))
    assert not [a for a in h.tick(TIMEOUT / 2) if isinstance(a, Stop)]
    h.recv(10, Frame(Kind.HEARTBEAT))
    h.recv(50, Frame(Kind.HEARTBEAT))
    assert [a for a in h.tick(TIMEOUT + 0.1) if isinstance(a, Stop)]
