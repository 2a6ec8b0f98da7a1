"""RemoteExecutor(max_workers=n, transport="zmq"): an embedded cluster over the zmq transport."""

from __future__ import annotations

from typing import Any

import pytest

from remote_executor.conformance import ExecutorConformance, ExecutorFactory


@pytest.fixture(autouse=True, scope="module")
def _pyzmq_garbage_collector() -> None:
    """pyzmq frees the buffers of zero-copy sends through one process-wide daemon thread that starts on
    first use and lives until exit; start it before the per-test check for leftover threads."""
    from zmq.utils.garbage import gc

    if not gc.is_alive():
        gc.start()


class TestZmqTransport(ExecutorConformance):
    remote = True
    executor_setup = "from remote_executor import RemoteExecutor"
    executor_source = 'RemoteExecutor(max_workers=2, transport="zmq")'

    @pytest.fixture
    def make_executor(self) -> ExecutorFactory:
        from remote_executor import RemoteExecutor

        def make(max_workers: int = 2, **kwargs: Any) -> RemoteExecutor:
            return RemoteExecutor(max_workers=max_workers, transport="zmq", **kwargs)

        return make
