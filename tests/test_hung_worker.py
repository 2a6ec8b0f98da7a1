"""An embedded cluster kills a worker process its job server gave up as hung, and starts another: a process
stuck in C code (or stopped) never notices its lost connection, and would otherwise hold its slot for ever
(with ``max_workers=1`` no call would run again)."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest

from remote_executor import RemoteExecutor, WorkerLostError
from tests.conftest import pid_alive, wait_for


@pytest.mark.parametrize("transport", ["tcp", "zmq"])
def test_a_hung_worker_is_killed_and_replaced(transport: str) -> None:
    with RemoteExecutor(1, transport=transport, max_retries=0, heartbeat_interval=0.2,
                        heartbeat_timeout=1.5) as ex:
        hung = ex.submit(os.getpid).result(timeout=60)
        stuck = ex.submit(time.sleep, 60)
        wait_for(lambda: stuck.running(), what="the call to be handed out")  # (to that worker: the only one)
        os.kill(hung, signal.SIGSTOP)  # as stuck as a call in C code that holds the GIL
        try:
            with pytest.raises(WorkerLostError):
                stuck.result(timeout=60)
            wait_for(lambda: not pid_alive(hung), what="the hung worker to be killed")
            assert ex.submit(os.getpid).result(timeout=60) not in (hung, None)  # a new worker runs calls
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGKILL)
