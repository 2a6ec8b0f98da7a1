"""The conformance suite over Gearman, on a real gearmand (nothing skipped).

- ``TestGearmanEmbedded``: ``RemoteExecutor(max_workers=n, transport="gearman")``: a private gearmand with
  ``-j``, a random key and n supervised workers per executor.
- ``TestGearmanRemote``: ``RemoteExecutor(transport="gearman://127.0.0.1:PORT")`` against one module-scoped
  gearmand (without ``-j``: max_retries is enforced by the client) and two supervised workers, the
  deployment shape (workers started with ``remote-executor worker gearman://...``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from remote_executor.conformance import ExecutorConformance, ExecutorFactory
from remote_executor.supervisor import Supervisor
from remote_executor.transports.gearman.gearmand import GearmandProcess

pytestmark = pytest.mark.gearman

URL_ENV = "REMOTE_EXECUTOR_CONFORMANCE_GEARMAN_URL"


class TestGearmanEmbedded(ExecutorConformance):
    remote = True
    executor_setup = "from remote_executor import RemoteExecutor"
    executor_source = 'RemoteExecutor(max_workers=2, transport="gearman")'

    @pytest.fixture
    def make_executor(self) -> ExecutorFactory:
        from remote_executor import RemoteExecutor

        def make(max_workers: int = 2, **kwargs: Any) -> RemoteExecutor:
            return RemoteExecutor(max_workers=max_workers, transport="gearman", **kwargs)

        return make


@pytest.fixture(scope="module")
def gearman_cluster() -> Iterator[str]:
    with GearmandProcess() as gearmand:
        workers = Supervisor(gearmand.url, 2, name="conformance-worker")
        workers.start()
        os.environ[URL_ENV] = gearmand.url  # for the interpreter-exit scenario's subprocess
        try:
            yield gearmand.url
        finally:
            del os.environ[URL_ENV]
            workers.stop()


class TestGearmanRemote(ExecutorConformance):
    remote = True
    executor_setup = "import os; from remote_executor import RemoteExecutor"
    executor_source = f"RemoteExecutor(max_workers=2, transport=os.environ[{URL_ENV!r}])"

    @pytest.fixture
    def make_executor(self, gearman_cluster: str) -> ExecutorFactory:
        from remote_executor import RemoteExecutor

        def make(max_workers: int = 2, **kwargs: Any) -> RemoteExecutor:
            return RemoteExecutor(max_workers=max_workers, transport=gearman_cluster, **kwargs)

        return make
