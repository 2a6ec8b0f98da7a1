"""The reusable conformance suite: does an ``Executor`` behave like ``ThreadPoolExecutor``?

Behaviour mixins, one per area, combined with a candidate that a subclass describes. To run it::

    import pytest
    from remote_executor.conformance import ExecutorConformance

    class TestMyExecutor(ExecutorConformance):
        remote = True                                    # calls run in other processes
        executor_setup = "from my_pkg import MyExecutor"  # for the interpreter-exit scenario,
        executor_source = "MyExecutor(max_workers=2)"     # which runs in a fresh interpreter

        @pytest.fixture
        def make_executor(self):
            return lambda max_workers=2, **kwargs: MyExecutor(max_workers=max_workers, **kwargs)

For remote executors there are fault scenarios too (workers killed, frozen or poisoned, the job server
restarted or gone): :class:`FaultTests`, run against a :class:`FaultCluster` (see
:mod:`remote_executor.conformance.faults`).

The scenarios submit functions of :mod:`remote_executor.conformance.tasks` (importable by workers) and
synchronise with a :class:`~remote_executor.conformance.gate.Gate` rather than sleeps. Every scenario shuts
down what it created. Pytest is needed (it is not a dependency of the package). For readable assertion
failures, call ``pytest.register_assert_rewrite("remote_executor.conformance")`` in your ``conftest.py``.
"""

from __future__ import annotations

from ._aio import AsyncioTests
from ._base import TIMEOUT, ConformanceBase, ExecutorFactory
from ._callbacks import CallbackTests
from ._cancel import CancelTests
from ._exceptions import ExceptionTests
from ._initializer import InitializerTests
from ._load import LoadTests
from ._map import MapTests
from ._shutdown import ShutdownTests
from ._submit import SubmitTests
from ._waiting import WaitTests
from .faults import FaultCluster, FaultTests
from .gate import Gate, GateError, wait_at_gate
from .oracle import OracleExecutor

__all__ = [
    "TIMEOUT",
    "AsyncioTests",
    "CallbackTests",
    "CancelTests",
    "ConformanceBase",
    "ExceptionTests",
    "ExecutorConformance",
    "ExecutorFactory",
    "FaultCluster",
    "FaultTests",
    "Gate",
    "GateError",
    "InitializerTests",
    "LoadTests",
    "MapTests",
    "OracleExecutor",
    "ShutdownTests",
    "SubmitTests",
    "WaitTests",
    "wait_at_gate",
]


class ExecutorConformance(
    SubmitTests,
    MapTests,
    WaitTests,
    CancelTests,
    ShutdownTests,
    InitializerTests,
    ExceptionTests,
    CallbackTests,
    AsyncioTests,
    LoadTests,
):
    """Every behaviour of the executor contract; subclass it, set :attr:`remote` and provide ``make_executor``."""
