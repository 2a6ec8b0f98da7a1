"""Soak: many clients, many calls, random faults, on namespaced hosts (the chaos suite's harness). Not in CI.

    sudo python benchmarks/soak.py --transport tcp              # 10 clients x 10,000 calls
    sudo python benchmarks/soak.py --transport zmq --quick      # about 1-2 minutes
    sudo python benchmarks/soak.py --transport gearman --duration 600 --clients 10 --calls 100000

The cluster is the chaos suite's (tests/chaos/cluster.py): a job server (ours or gearmand), two worker hosts
of two worker processes, client hosts, and the fault proxy between the clients and the server. While the
clients run, one fault at a time is drawn at random every few seconds:

    worker_sigkill     SIGKILL a worker process (its supervisor restarts it)
    worker_sigstop     SIGSTOP a worker process for 2x the heartbeat timeout, then SIGCONT
    worker_partition   pull a worker host's cable for 2x the heartbeat timeout
    client_partition   pull a client host's cable for 2x the heartbeat timeout
    server_restart     SIGKILL the job server and start a new one on the same address
    link_reset         the proxy resets every client connection at once
    slow_link          the proxy delays every chunk by 20 ms for 5 s
    client_sigkill     SIGKILL a client process and start a replacement (its calls are not counted as lost)

At the end it prints one table: calls, faults injected by kind, lost (failed with WorkerLostError or
ServerUnavailableError), wrong, hung (unresolved at the deadline), unexpected exceptions, max executions per
call (counted by the call's own side effect), calls over max_retries+1, and processes left running after
the cluster was stopped. Exit status 1 if anything but "lost" is non-zero.

Needs root and ``ip netns`` (and gearmand for ``--transport gearman``).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

# The chaos suite's harness, and this checkout's own sources (not whatever is installed).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from tests.chaos.cluster import (
    EXPECTED_FAILURES,
    HEARTBEAT_TIMEOUT,
    ChaosCluster,
    ClientRun,
)
from tests.chaos.netns import cleanup_stale, unavailable_reason

FAULTS = ("worker_sigkill", "worker_sigstop", "worker_partition", "client_partition", "server_restart",
          "link_reset", "slow_link", "client_sigkill")
OUTAGE = 2 * HEARTBEAT_TIMEOUT


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transport", choices=["tcp", "zmq", "gearman"], default="tcp")
    parser.add_argument("--clients", type=int, default=10, help="client processes (spread over two hosts)")
    parser.add_argument("--calls", type=int, default=10_000, help="calls per client (at most, with --duration)")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds: clients stop submitting after this long (default: when all calls are in)")
    parser.add_argument("--seconds", type=float, default=0.01, help="how long each call works")
    parser.add_argument("--window", type=int, default=50, help="outstanding calls per client")
    parser.add_argument("--max-retries", type=int, default=2)
    parser.add_argument("--fault-every", type=float, default=4.0, help="mean seconds between faults")
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated kinds to draw from")
    parser.add_argument("--grace", type=float, default=120.0,
                        help="seconds after its last submission within which every future must resolve")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--quick", action="store_true",
                        help="a 1-2 minute run: --duration 75 --calls 5000 --fault-every 3 --grace 60")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, execution log)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 75.0 if args.duration is None else args.duration
        args.calls = min(args.calls, 5000)
        args.fault_every = min(args.fault_every, 3.0)
        args.grace = min(args.grace, 60.0)
    args.faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = set(args.faults) - set(FAULTS)
    if unknown:
        parser.error(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(FAULTS)}")
    return args


class Soak:
    def __init__(self, cluster: ChaosCluster, args: argparse.Namespace, rng: random.Random) -> None:
        self.cluster = cluster
        self.args = args
        self.rng = rng
        self.faults: Counter[str] = Counter()
        self.runs: list[ClientRun] = []
        self.killed: list[ClientRun] = []
        self._serial = 0

    def start_client(self) -> ClientRun:
        host = self.cluster.client_hosts[self._serial % len(self.cluster.client_hosts)]
        self._serial += 1
        run = self.cluster.start_client(
            host, calls=self.args.calls, seconds=self.args.seconds, prefix=f"k{self._serial}",
            deadline=self.args.grace, duration=self.remaining(), window=self.args.window,
            reconnect_timeout=60.0, progress_every=500)
        self.runs.append(run)
        return run

    def remaining(self) -> float | None:
        if self.args.duration is None:
            return None
        return max(self.args.duration - (time.monotonic() - self.started), 1.0)

    def live(self) -> list[ClientRun]:
        return [r for r in self.runs if r not in self.killed and not r.finished()]

    def run(self) -> None:
        self.started = time.monotonic()
        for _ in range(self.args.clients):
            self.start_client()
        for run in self.runs:
            run.proc.wait_line("connected", 60.0)
        while self.live():
            if self._pause(self.rng.uniform(0.5, 1.5) * self.args.fault_every):
                break
            if not self.live():
                break
            kind = self.rng.choice(self.args.faults)
            self.note(f"{kind} ...")
            detail = self.inject(kind)
            self.note(f"{kind} done {detail or ''}")
            self.faults[kind] += 1

    def note(self, text: str) -> None:
        """A line of the fault log (work directory, faults.log), with the time as the other logs show it."""
        with open(self.cluster.workdir / "faults.log", "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d} {text}\n")

    def _pause(self, seconds: float) -> bool:
        """Wait up to ``seconds``; True if every client finished meanwhile."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not self.live():
                return True
            time.sleep(0.1)
        return False

    def inject(self, kind: str) -> str | None:
        """Inject one fault (and heal it); what it hit."""
        c = self.cluster
        if kind == "worker_sigkill":
            pids = c.worker_pids()
            if pids:
                pid = self.rng.choice(pids)
                os.kill(pid, signal.SIGKILL)
                return f"pid {pid}"
        elif kind == "worker_sigstop":
            pids = c.worker_pids()
            if pids:
                pid = self.rng.choice(pids)
                os.kill(pid, signal.SIGSTOP)
                try:
                    self._pause(OUTAGE)
                finally:
                    os.kill(pid, signal.SIGCONT)
                return f"pid {pid}"
        elif kind in ("worker_partition", "client_partition"):
            host = self.rng.choice(c.worker_hosts if kind == "worker_partition" else c.client_hosts)
            with c.net.partitioned(host):
                self._pause(OUTAGE)
            return host.name
        elif kind == "server_restart":
            c.restart_server(0)
        elif kind == "link_reset":
            return c.proxy_command("reset", "reset ")
        elif kind == "slow_link":
            c.proxy_command("delay 0.02")
            try:
                self._pause(5.0)
            finally:
                c.proxy_command("delay 0")
        elif kind == "client_sigkill":
            live = self.live()
            if live:
                victim = self.rng.choice(live)
                victim.proc.kill()
                self.killed.append(victim)
                self.start_client().proc.wait_line("connected", 60.0)
                return victim.prefix
        return None


