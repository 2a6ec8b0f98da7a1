"""Calls from asyncio (``loop.run_in_executor``) side by side with ProcessPoolExecutor, in one run.

Run from the repository root::

    .venv/bin/python benchmarks/asyncio_calls.py [--calls 3000] [--runs 5] [--workers 2]

``asyncio.wrap_future`` adds a done-callback to each future, which hands the result to the event loop;
done-callbacks of ours run on a thread of the executor's own (never on the thread that brings results), so
this is where that hand-off would cost, if it did. Each run times ``--calls`` calls gathered at once and a
third as many awaited one by one, on the embedded default cluster and on ProcessPoolExecutor, interleaved;
the table gives the median calls per second over ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from concurrent.futures import Executor, ProcessPoolExecutor

from remote_executor import RemoteExecutor


def noop(x: int) -> int:
    return x


async def calls_per_second(executor: Executor, calls: int, one_by_one: bool) -> float:
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    if one_by_one:
        for i in range(calls):
            await loop.run_in_executor(executor, noop, i)
    else:
        await asyncio.gather(*(loop.run_in_executor(executor, noop, i) for i in range(calls)))
    return calls / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    rates: dict[tuple[str, bool], list[float]] = {}
    with RemoteExecutor(args.workers) as ours, ProcessPoolExecutor(args.workers) as ppe:
        executors: dict[str, Executor] = {"RemoteExecutor (embedded)": ours, "ProcessPoolExecutor": ppe}
        for executor in executors.values():  # warm up: workers started, noop imported
            asyncio.run(calls_per_second(executor, 200, False))
        for _ in range(args.runs):
            for name, executor in executors.items():
                for one_by_one in (False, True):
                    calls = args.calls // 3 if one_by_one else args.calls
                    rate = asyncio.run(calls_per_second(executor, calls, one_by_one))
                    rates.setdefault((name, one_by_one), []).append(rate)
    print(f"| executor ({args.workers} workers) | gathered, calls/s | one by one, calls/s |")
    print("|---|---|---|")
    for name in executors:
        print(f"| {name} | {statistics.median(rates[name, False]):.0f} | {statistics.median(rates[name, True]):.0f} |")


if __name__ == "__main__":
    main()
