"""The fault scenarios (``remote_executor.conformance.FaultTests``) on a real gearmand (without ``-j``).

Gearman itself has no heartbeat: a worker that hangs (SIGSTOP) keeps its connection, so gearmand never takes
its job away. Our workers report liveness through the job ("alive" WORK_DATA every heartbeat interval), and
the client resubmits a call whose worker fell silent for the heartbeat timeout, so the SIGSTOP scenario
holds here as on our own job server.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from remote_executor.conformance import FaultTests
from remote_executor.transports.gearman.gearmand import GearmandProcess

pytestmark = pytest.mark.gearman


class GearmanFaultCluster:
    # Ten missed beats (2 s): a worker starved on a loaded machine is not lost, as on tcp and zmq.
    executor_options: dict[str, object] = {"heartbeat_interval": 0.2, "heartbeat_timeout": 2.0}
    worker_args = ("--heartbeat-interval", "0.2", "--heartbeat-timeout", "2.0")
    heartbeat = (0.2, 2.0)

    def __init__(self) -> None:
        self.gearmand = GearmandProcess(threads=2).start()
        self.url = self.gearmand.url

    def stop_server(self) -> None:
        self.gearmand.stop()

    def start_server(self) -> None:
        self.gearmand = GearmandProcess(port=self.gearmand.port, threads=2).start()


class TestGearmanFaults(FaultTests):
    @pytest.fixture
    def fault_cluster(self) -> Iterator[GearmanFaultCluster]:
        cluster = GearmanFaultCluster()
        yield cluster
        cluster.gearmand.stop()
