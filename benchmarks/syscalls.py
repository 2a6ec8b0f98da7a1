"""System calls per call, counted with ``strace -c -f`` on each process that takes part in a call.

Run from the repository root (strace must be installed, and allowed to attach to this user's processes)::

    .venv/bin/python benchmarks/syscalls.py [--transports tcp,zmq,gearman,tcp-server] [--calls 2000] [--submit-all]

For each transport it starts ``RemoteExecutor(2, ...)``, warms it up, attaches strace to the workers, the
client process (with its I/O and embedded-server threads) and, for gearman, gearmand, runs the calls
(sequential ``submit(noop, i).result()`` by default), detaches, and prints a markdown table of system calls
per call, by process and by system call. Counts, unlike times, hardly depend on how loaded the machine is.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor

import bench
from _tasks import noop

WARMUP = 300


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid``."""
    out: list[int] = []
    todo = [pid]
    while todo:
        proc = subprocess.run(["ps", "-o", "pid=", "--ppid", str(todo.pop())], capture_output=True, text=True,
                              check=False)
        found = [int(p) for p in proc.stdout.split()]
        out += found
        todo += found
    return out


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _roles(root: int) -> dict[str, list[int]]:
    """The processes under ``root`` by role: workers, gearmand, standalone server."""
    roles: dict[str, list[int]] = {"workers": [], "gearmand": [], "server": []}
    for pid in _children(root):
        cmd = _cmdline(pid)
        if b"remote_executor.worker" in cmd:
            roles["workers"].append(pid)
        elif b"gearmand" in cmd:
            roles["gearmand"].append(pid)
        elif b"remote_executor.cli\x00server" in cmd:
            roles["server"].append(pid)
    return roles


def _parse(path: str) -> dict[str, int]:
    """``strace -c`` output: calls per system call."""
    counts: dict[str, int] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total":
                with contextlib.suppress(ValueError):
                    counts[fields[-1]] = int(fields[3])
    return counts


@contextlib.contextmanager
def _traced(pids: Sequence[int], out: str) -> Iterator[None]:
    args = ["strace", "-c", "-f", "-o", out]
    for pid in pids:
        args += ["-p", str(pid)]
    tracer = subprocess.Popen(args, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # strace attaches in the background and says nothing when it has: give it a second
    try:
        yield
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(timeout=60)


def _run(ex: Executor, calls: int, submit_all: bool) -> None:
    if submit_all:
        for future in [ex.submit(noop, i) for i in range(calls)]:
            future.result(timeout=120)
    else:
        for i in range(calls):
            ex.submit(noop, i).result(timeout=120)


def measure(name: str, calls: int, submit_all: bool) -> dict[str, dict[str, int]]:
    """Calls per system call, by role, for ``calls`` calls on ``name``."""
    with contextlib.ExitStack() as stack:
        if name in bench.STANDALONE:
            bench._server_url = stack.enter_context(bench.standalone_server(name))
        ex = stack.enter_context(bench.executor_for(name))
        _run(ex, WARMUP, submit_all)
        roles = _roles(os.getpid())
        roles["client"] = [os.getpid()]
        got: dict[str, dict[str, int]] = {}
        with tempfile.TemporaryDirectory(prefix="syscalls-") as tmp:
            outputs = {role: os.path.join(tmp, role) for role, pids in roles.items() if pids}
            with contextlib.ExitStack() as traces:
                for role, path in outputs.items():
                    traces.enter_context(_traced(roles[role], path))
                _run(ex, calls, submit_all)
            for role, path in outputs.items():
                got[role] = _parse(path)
    return got


def render(results: dict[str, dict[str, dict[str, int]]], calls: int, submit_all: bool) -> str:
    lines = [f"System calls per call ({calls:,} {'submit-all' if submit_all else 'sequential'} no-op calls, "
             f"2 workers; `strace -c -f`):", "",
             "| transport | process | per call | biggest (per call) |", "|---|---|---:|---|"]
    for name, roles in results.items():
        for role, counts in roles.items():
            total = sum(counts.values()) / calls
            top = sorted(counts.items(), key=lambda item: -item[1])[:5]
            lines.append(f"| {name} | {role} | {total:.1f} | "
                         + ", ".join(f"{call} {n / calls:.1f}" for call, n in top) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--transports", default="tcp,zmq,gearman,tcp-server,zmq-server")
    parser.add_argument("--calls", type=int, default=2_000)
    parser.add_argument("--submit-all", action="store_true", help="submit every call, then wait (default: one by one)")
    args = parser.parse_args(argv)
    if shutil.which("strace") is None:
        print("strace is not installed: nothing to count with", file=sys.stderr)
        return 1
    names = [t.strip() for t in args.transports.split(",") if t.strip()]
    unknown = [t for t in names if t not in bench.ALL_TRANSPORTS]
    if unknown:
        parser.error(f"unknown transport(s) {', '.join(unknown)}; choose from {', '.join(bench.ALL_TRANSPORTS)}")
    results = {}
    for name in names:
        print(f"[syscalls] {name} ...", file=sys.stderr, flush=True)
        results[name] = measure(name, args.calls, args.submit_all)
    print(render(results, args.calls, args.submit_all))
    return 0


if __name__ == "__main__":
    sys.exit(main())