def table(rows: list[tuple[str, object]]) -> str:
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 40}"]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    reason = unavailable_reason()
    if reason is not None:
        print(f"soak: {reason}", file=sys.stderr)
        return 2
    cleanup_stale()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    workdir = Path(tempfile.mkdtemp(prefix="rexc-soak-"))
    began = time.monotonic()
    cluster = ChaosCluster(args.transport, workdir, max_retries=args.max_retries, proxy=True, seed=seed)
    try:
        cluster.start()
        soak = Soak(cluster, args, rng)
        soak.run()
        counted = [r for r in soak.runs if r not in soak.killed]
        problems = cluster.check(counted, timeout=args.grace + 120.0)
        try:
            cluster.wait_idle()
            held = ""
        except AssertionError as exc:
            held = str(exc)
        report = cluster.stop()
    finally:
        cluster.close()
    elapsed = time.monotonic() - began

    executions = Counter(e.call_id for e in cluster.executions())
    killed_prefixes = tuple(r.prefix + "-" for r in soak.killed)
    counted_executions = {c: n for c, n in executions.items() if not c.startswith(killed_prefixes)}
    summaries = [r.summary or {} for r in counted]
    broken = [s for s in summaries if "error" in s]
    exceptions: Counter[str] = Counter()
    for s in summaries:
        exceptions.update(s.get("exceptions", {}))
    calls = sum(s.get("calls", 0) for s in summaries)
    ok = sum(s.get("ok", 0) for s in summaries)
    lost = sum(n for t, n in exceptions.items() if t in EXPECTED_FAILURES)
    unexpected = {t: n for t, n in exceptions.items() if t not in EXPECTED_FAILURES}
    wrong = sum(s.get("wrong", 0) for s in summaries)
    hung = sum(s.get("unresolved", 0) for s in summaries)
    limit = args.max_retries + 1
    over = sum(1 for n in counted_executions.values() if n > limit)
    leftovers = sum(len(p) for p in report.leftovers.values())
    rows: list[tuple[str, object]] = [
        ("transport", f"{args.transport} (max_retries={args.max_retries}, seed={seed})"),
        ("clients", f"{args.clients} (+{len(soak.killed)} replacements for killed ones)"),
        ("calls", f"{calls} submitted, {ok} ok"),
        ("faults injected", ", ".join(f"{k}={n}" for k, n in sorted(soak.faults.items())) or "none"),
        ("lost", f"{lost} {dict((t, n) for t, n in exceptions.items() if t in EXPECTED_FAILURES) or ''}".strip()),
        ("wrong", wrong),
        ("hung", hung),
        ("unexpected exceptions", unexpected or 0),
        ("max executions per call", f"{max(counted_executions.values(), default=0)} (limit {limit}; "
                                    f"{over} call(s) over it)"),
        ("calls run more than once", sum(1 for n in counted_executions.values() if n > 1)),
        ("executions of killed clients' calls", sum(n for c, n in executions.items() if c.startswith(killed_prefixes))
         if killed_prefixes else 0),
        ("clients that failed", len(broken)),
        ("servers still holding work", held.split("\n")[0] if held else "none"),
        ("processes not stopping", ", ".join(report.hung) or "none"),
        ("leftover processes", leftovers),
        ("elapsed", f"{elapsed:.0f} s"),
    ]
    print(table(rows))
    for problem in problems:
        print(f"  problem: {problem.splitlines()[0]}")
    if args.keep:
        print(f"work directory: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    bad = wrong or hung or unexpected or over or leftovers or report.hung or broken or held
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
