"""RemoteExecutor(max_workers=n): the embedded default, a local job server and n worker processes."""

from __future__ import annotations

from typing import Any

import pytest

from remote_executor.conformance import ExecutorConformance, ExecutorFactory


class TestEmbeddedDefault(ExecutorConformance):
    remote = True
    executor_setup = "from remote_executor import RemoteExecutor"
    executor_source = "RemoteExecutor(max_workers=2)"

    @pytest.fixture
    def make_executor(self) -> ExecutorFactory:
        from remote_executor import RemoteExecutor

        def make(max_workers: int = 2, **kwargs: Any) -> RemoteExecutor:
            return RemoteExecutor(max_workers=max_workers, **kwargs)

        return make
