"""The fault scenarios (``remote_executor.conformance.FaultTests``) on a real gearmand (without ``-j``).

Gearman has no heartbeat: a worker that hangs (SIGSTOP) keeps its connection, so gearmand never takes its
job away. That scenario is declared unsupported below, and the suite checks the declaration.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from remote_executor.conformance import FaultTests
from remote_executor.transports.gearman.gearmand import GearmandProcess

pytestmark = pytest.mark.gearman


class GearmanFaultCluster:
    executor_options: dict[str, object] = {}
    worker_args = ()
    heartbeat = None

    def __init__(self) -> None:
        self.gearmand = GearmandProcess(threads=2).start()
        self.url = self.gearmand.url

    def stop_server(self) -> None:
        self.gearmand.stop()

    def start_server(self) -> None:
        self.gearmand = GearmandProcess(port=self.gearmand.port, threads=2).start()


class TestGearmanFaults(FaultTests):
    unsupported = {"sigstop": "Gearman has no heartbeat: a hung worker keeps its job and is never declared lost"}

    @pytest.fixture
    def fault_cluster(self) -> Iterator[GearmanFaultCluster]:
        cluster = GearmanFaultCluster()
        yield cluster
        cluster.gearmand.stop()
