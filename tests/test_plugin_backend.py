"""A third-party backend registered by entry point gets everything, with no edit outside its own module.

The test installs a tiny distribution in a temporary directory (a module and a ``.dist-info`` with the
entry point) and puts it on the path; then the executor (embedded and by URL), ``remote-executor server``,
``worker`` and ``status``, and the worker processes all resolve ``toy://`` through the registry.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from remote_executor import RemoteExecutor
from remote_executor.transports import get_backend

TOY_MODULE = textwrap.dedent(
    '''
    """A toy backend: our job-server protocol over TCP, under another scheme, built from public parts."""
    from remote_executor.jobserver.backend import JobServerBackend
    from remote_executor.transports import split_hostports
    from remote_executor.transports.tcp.server import TcpServer
    from remote_executor.transports.tcp.stream import TcpChannel


    class ToyServer(TcpServer):
        scheme = "toy"


    class ToyBackend(JobServerBackend):
        scheme = "toy"
        server_class = ToyServer

        def connector(self, url, key, extra, limits):
            address = split_hostports(url)[0]
            return lambda timeout: TcpChannel.connect(address, key, limits, url, timeout)
    '''
)


@pytest.fixture
def toy_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    (tmp_path / "toy_backend.py").write_text(TOY_MODULE)
    info = tmp_path / "toy_backend-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-backend\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[remote_executor.transports]\ntoy = toy_backend:ToyBackend\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # workers inherit the path, so they find it too
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    yield tmp_path
    sys.modules.pop("toy_backend", None)
    from remote_executor import transports

    transports._cache.pop("toy", None)


def test_the_entry_point_is_found(toy_installed: Path) -> None:
    backend = get_backend("TOY")
    assert type(backend).__name__ == "ToyBackend" and backend.scheme == "toy"


def test_embedded_cluster_and_its_worker_processes(toy_installed: Path) -> None:
    with RemoteExecutor(max_workers=2, transport="toy") as ex:
        assert ex.transport.cluster.url.startswith("toy://")  # type: ignore[attr-defined]
        assert list(ex.map(pow, [2, 3], [5, 2])) == [32, 9]


def test_server_worker_and_status_commands(toy_installed: Path) -> None:
    cli = [sys.executable, "-m", "remote_executor.cli"]
    with socket.socket() as probe:  # a free port (the command line takes no port 0)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([*cli, "server", f"toy://127.0.0.1:{port}"], stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        assert server.stdout is not None
        url = server.stdout.readline().split()[-1]  # "serving toy://127.0.0.1:PORT"
        assert url.startswith("toy://127.0.0.1:")
        worker = subprocess.Popen([*cli, "worker", url, "--processes", "1"], stdout=subprocess.DEVNULL)
        with RemoteExecutor(transport=url) as ex:
            assert ex.submit(pow, 7, 2).result(timeout=60) == 49
        status = subprocess.run([*cli, "status", url], capture_output=True, text=True, timeout=60, check=True)
        info = json.loads(status.stdout)
        assert info["server"] == url and len(info["workers"]) == 1
    finally:
        for proc in (worker, server):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
        if server.stdout is not None:
            server.stdout.close()
    assert worker is not None and worker.returncode == 0
    assert server.returncode == 0
