"""RemoteExecutor(transport="tcp://127.0.0.1:PORT"): a standalone job server and two supervised workers.

This is the deployment shape (a client connecting to a server started with ``remote-executor server``),
so the network client, reconnection-capable I/O thread and shared worker pool are under the contract too.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from remote_executor.conformance import ExecutorConformance, ExecutorFactory
from remote_executor.supervisor import Supervisor
from remote_executor.transports.tcp.server import TcpServer

URL_ENV = "REMOTE_EXECUTOR_CONFORMANCE_URL"


@pytest.fixture(scope="module")
def tcp_cluster() -> Iterator[str]:
    server = TcpServer("127.0.0.1", 0)
    server.start()
    workers = Supervisor(server.url, 2, name="conformance-worker")
    workers.start()
    os.environ[URL_ENV] = server.url  # for the interpreter-exit scenario's subprocess
    try:
        yield server.url
    finally:
        del os.environ[URL_ENV]
        workers.stop()
        server.stop()


class TestTcpRemote(ExecutorConformance):
    remote = True
    executor_setup = "import os; from remote_executor import RemoteExecutor"
    executor_source = f"RemoteExecutor(max_workers=2, transport=os.environ[{URL_ENV!r}])"

    @pytest.fixture
    def make_executor(self, tcp_cluster: str) -> ExecutorFactory:
        from remote_executor import RemoteExecutor

        def make(max_workers: int = 2, **kwargs: Any) -> RemoteExecutor:
            return RemoteExecutor(max_workers=max_workers, transport=tcp_cluster, **kwargs)

        return make
