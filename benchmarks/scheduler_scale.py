"""The job server's scheduler at scale, by simulation: no sockets, no processes, only the sans-I/O core.

The scheduler is fed exactly the frames a real job server feeds it (HELLO, SUBMIT, RESULT) for 10 to 1,000
workers and 1 to 100 clients, each worker answering its calls in the order it got them, each client keeping
its queue full (a client submits one more call for every result). It prints, per configuration:

- the cost per message handled (wall time over frames in, so the Python cost of the scheduler alone), which
  should stay flat as workers and clients grow;
- fairness: the share of results each client got while every client had calls queued (max/min, 1.00 is
  perfectly even);
- memory per queued call (tracemalloc, calls queued with no worker attached), which should not grow with the
  number of clients;
- worker checks per frame: how many times the scheduler looked at a worker's free slots per frame handled (a
  count, so it does not depend on the machine's load), which must not grow with the number of workers.

    python benchmarks/scheduler_scale.py                 # the full table (a few million calls, minutes)
    python benchmarks/scheduler_scale.py --quick         # a smaller table (seconds)
"""

from __future__ import annotations

import argparse
import collections
import gc
import time
import tracemalloc
from dataclasses import dataclass

from remote_executor.jobserver.scheduler import Scheduler, Send, WorkerState
from remote_executor.wire.frames import Frame, Kind
from remote_executor.wire.messages import hello

PAYLOAD = [b"x" * 64]  # an opaque call: the scheduler never looks inside


@dataclass
class Row:
    workers: int
    clients: int
    calls: int
    messages: int
    seconds: float
    fairness: float
    bytes_per_queued_call: float
    checks_per_frame: float

    @property
    def us_per_message(self) -> float:
        return self.seconds / self.messages * 1e6


def simulate(workers: int, clients: int, calls: int) -> tuple[int, float, float]:
    """Run ``calls`` calls through a scheduler; (frames in, seconds, fairness max/min over clients)."""
    scheduler = Scheduler(heartbeat_interval=3600.0, heartbeat_timeout=7200.0)
    now = 0.0
    client_ids = list(range(1, clients + 1))
    worker_ids = list(range(clients + 1, clients + workers + 1))
    for conn in client_ids:
        scheduler.connected(conn, now, local=True)
        scheduler.received(conn, hello("client", {"name": f"c{conn}", "executor_id": conn, "max_retries": 0}), now)
    for conn in worker_ids:
        scheduler.connected(conn, now)
        scheduler.received(conn, hello("worker", {"name": f"w{conn}", "slots": 1}), now)
    scheduler.take_actions()
    # Each client keeps enough calls queued that no worker ever idles and every client always waits.
    depth = max(2, 2 * workers // clients + 2)
    submitted = 0
    next_tid = collections.Counter[int]()
    in_flight: collections.deque[tuple[int, int]] = collections.deque()  # (worker, server tid), FIFO
    done = collections.Counter[int]()
    messages = 0

    def submit(conn: int) -> None:
        nonlocal submitted, messages
        next_tid[conn] += 1
        submitted += 1
        messages += 1
        scheduler.received(conn, Frame(Kind.SUBMIT, a=next_tid[conn], parts=PAYLOAD), now)

    def drain_actions() -> None:
        for action in scheduler.take_actions():
            if not isinstance(action, Send):
                raise AssertionError(f"unexpected {action}")
            frame = action.frame
            if frame.kind == Kind.TASK:
                in_flight.append((action.conn, frame.a))
            elif frame.kind == Kind.RESULT:
                done[action.conn] += 1
                if submitted < calls:
                    submit(action.conn)

    started = time.perf_counter()
    for _ in range(depth):
        for conn in client_ids:
            if submitted < calls:
                submit(conn)
    drain_actions()
    steady: collections.Counter[int] | None = None
    while in_flight:
        worker, tid = in_flight.popleft()
        messages += 1
        scheduler.received(worker, Frame(Kind.RESULT, a=tid, parts=PAYLOAD), now)
        drain_actions()
        if steady is None and submitted >= calls:
            steady = done.copy()  # the last moment every client still had its queue full
    seconds = time.perf_counter() - started
    shares = steady or done
    fairness = max(shares[c] for c in client_ids) / max(1, min(shares[c] for c in client_ids))
    if sum(done.values()) != calls:
        raise AssertionError(f"{sum(done.values())} results for {calls} calls")
    return messages, seconds, fairness


def queued_call_bytes(clients: int, calls: int) -> float:
    """Bytes the scheduler holds per queued call (payload excluded: it is shared), no worker attached."""
    scheduler = Scheduler()
    for conn in range(1, clients + 1):
        scheduler.connected(conn, 0.0, local=True)
        scheduler.received(conn, hello("client", {"name": f"c{conn}", "executor_id": conn, "max_retries": 0}), 0.0)
    scheduler.take_actions()
    frames = [Frame(Kind.SUBMIT, a=i, parts=PAYLOAD) for i in range(calls)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i, frame in enumerate(frames):
        scheduler.received(1 + i % clients, frame, 0.0)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    if scheduler.status()["clients"][0]["queued"] != len(range(0, calls, clients)):
        raise AssertionError("calls were not queued")
    return (after - before) / calls


def worker_checks_per_frame(workers: int, clients: int, calls: int) -> float:
    """Times ``WorkerState.free`` runs per frame in, over a short simulation (counted, not timed)."""
    original = WorkerState.free
    checks = 0

    def counting(self: WorkerState) -> int:
        nonlocal checks
        checks += 1
        return original(self)

    WorkerState.free = counting  # type: ignore[method-assign]
    try:
        messages, _, _ = simulate(workers, clients, calls)
    finally:
        WorkerState.free = original  # type: ignore[method-assign]
    return checks / messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer calls per row (seconds, not minutes)")
    args = parser.parse_args()
    calls = 20_000 if args.quick else 300_000
    configs = [(10, 1), (100, 1), (1000, 1), (10, 10), (100, 10), (1000, 10), (100, 100), (1000, 100)]
    rows = []
    for workers, clients in configs:
        messages, seconds, fairness = simulate(workers, clients, calls)
        memory = queued_call_bytes(clients, 20_000)
        checks = worker_checks_per_frame(workers, clients, 10_000)
        rows.append(Row(workers, clients, calls, messages, seconds, fairness, memory, checks))
    print("| workers | clients | calls | frames in | µs per frame in | worker checks per frame "
          "| fairness (max/min share) | bytes per queued call |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row.workers:,} | {row.clients:,} | {row.calls:,} | {row.messages:,} | {row.us_per_message:.2f} "
              f"| {row.checks_per_frame:.2f} | {row.fairness:.3f} | {row.bytes_per_queued_call:.0f} |")
    flat = max(r.us_per_message for r in rows) / min(r.us_per_message for r in rows)
    print(f"\nTotal calls: {sum(r.calls for r in rows):,}. Cost per frame, slowest row / fastest row: {flat:.2f}x.")


if __name__ == "__main__":
    main()
