"""A call whose module exists only on the client fails with a message that says how to get it to the workers."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from remote_executor import RemoteExecutor
from remote_executor.errors import SerializationError
from remote_executor.supervisor import Supervisor
from remote_executor.transports.tcp.server import TcpServer


def test_a_module_only_the_client_has_gets_a_hint(tcp_server: TcpServer, start_workers: Callable[..., Supervisor],
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    start_workers(1)  # started before the module exists: their import path cannot hold it
    (tmp_path / "client_only_helpers.py").write_text("def double(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    helpers = importlib.import_module("client_only_helpers")
    try:
        with RemoteExecutor(transport=tcp_server.url, heartbeat_interval=0.2, heartbeat_timeout=1.5) as ex:
            with pytest.raises(SerializationError) as caught:
                ex.submit(helpers.double, 21).result(timeout=60)
            message = str(caught.value)
            assert "No module named 'client_only_helpers'" in message
            assert "cloudpickle.register_pickle_by_value(client_only_helpers)" in message
            assert ex.submit(abs, -3).result(timeout=60) == 3  # the worker serves on
    finally:
        sys.modules.pop("client_only_helpers", None)
