"""Progress for long work: run with ``python examples/progress.py``.

``progress(...)`` passes results through as they come and shows how many came: a tqdm bar when tqdm is
installed (``pip install remote-executor[progress]``; a widget in Jupyter), else a line on stderr now and then.
"""

from __future__ import annotations

import time

from remote_executor import RemoteExecutor, progress


def slow_square(n: int) -> int:
    time.sleep(0.05)
    return n * n


def main() -> None:
    numbers = range(40)
    with RemoteExecutor(max_workers=2) as executor:
        # A map iterator: results in input order; it has no length, so give the total.
        squares = list(progress(executor.map(slow_square, numbers), total=len(numbers), desc="squares"))
        print("sum of squares:", sum(squares))

        # Futures: yielded as they complete (as concurrent.futures.as_completed does).
        futures = [executor.submit(slow_square, n) for n in numbers]
        done = [future.result() for future in progress(futures, desc="futures")]
        print("largest:", max(done))


if __name__ == "__main__":
    main()
