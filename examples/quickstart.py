"""The embedded default: a local job server and worker processes, nothing to install or start.

Run with ``bash scripts/demo.sh`` (or ``python examples/quickstart.py`` once the package is installed).
"""

from __future__ import annotations

import os
import time

from remote_executor import RemoteExecutor


def count_primes(start: int, stop: int) -> tuple[int, int, int]:
    """Primes in [start, stop), by trial division: real CPU work for the workers."""
    count = 0
    for n in range(max(start, 2), stop):
        if all(n % d for d in range(2, int(n**0.5) + 1)):
            count += 1
    return start, count, os.getpid()


def main() -> None:
    started = time.perf_counter()
    with RemoteExecutor(max_workers=4) as executor:  # 4 local worker processes on loopback
        ranges = [(lo, lo + 50_000) for lo in range(0, 400_000, 50_000)]
        total = 0
        workers = set()
        for start, count, pid in executor.map(count_primes, *zip(*ranges, strict=True)):
            print(f"primes in [{start:>7}, {start + 50_000:>7}): {count:>5}   (worker pid {pid})")
            total += count
            workers.add(pid)
        squares = executor.submit(lambda xs: [x * x for x in xs], range(5))  # lambdas travel too
        print(f"total primes below 400,000: {total}  (expected 33860)")
        print(f"a lambda ran remotely: {squares.result()}")
        print(f"{len(workers)} worker processes, client pid {os.getpid()}, "
              f"{time.perf_counter() - started:.2f}s in all")


if __name__ == "__main__":
    main()
