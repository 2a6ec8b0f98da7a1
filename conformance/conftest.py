"""Runs the reusable suite (``remote_executor.conformance``) against the oracle and each candidate.

One module per candidate: ``test_oracle.py`` (ThreadPoolExecutor), ``test_memory.py``, ``test_default.py``
(embedded cluster), ``test_tcp.py``. A scenario that the oracle passes and a candidate fails is a bug of
the candidate: never skip or xfail it here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

pytest.register_assert_rewrite("remote_executor.conformance")

_GRACE = 10.0


@pytest.fixture(autouse=True)
def _no_thread_left_behind() -> Iterator[None]:
    """Every scenario must leave no executor running: its threads are gone once the test ends."""
    before = set(threading.enumerate())
    yield
    leftover = [t for t in threading.enumerate() if t not in before]
    for thread in leftover:
        thread.join(timeout=_GRACE)
    alive = [t.name for t in leftover if t.is_alive()]
    assert not alive, f"threads still running after the scenario shut its executors down: {alive}"
