"""help(RemoteExecutor) is a reference for every parameter, and repr(executor) says where, how big, and
in which state an executor is."""

from __future__ import annotations

import inspect
import pydoc
import re
from collections.abc import Callable

from remote_executor import RemoteExecutor, errors
from remote_executor.supervisor import Supervisor
from remote_executor.transports.tcp.server import TcpServer


def test_help_describes_every_parameter_and_error() -> None:
    text = pydoc.render_doc(RemoteExecutor, renderer=pydoc.plaintext)
    for name in inspect.signature(RemoteExecutor.__init__).parameters:
        if name not in ("self", "transport_options"):
            assert f"``{name}``" in text or f"``{name}(" in text, f"help(RemoteExecutor) does not explain {name}"
    for error in ("TransportError", "AuthenticationError", "WorkerLostError", "CallTimeoutError",
                  "SerializationError", "FrameTooLargeError", "BrokenRemoteExecutor", "InitializerFailed"):
        assert error in text and hasattr(errors, error)
    for option in ("pool=", "tls_ca", "curve_server_key", "job_ttl"):
        assert option in text


def test_repr_of_the_embedded_executor_shows_its_server_workers_and_state() -> None:
    executor = RemoteExecutor(max_workers=2)
    try:
        assert re.fullmatch(r"<RemoteExecutor tcp://127\.0\.0\.1:\d+ workers=2 max_workers=2 running>", repr(executor))
        assert repr(executor.with_options(timeout=2.5)).endswith(" call_timeout=2.5 running>")
    finally:
        executor.shutdown()
    assert repr(executor).endswith(" shutdown>")


def test_repr_of_an_executor_of_a_running_cluster(tcp_server: TcpServer,
                                                 start_workers: Callable[..., Supervisor]) -> None:
    with RemoteExecutor(transport=tcp_server.url) as executor:
        assert repr(executor) == f"<RemoteExecutor {tcp_server.url} workers=0 running>"
        start_workers(3)
        executor.wait_for_workers(3, timeout=30)
        assert repr(executor) == f"<RemoteExecutor {tcp_server.url} workers=3 running>"
