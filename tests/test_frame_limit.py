"""A call or result larger than the job server's frame limit fails that call at once, with a clear message.

The job server announces its ``--max-frame-size`` in its WELCOME; the client checks each call before it
sends it, the worker each result before it sends that. Real servers, real worker processes, on loopback.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import cloudpickle
import pytest

from remote_executor import FrameTooLargeError, RemoteExecutor
from remote_executor.supervisor import Supervisor
from remote_executor.transports.tcp.server import TcpServer
from remote_executor.wire.frames import Limits

from .conftest import FAST_HEARTBEAT

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module

FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5}
LIMIT = 1_000_000  # 1.0 MB


def big_result(size: int) -> bytes:
    return b"r" * size


def length(data: bytes) -> int:
    return len(data)


@pytest.fixture(params=["tcp", "zmq"])
def cluster(request: pytest.FixtureRequest) -> Iterator[str]:
    """A job server with a 1 MB frame limit and one worker process; its URL."""
    server: Any
    if request.param == "tcp":
        server = TcpServer("127.0.0.1", 0, limits=Limits(max_frame=LIMIT), **FAST)
    else:
        from remote_executor.transports.zmq.server import ZmqServer

        server = ZmqServer("127.0.0.1", 0, limits=Limits(max_frame=LIMIT), **FAST)
    server.start()
    supervisor = Supervisor(server.url, 1, worker_args=FAST_HEARTBEAT, name="limit-worker")
    supervisor.start()
    try:
        yield str(server.url)
    finally:
        supervisor.stop()
        server.stop()


def test_an_oversized_argument_fails_that_call_at_once(cluster: str) -> None:
    with RemoteExecutor(transport=cluster, **FAST) as ex:
        start = time.monotonic()
        big = ex.submit(length, b"x" * 2_000_000)
        small = ex.submit(length, b"x" * 1000)
        with pytest.raises(FrameTooLargeError,
                           match=r"2\.0 MB exceeds the job server's limit of 1\.0 MB") as info:
            big.result(timeout=30)
        assert "the call" in str(info.value)
        assert small.result(timeout=30) == 1000  # the connection survived; other calls go on
        assert time.monotonic() - start < 10  # at once, not after reconnections
        assert ex.submit(length, b"y" * 500_000).result(timeout=30) == 500_000


def test_an_oversized_result_is_an_error_for_that_call(cluster: str) -> None:
    with RemoteExecutor(transport=cluster, max_retries=2, **FAST) as ex:
        with pytest.raises(FrameTooLargeError,
                           match=r"the result is too large to send: 3\.0 MB exceeds the job server's limit "
                                 r"of 1\.0 MB"):
            ex.submit(big_result, 3_000_000).result(timeout=30)
        assert ex.submit(big_result, 10).result(timeout=30) == b"r" * 10  # the same worker serves on


def test_map_with_an_oversized_item_fails_only_that_item(cluster: str) -> None:
    with RemoteExecutor(transport=cluster, **FAST) as ex:
        futures = [ex.submit(length, b"z" * n) for n in (10, 1_500_000, 20)]
        assert futures[0].result(timeout=30) == 10
        assert isinstance(futures[1].exception(timeout=30), FrameTooLargeError)
        assert futures[2].result(timeout=30) == 20


def test_gearman_fails_an_oversized_argument_at_once() -> None:
    """gearmand announces no limit: the client applies its own (lowered here with the transport option)."""
    with RemoteExecutor(1, transport="gearman", limits={"max_frame": LIMIT}) as ex:
        big = ex.submit(length, b"x" * 2_000_000)
        with pytest.raises(FrameTooLargeError, match=r"2\.0 MB exceeds the job server's limit of 1\.0 MB"):
            big.result(timeout=30)
        assert ex.submit(length, b"x" * 1000).result(timeout=30) == 1000


def test_gearman_fails_an_oversized_result_as_too_large_and_serves_on() -> None:
    """The worker does not know this client's limit: the client refuses the result unread, as too large
    (not as a forged one), and the next call runs."""
    with RemoteExecutor(1, transport="gearman", limits={"max_frame": LIMIT}) as ex:
        with pytest.raises(FrameTooLargeError, match=r"the result is too large to send: 3\.0 MB exceeds the job "
                                                     r"server's limit of 1\.0 MB"):
            ex.submit(big_result, 3_000_000).result(timeout=30)
        assert ex.submit(big_result, 10).result(timeout=30) == b"r" * 10


@pytest.mark.parametrize("transport", ["tcp", pytest.param("zmq", marks=pytest.mark.zmq)])
def test_the_embedded_cluster_applies_a_lowered_limit_to_calls_too(transport: str) -> None:
    """Its client talks to the job server in-process, with no socket to apply the limit: it checks itself."""
    with RemoteExecutor(1, transport=transport, limits={"max_frame": LIMIT}) as ex:
        futures = [ex.submit(length, b"z" * n) for n in (10, 2_000_000, 20)]
        with pytest.raises(FrameTooLargeError, match=r"the call \(its function and arguments\) is too large to send: "
                                                     r"2\.0 MB exceeds the job server's limit of 1\.0 MB"):
            futures[1].result(timeout=30)
        assert [futures[0].result(timeout=30), futures[2].result(timeout=30)] == [10, 20]
        assert ex.submit(length, b"y" * 500_000).result(timeout=30) == 500_000


def test_the_frame_size_error_pickles() -> None:
    """As every exception a transport may hand on should: with its numbers."""
    import pickle

    from remote_executor.wire.frames import FrameSizeError

    error = pickle.loads(pickle.dumps(FrameSizeError(5, 3)))
    assert (error.total, error.limit, str(error)) == (5, 3, "frame of 5 bytes exceeds the limit of 3 bytes")
