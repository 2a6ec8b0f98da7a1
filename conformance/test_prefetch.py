"""RemoteExecutor(max_workers=n, prefetch=2): the embedded default handing each worker two calls ahead.

The one declared difference (``prefetch``): calls handed out ahead are RUNNING at once, so scenarios about
pending calls first fill those places; everything else is ThreadPoolExecutor's behaviour unchanged."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from remote_executor.conformance import ExecutorConformance, ExecutorFactory


class TestEmbeddedPrefetch(ExecutorConformance):
    remote = True
    prefetch: ClassVar[int] = 2
    executor_setup = "from remote_executor import RemoteExecutor"
    executor_source = "RemoteExecutor(max_workers=2, prefetch=2)"

    @pytest.fixture
    def make_executor(self) -> ExecutorFactory:
        from remote_executor import RemoteExecutor

        def make(max_workers: int = 2, **kwargs: Any) -> RemoteExecutor:
            return RemoteExecutor(max_workers=max_workers, prefetch=2, **kwargs)

        return make
