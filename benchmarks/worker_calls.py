"""Python function calls per call in a worker process: a load-independent measure of the worker's CPU cost.

Run from the repository root::

    .venv/bin/python benchmarks/worker_calls.py [--transports tcp,zmq] [--calls 2000] [--json]

For each transport it starts a job server (in this process, with a key, as the embedded cluster has) and
one worker process (``python -m remote_executor.worker URL``), warms them up, then asks the worker itself to
count: a call of :func:`start_counting` installs ``sys.setprofile`` on the worker's main thread (which
receives, runs and answers every call), ``--calls`` calls of ``noop`` follow one after another, and a call of
:func:`stop_counting` removes the hook and returns what it counted. The tail of the first call and the head
of the last together make one more call's worth, so the counts are divided by ``calls + 1``.

Counts, unlike times, do not depend on how loaded the machine is: what a worker does per call shows as
the number of Python-level function calls (``call`` events) and of C functions called from Python
(``c_call`` events); a Python function call costs about 0.5 to 1 µs on a small VM. The worker's CPU time
per call (user and system, without the profile hook, over another ``--calls`` calls just before) is printed
too, but it varies with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KEY = "worker-calls-benchmark-key-0123456789abcdef"
WARMUP = 200
_counts: dict[str, int] = {}


def noop(x: int) -> int:
    return x


def _count(frame: object, event: str, arg: object) -> None:
    _counts[event] = _counts.get(event, 0) + 1


def start_counting() -> None:
    """In the worker: count profile events of this (the main) thread from now on."""
    _counts.clear()
    sys.setprofile(_count)


def stop_counting() -> dict[str, int]:
    """In the worker: stop counting and return the counts (``call``, ``c_call``, ...)."""
    sys.setprofile(None)
    return dict(_counts)


def cpu_seconds() -> float:
    """In the worker: the CPU time (user and system, every thread) this process has used so far."""
    return time.process_time()


def measure(scheme: str, calls: int) -> dict[str, float]:
    """Profile events per call of one ``scheme`` worker serving ``calls`` sequential no-op calls."""
    import worker_calls  # this module by its name, so the worker imports it by name too (not __main__)
    from remote_executor import RemoteExecutor
    from remote_executor.transports.tcp.server import TcpServer

    server: Any
    if scheme == "zmq":
        from remote_executor.transports.zmq.server import ZmqServer
        server = ZmqServer("127.0.0.1", 0, key=KEY.encode())
    else:
        server = TcpServer("127.0.0.1", 0, key=KEY.encode())
    server.start()
    worker: subprocess.Popen[bytes] | None = None
    try:
        env = {**os.environ, "REMOTE_EXECUTOR_KEY": KEY,
               "PYTHONPATH": os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}
        # --exit-on-stdin-eof: the worker ends with this process, however this process ends
        worker = subprocess.Popen([sys.executable, "-m", "remote_executor.worker", server.url, "--exit-on-stdin-eof",
                                   "--log-level", "WARNING", "--heartbeat-interval", "1"], env=env,
                                  stdin=subprocess.PIPE)
        with RemoteExecutor(1, server.url, key=KEY) as ex:
            for i in range(WARMUP):
                ex.submit(worker_calls.noop, i).result(timeout=60)
            # CPU time first, without the profile hook (which slows every call down): noisy, unlike the counts
            before = ex.submit(worker_calls.cpu_seconds).result(timeout=60)
            for i in range(calls):
                ex.submit(worker_calls.noop, i).result(timeout=60)
            cpu = ex.submit(worker_calls.cpu_seconds).result(timeout=60) - before
            ex.submit(worker_calls.start_counting).result(timeout=60)
            for i in range(calls):
                ex.submit(worker_calls.noop, i).result(timeout=60)
            counts: dict[str, int] = ex.submit(worker_calls.stop_counting).result(timeout=60)
    finally:
        if worker is not None:
            assert worker.stdin is not None
            worker.stdin.close()  # its end of file: the worker exits at once
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        server.stop()
    return {"cpu_us": cpu * 1e6 / (calls + 1), **{event: n / (calls + 1) for event, n in sorted(counts.items())}}


def _table(rows: dict[str, dict[str, float]]) -> str:
    lines = ["| worker | Python calls per call | C calls per call | CPU µs per call (noisy) |",
             "| --- | --- | --- | --- |"]
    for scheme, counts in rows.items():
        lines.append(f"| {scheme} | {counts.get('call', 0.0):.1f} | {counts.get('c_call', 0.0):.1f} | "
                     f"{counts['cpu_us']:.0f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transports", default="tcp,zmq", help="comma-separated: tcp, zmq")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--json", action="store_true", help="print the counts as JSON instead of a table")
    args = parser.parse_args(argv)
    rows: dict[str, dict[str, float]] = {}
    for scheme in args.transports.split(","):
        rows[scheme] = measure(scheme, args.calls)
    print(json.dumps(rows) if args.json else _table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
