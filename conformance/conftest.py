"""Runs the reusable suite (``remote_executor.conformance``) against the oracle and each candidate.

One module per candidate: ``test_oracle.py`` (ThreadPoolExecutor), ``test_memory.py``, ``test_default.py``
(embedded cluster), ``test_tcp.py``. A scenario that the oracle passes and a candidate fails is a bug of
the candidate: never skip or xfail it here.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

pytest.register_assert_rewrite("remote_executor.conformance")

_GRACE = 10.0


@pytest.fixture(autouse=True, scope="session")
def _per_user_key_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Clients, servers and workers given no key share the per-user key file: a temporary one for the whole
    session (session-wide, so module-scoped clusters use it too), never the real home directory's.
    Everything else kept under $XDG_CONFIG_HOME (cluster records) goes there too."""
    if os.environ.get("REMOTE_EXECUTOR_KEY_FILE", "").startswith(str(tmp_path_factory.getbasetemp())):
        yield  # the other test tree's conftest already did it for this session: one key file for all
        return
    with pytest.MonkeyPatch.context() as patch:
        config = tmp_path_factory.mktemp("user-config")
        patch.setenv("REMOTE_EXECUTOR_KEY_FILE", str(config / "remote_executor" / "key"))
        patch.setenv("XDG_CONFIG_HOME", str(config))  # a test that unsets the one still misses ~/.config
        yield


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
