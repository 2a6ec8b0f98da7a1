"""The fault scenarios (``remote_executor.conformance.FaultTests``) on a standalone zmq job server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from remote_executor.conformance import FaultTests

pytestmark = pytest.mark.zmq

INTERVAL, TIMEOUT = 0.2, 2.0  # ten missed beats: a worker starved on a loaded machine is not lost
FAST = {"heartbeat_interval": INTERVAL, "heartbeat_timeout": TIMEOUT}


@pytest.fixture(autouse=True, scope="module")
def _pyzmq_garbage_collector() -> None:
    """pyzmq's process-wide buffer-freeing thread lives until exit: start it before the leftover-thread check."""
    from zmq.utils.garbage import gc

    if not gc.is_alive():
        gc.start()


class ZmqFaultCluster:
    executor_options = FAST
    worker_args = ("--heartbeat-interval", str(INTERVAL), "--heartbeat-timeout", str(TIMEOUT))
    heartbeat = (INTERVAL, TIMEOUT)

    def __init__(self) -> None:
        from remote_executor.transports.zmq.server import ZmqServer

        self._server_class = ZmqServer
        self.server = ZmqServer("127.0.0.1", 0, **FAST)
        self.server.start()
        self.url = self.server.url

    def stop_server(self) -> None:
        self.server.stop()

    def start_server(self) -> None:
        self.server = self._server_class("127.0.0.1", self.server.port, **FAST)
        self.server.start()


class TestZmqFaults(FaultTests):
    @pytest.fixture
    def fault_cluster(self) -> Iterator[ZmqFaultCluster]:
        cluster = ZmqFaultCluster()
        yield cluster
        cluster.server.stop()
