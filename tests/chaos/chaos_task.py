"""The function the chaos clients submit; importable by name on every worker (its directory is on their
PYTHONPATH). Each execution is recorded as a side effect, never through the system's own logs::

    S <call id> <pid> <unix time>      when it starts
    E <call id> <pid> <unix time>      when it is about to return

one ``os.write`` of a short line to a file opened with ``O_APPEND``: the lines of concurrent writers (every
namespace shares the file system) never interleave.
"""

from __future__ import annotations

import os
import time
import zlib


def expected(call_id: str) -> int:
    """The value a correct execution of ``call_id`` returns."""
    return zlib.crc32(call_id.encode())


def _record(path: str, mark: str, call_id: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{mark} {call_id} {os.getpid()} {time.time():.3f}\n".encode())
    finally:
        os.close(fd)


def work(log_path: str, call_id: str, seconds: float) -> list[object]:
    """Record the start, sleep ``seconds`` (the call's work), record the end; ``[call_id, value, pid]``."""
    _record(log_path, "S", call_id)
    time.sleep(seconds)
    _record(log_path, "E", call_id)
    return [call_id, expected(call_id), os.getpid()]
