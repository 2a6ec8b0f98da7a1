"""The fault scenarios (``remote_executor.conformance.FaultTests``) on a standalone tcp job server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from remote_executor.conformance import FaultTests
from remote_executor.transports.tcp.server import TcpServer

INTERVAL, TIMEOUT = 0.2, 2.0  # ten missed beats: a worker starved on a loaded machine is not lost
FAST = {"heartbeat_interval": INTERVAL, "heartbeat_timeout": TIMEOUT}


class TcpFaultCluster:
    executor_options = FAST
    worker_args = ("--heartbeat-interval", str(INTERVAL), "--heartbeat-timeout", str(TIMEOUT))
    heartbeat = (INTERVAL, TIMEOUT)

    def __init__(self) -> None:
        self.server = TcpServer("127.0.0.1", 0, **FAST)
        self.server.start()
        self.url = self.server.url

    def stop_server(self) -> None:
        self.server.stop()

    def start_server(self) -> None:
        self.server = TcpServer("127.0.0.1", self.server.port, **FAST)
        self.server.start()


class TestTcpFaults(FaultTests):
    @pytest.fixture
    def fault_cluster(self) -> Iterator[TcpFaultCluster]:
        cluster = TcpFaultCluster()
        yield cluster
        cluster.server.stop()
