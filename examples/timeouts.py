"""Per-call time limits, and knowing the workers are there: run with ``python examples/timeouts.py``.

A call that runs past its limit fails with ``CallTimeoutError`` (a ``concurrent.futures.TimeoutError``); the
worker process that ran it is stopped and replaced, so its slot is free again at once.
"""

from __future__ import annotations

import os
import time

from remote_executor import CallTimeoutError, RemoteExecutor


def slow(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def fetch(url: str, *, timeout: float) -> str:
    """A function with its own ``timeout`` keyword: the executor never takes it for its own."""
    return f"fetched {url} with timeout={timeout}"


def main() -> None:
    # The constructor returns once both worker processes are ready.
    with RemoteExecutor(max_workers=2, call_timeout=30) as executor:
        print(executor.submit(fetch, "https://example.org", timeout=5).result())

        quick = executor.with_options(timeout=0.5)  # a view: same workers, another limit
        started = time.monotonic()
        try:
            quick.submit(slow, 60).result()
        except CallTimeoutError as exc:
            print(f"stopped after {time.monotonic() - started:.1f}s: {exc}")

        print("the next call runs at once, on worker pid", executor.submit(slow, 0).result())


if __name__ == "__main__":
    main()
