"""Remote tracebacks show your source: run with ``python examples/tracebacks.py``.

``parse`` lives in this script (``__main__``), so it travels to the worker by value; when it raises there,
the traceback still names this file, the line, and shows the line itself, as ProcessPoolExecutor does.
"""

from __future__ import annotations

import traceback

from remote_executor import RemoteExecutor


def parse(text: str) -> int:
    return int(text)  # raises ValueError for "seven"


def main() -> None:
    with RemoteExecutor(max_workers=1) as executor:
        try:
            executor.submit(parse, "seven").result()
        except ValueError:
            traceback.print_exc()  # the remote frames come first, as the RemoteTraceback cause


if __name__ == "__main__":
    main()
