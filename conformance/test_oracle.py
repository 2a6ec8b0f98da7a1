"""The oracle: ThreadPoolExecutor (with Python 3.14's ``map``) passes every scenario by definition."""

from __future__ import annotations

from typing import Any

import pytest

from remote_executor.conformance import ExecutorConformance, ExecutorFactory, OracleExecutor


class TestThreadPoolOracle(ExecutorConformance):
    remote = False
    executor_setup = "from concurrent.futures import ThreadPoolExecutor"
    executor_source = "ThreadPoolExecutor(max_workers=2)"

    @pytest.fixture
    def make_executor(self) -> ExecutorFactory:
        def make(max_workers: int = 2, **kwargs: Any) -> OracleExecutor:
            return OracleExecutor(max_workers=max_workers, **kwargs)

        return make
