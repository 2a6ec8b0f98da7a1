"""Function calls per call in the executor's process, counted with ``sys.setprofile`` on every thread.

Run from the repository root::

    .venv/bin/python benchmarks/client_calls.py [--transports tcp,zmq,gearman] [--calls 3000] [--top 0]

For each transport a fresh interpreter installs a profile function on every thread (before the executor
starts its own), starts ``RemoteExecutor(2, transport=...)``, warms it up, then submits ``--calls`` calls of
an importable no-op at once and waits for them. It prints the Python-level and C-level function calls per
call made in that process: the caller's thread, the I/O and job-server threads (for the embedded tcp and zmq
clusters the job server runs in this process; gearmand is a process of its own and is not counted). Unlike
times, these counts hardly depend on how loaded the machine is, so they show what a change to the hot path
saved. ``--top N`` lists the N Python functions called most per call.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def count(transport: str, calls: int, warmup: int = 200) -> dict[str, Any]:
    """In this process: the counts per call for ``transport`` (see the module's docstring)."""
    import threading
    from concurrent.futures import wait

    sys.path.insert(0, str(HERE))
    import remote_executor
    from _tasks import noop

    counts: Counter[tuple[str, str]] = Counter()
    counting = False

    def profile(frame: Any, event: str, arg: Any) -> None:
        if not counting:
            return
        if event == "call":
            code = frame.f_code
            counts[(Path(code.co_filename).name, code.co_name)] += 1
        elif event == "c_call":
            counts[("C", getattr(arg, "__qualname__", repr(arg)))] += 1

    threading.setprofile(profile)  # the threads the executor starts from now on
    sys.setprofile(profile)
    try:
        with remote_executor.RemoteExecutor(2, transport=transport) as executor:
            list(executor.map(noop, range(warmup)))
            counting = True
            wait([executor.submit(noop, i) for i in range(calls)])
            counting = False
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    python = sum(n for (where, _), n in counts.items() if where != "C")
    native = sum(n for (where, _), n in counts.items() if where == "C")
    top = [(f"{where}:{name}", n / calls) for (where, name), n in counts.most_common() if where != "C"]
    return {"transport": transport, "python": python / calls, "c": native / calls, "top": top}


def count_in_child(transport: str, calls: int) -> dict[str, Any]:
    """:func:`count` in a fresh interpreter (no thread of an earlier executor, no profile left behind)."""
    proc = subprocess.run([sys.executable, __file__, "--child", transport, "--calls", str(calls)],
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"counting {transport} failed:\n{proc.stderr}")
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transports", default="tcp,zmq,gearman")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--top", type=int, default=0, help="also list the N Python functions called most")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(count(args.child, args.calls)))
        return 0
    rows = [count_in_child(t, args.calls) for t in args.transports.split(",") if t]
    print(f"Function calls per call in the executor's process ({args.calls} calls submitted at once, "
          f"2 workers, Python {sys.version.split()[0]}):\n")
    print("| transport | Python calls / call | C calls / call |")
    print("|---|---:|---:|")
    for row in rows:
        print(f"| {row['transport']} | {row['python']:.1f} | {row['c']:.1f} |")
    for row in rows if args.top else []:
        print(f"\n{row['transport']}: the {args.top} Python functions called most, per call")
        for name, per_call in row["top"][:args.top]:
            print(f"  {per_call:6.2f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
