"""Chaos on real processes and real sockets: namespaced hosts, killed and frozen processes, cut cables,
slow and lossy links (see :mod:`.cluster` for the topology).

Every scenario checks the same contract (``ChaosCluster.check``): every future resolves within a bound;
no result is wrong; no call ran more than ``max_retries + 1`` times (counted by the call's own side effect);
every failure is an expected type (``WorkerLostError``, ``ServerUnavailableError``, or fewer where the
scenario allows fewer); clients shut down; and afterwards the servers hold no leftover work and nothing
runs in the namespaces once the cluster is stopped the way an operator would stop it.

A scenario that finds a defect may be marked ``xfail(strict=False)`` with the reason until it is fixed;
none is today.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Callable

import pytest

from .cluster import WORKER_LOST, ChaosCluster, ClientRun

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(300)]

CALLS = 300  # per client; two clients
SECONDS = 0.02  # per call
DEADLINE = 60.0  # every future of a client resolves within this many seconds of its (instant) submission
FAULT_AT = 60  # inject the fault once the first client has this many results (well before its end)
PROGRESS_TIMEOUT = 60.0



def transports(**xfail: str) -> list[object]:
    """tcp, zmq, gearman as parameters; ``xfail={"tcp": reason}`` marks a known defect."""
    marks = {"tcp": [], "zmq": [pytest.mark.zmq], "gearman": [pytest.mark.gearman]}
    return [pytest.param(t, marks=[*m, *([pytest.mark.xfail(strict=False, reason=xfail[t])] if t in xfail else [])],
                         id=t)
            for t, m in marks.items()]


def until_done(runs: list[ClientRun], seconds: float) -> bool:
    """Wait up to ``seconds`` for every client to finish (True if they all did)."""
    deadline = time.monotonic() + seconds
    for run in runs:
        if run.proc.wait_for(lambda line: line == "done", max(deadline - time.monotonic(), 0.0)) is None:
            return False
    return True


def reach(run: ClientRun, count: int = FAULT_AT) -> None:
    """Block until ``run`` has ``count`` results: the fault then lands mid-run, never after the end."""
    assert run.wait_progress(count, PROGRESS_TIMEOUT), (
        f"client {run.prefix} did not reach {count} results within {PROGRESS_TIMEOUT}s (progress "
        f"{run.progress()})\n{run.proc.tail()}")


def verdict(cluster: ChaosCluster, runs: list[ClientRun], allowed: frozenset[str] | None = None,
            note: str = "", then: Callable[[], object] | None = None) -> None:
    """The scenario's contract for ``runs``; ``then`` (a check of the healed cluster); then the servers
    must go quiet and everything must stop cleanly."""
    problems = cluster.check(runs) if allowed is None else cluster.check(runs, allowed=allowed)
    print(f"[{cluster.transport}] {note} {cluster.describe(runs)}")
    assert not problems, "\n".join(problems)
    if then is not None:
        then()
    finish(cluster)


def finish(cluster: ChaosCluster) -> None:
    """No live server holds work for a client any more; a stop leaves nothing running."""
    cluster.wait_idle()
    report = cluster.stop()
    assert not report.problems(), "\n".join(report.problems())


# --- 1. worker SIGKILL storm -------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", transports())
def test_worker_sigkill_storm(chaos: Callable[..., ChaosCluster], transport: str) -> None:
    cluster = chaos(transport, max_retries=2)
    rng = random.Random(1)
    runs = cluster.start_clients(calls=240, seconds=0.05, deadline=90.0)
    kills = 0
    while not until_done(runs, rng.uniform(1.5, 2.5)):
        pids = cluster.worker_pids()
        if pids:
            os.kill(rng.choice(pids), signal.SIGKILL)
            kills += 1
    verdict(cluster, runs, note=f"kills={kills}")
    assert kills >= 1
    for run in runs:
        assert run.summary is not None and run.summary["ok"] >= run.calls // 2, run.summary


# --- 2. a worker frozen past its heartbeat timeout ---------------------------------------------------------


def freeze_a_busy_worker(cluster: ChaosCluster, rng: random.Random) -> tuple[int, str]:
    """SIGSTOP a worker process caught in the middle of a call; (its pid, that call)."""
    for _ in range(50):
        pids = cluster.worker_pids()
        if not pids:
            continue
        pid = rng.choice(pids)
        os.kill(pid, signal.SIGSTOP)
        call = cluster.unfinished_call_of(pid)
        if call is not None:
            return pid, call
        os.kill(pid, signal.SIGCONT)  # caught between two calls: try again
        time.sleep(0.02)
    raise AssertionError("never caught a worker in the middle of a call")


@pytest.mark.parametrize("transport", transports())
def test_worker_sigstop(chaos: Callable[..., ChaosCluster], transport: str) -> None:
    cluster = chaos(transport)
    rng = random.Random(2)
    runs = cluster.start_clients(calls=150, seconds=0.1, deadline=90.0)
    reach(runs[0], 20)
    pid, call = freeze_a_busy_worker(cluster, rng)
    frozen_at = time.monotonic()
    bound = 20.0  # ten times the heartbeat timeout
    try:
        while not any(e.call_id == call and e.pid != pid for e in cluster.executions(mark="E")):
            assert time.monotonic() - frozen_at < bound, (
                f"call {call} of the frozen worker {pid} did not complete elsewhere within {bound}s "
                f"(heartbeat timeout 2s)")
            time.sleep(0.1)
        rerun_after = time.monotonic() - frozen_at
    finally:
        os.kill(pid, signal.SIGCONT)
    verdict(cluster, runs, note=f"frozen call {call} completed elsewhere after {rerun_after:.1f}s")
    owner = next(r for r in runs if call.startswith(r.prefix + "-"))
    assert owner.summary is not None and call not in owner.summary["failed"], owner.summary["failed"].get(call)


# --- 3. the job server killed and restarted ----------------------------------------------------------------


def wait_for_work_after(cluster: ChaosCluster, since: float, runs: list[ClientRun], timeout: float = 30.0) -> bool:
    """Until some call starts after ``since`` (unix time): True; False if the clients finished first."""
    deadline = time.monotonic() + timeout
    while not any(e.started > since for e in cluster.executions()):
        if all(run.finished() for run in runs):
            return False
        assert time.monotonic() < deadline, f"no call started within {timeout}s of the server's restart"
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("max_retries", [
    pytest.param(2, id="retries2"),
    pytest.param(0, id="retries0"),
])
@pytest.mark.parametrize("transport", transports())
def test_server_restart(chaos: Callable[..., ChaosCluster], transport: str, max_retries: int) -> None:
    """SIGKILL the job server and start a new one, three times, each as soon as calls run again: calls of
    0.2 s are caught in flight by several restarts, so a resubmission that is not counted shows."""
    cluster = chaos(transport, max_retries=max_retries)
    # The server is back within a second or two: 30 s is several times what the calls need.
    runs = cluster.start_clients(calls=60, seconds=0.2, deadline=30.0, progress_every=5)
    reach(runs[0], 10)
    restarts = 0
    for _ in range(3):
        restarted_at = time.time()
        cluster.restart_server(0)
        restarts += 1
        if not wait_for_work_after(cluster, restarted_at, runs):
            break
    verdict(cluster, runs, note=f"restarts={restarts}", then=cluster.wait_attached)  # workers found the new one


# --- 4. a worker host cut off the network, then healed -----------------------------------------------------


@pytest.mark.parametrize("transport", transports())
def test_worker_host_partition(chaos: Callable[..., ChaosCluster], transport: str) -> None:
    cluster = chaos(transport)
    runs = cluster.start_clients(calls=CALLS, seconds=SECONDS, deadline=90.0)
    reach(runs[0])
    with cluster.net.partitioned(cluster.worker_hosts[0]):
        until_done(runs, 5.0)  # the cable stays out 2.5 heartbeat timeouts (or until the clients are done)
    verdict(cluster, runs, then=cluster.wait_attached)  # healed: the cut-off workers are back


# --- 5. a client host cut off, then healed -----------------------------------------------------------------


@pytest.mark.parametrize("transport", transports())
def test_client_host_partition(chaos: Callable[..., ChaosCluster], transport: str) -> None:
    cluster = chaos(transport)
    runs = cluster.start_clients(calls=CALLS, seconds=SECONDS, deadline=90.0, reconnect_timeout=30.0)
    reach(runs[0])
    with cluster.net.partitioned(cluster.client_hosts[0]):
        until_done(runs[1:], 5.0)  # out for 5 s: past the heartbeat timeout, well within reconnect_timeout
    verdict(cluster, runs)


# --- 6. a client SIGKILLed mid-run -------------------------------------------------------------------------


@pytest.mark.parametrize("transport", transports())
def test_client_sigkill(chaos: Callable[..., ChaosCluster], transport: str) -> None:
    cluster = chaos(transport)
    workers_before = set(cluster.worker_pids())
    victim, survivor = cluster.start_clients(calls=CALLS, seconds=SECONDS, deadline=DEADLINE)
    reach(victim)
    victim.proc.kill()
    killed_at = time.time()
    problems = cluster.check([survivor], allowed=frozenset())  # nothing at all went wrong for the survivor
    print(f"[{transport}] {cluster.describe([survivor])}")
    assert not problems, "\n".join(problems)
    assert survivor.summary is not None and survivor.summary["ok"] == survivor.calls
    window = len(cluster.worker_hosts) * cluster.processes
    late = Counter(e.call_id for e in cluster.executions()
                   if e.call_id.startswith(victim.prefix + "-") and e.started > killed_at)
    assert sum(late.values()) <= window, f"the dead client's calls kept running: {late}"
    assert set(cluster.worker_pids()) == workers_before, "workers died or were replaced"
    finish(cluster)  # the dead client's session and queue are gone from the server too


# --- 7. slow and lossy links between the clients and the server -------------------------------------------


@pytest.mark.parametrize("transport", transports())
def test_slow_link(chaos: Callable[..., ChaosCluster], transport: str) -> None:
    cluster = chaos(transport, proxy=True, proxy_delay=0.02)
    runs = cluster.start_clients(calls=CALLS, seconds=SECONDS, deadline=90.0)
    verdict(cluster, runs, allowed=frozenset(), note="20 ms per chunk")


@pytest.mark.parametrize("transport", transports())
def test_lossy_link(chaos: Callable[..., ChaosCluster], transport: str) -> None:
    cluster = chaos(transport, proxy=True, proxy_drop=0.002, seed=7)
    runs = cluster.start_clients(calls=CALLS, seconds=SECONDS, deadline=90.0)
    commanded = 0
    while not until_done(runs, 1.0):
        answer = cluster.proxy_command("reset", "reset ")
        commanded += int(answer.split()[1]) if answer else 0
    stats = cluster.proxy_command("stats", "stats ")
    verdict(cluster, runs, note=f"resets: commanded={commanded} proxy {stats}")
    assert commanded >= 1


@pytest.mark.parametrize("transport", transports())
def test_server_outage_behind_proxy(chaos: Callable[..., ChaosCluster], transport: str) -> None:
    """The server is down for a while behind the proxy: the proxy accepts each reconnection and resets it
    at once (as a load balancer does); once the server is back every future resolves."""
    cluster = chaos(transport, proxy=True)
    runs = cluster.start_clients(calls=CALLS, seconds=SECONDS, deadline=30.0)
    reach(runs[0])
    cluster.kill_server(0)
    down_since = time.monotonic()
    refused = 0
    # Down for 4 s (two heartbeat timeouts), and until the clients have come back (and been reset) a few times.
    while refused < 4 or time.monotonic() - down_since < 4.0:
        assert time.monotonic() - down_since < 30, f"only {refused} reconnections reached the proxy within 30s"
        stats = cluster.proxy_command("stats", "stats ")
        refused = json.loads(stats.split(" ", 1)[1])["refused"] if stats else 0
        time.sleep(0.1)
    cluster.start_server(0)
    verdict(cluster, runs, note=f"reconnections reset while down: {refused}", then=cluster.wait_attached)


# --- 8. two job servers, one killed -----------------------------------------------------------------------


@pytest.mark.parametrize("transport", transports())
def test_two_servers_one_killed(chaos: Callable[..., ChaosCluster], transport: str) -> None:
    cluster = chaos(transport, servers=2)
    runs = cluster.start_clients(calls=CALLS, seconds=SECONDS, deadline=DEADLINE, reconnect_timeout=10.0)
    reach(runs[0])
    cluster.kill_server(0)
    # A server is up all along: only calls that were running on the lost server may fail.
    verdict(cluster, runs, allowed=frozenset({WORKER_LOST}))
