"""RemoteExecutor over the in-process "memory" transport: executor logic and serialization, no sockets."""

from __future__ import annotations

from typing import Any

import pytest

from remote_executor.conformance import ExecutorConformance, ExecutorFactory


class TestMemoryTransport(ExecutorConformance):
    remote = True
    executor_setup = "from remote_executor import RemoteExecutor"
    executor_source = 'RemoteExecutor(max_workers=2, transport="memory")'

    @pytest.fixture
    def make_executor(self) -> ExecutorFactory:
        from remote_executor import RemoteExecutor

        def make(max_workers: int = 2, **kwargs: Any) -> RemoteExecutor:
            return RemoteExecutor(max_workers=max_workers, transport="memory", **kwargs)

        return make
