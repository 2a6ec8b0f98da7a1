"""See what your calls print: run with ``python examples/forward_output.py``.

With ``forward_output=True`` each line a call prints on its worker appears here, prefixed with the worker's
name: stdout on stdout, stderr on stderr, in the order the call wrote them, before the call's result.
"""

from __future__ import annotations

import sys

from remote_executor import RemoteExecutor


def square(n: int) -> int:
    print(f"working on {n}")
    if n % 2:
        print(f"warning: {n} is odd", file=sys.stderr)
    return n * n


def main() -> None:
    with RemoteExecutor(max_workers=2, forward_output=True) as executor:
        print("results:", list(executor.map(square, range(4))))


if __name__ == "__main__":
    main()
