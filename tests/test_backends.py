"""One backend per scheme: the registry, typed errors at the boundary, and the bugs the per-transport copies had.

Regression tests for what drifted while each transport had its own copy of a concept: the worker process
resolving a scheme differently from the command line, two key resolvers, an I/O thread that stranded
futures on an unexpected error, and a worker that ignored SIGTERM while it had no job server.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remote_executor import RemoteExecutor
from remote_executor.errors import (
    AuthenticationError,
    BrokenRemoteExecutor,
    TransportError,
    VersionMismatchError,
)
from remote_executor.jobserver.client import ClientSession
from remote_executor.security import resolve_key
from remote_executor.supervisor import Supervisor
from remote_executor.transports import get_backend, scheme_of
from remote_executor.transports.base import Backend, ServerSettings
from remote_executor.transports.gearman.gearmand import GearmandProcess
from remote_executor.transports.tcp.server import TcpServer
from remote_executor.transports.zmq.server import ZmqServer
from remote_executor.wire.frames import Frame, Kind
from remote_executor.wire.messages import RejectCode, reject, rejection

from .conftest import FAST_HEARTBEAT

FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5}
CLI = [sys.executable, "-m", "remote_executor.cli"]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --- the registry -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "scheme"), [("TCP://h:1", "tcp"), ("Zmq", "zmq"), ("gearman://a:1,b:2/p", "gearman")])
def test_scheme_lookup_ignores_case(spec: str, scheme: str) -> None:
    assert scheme_of(spec) == scheme
    assert get_backend(scheme_of(spec)).scheme == scheme
    assert get_backend(scheme.upper()) is get_backend(scheme)


def test_unknown_scheme_says_did_you_mean() -> None:
    with pytest.raises(TransportError, match=r"unknown transport scheme 'tpc'.*did you mean 'tcp'\?"):
        get_backend("tpc")


def test_every_builtin_backend_is_a_typed_backend() -> None:
    for scheme in ("tcp", "zmq", "gearman", "memory"):
        assert isinstance(get_backend(scheme), Backend)


def test_a_backend_without_a_server_says_so() -> None:
    with pytest.raises(TransportError, match="gearman:// has no job server of ours"):
        get_backend("gearman").server("gearman://127.0.0.1:4730", ServerSettings())


# --- typed errors at the boundary --------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["tcp", "zmq", "gearman"])
def test_connection_refused_is_a_transport_error_naming_the_url(scheme: str) -> None:
    url = f"{scheme}://127.0.0.1:{closed_port()}"
    with pytest.raises(TransportError, match=re.escape(url.split("://", 1)[1])):
        RemoteExecutor(transport=url, connect_timeout=0.5)


@pytest.mark.parametrize("scheme", ["tcp", "gearman"])
def test_unknown_host_is_a_transport_error_naming_the_host(scheme: str) -> None:
    with pytest.raises(TransportError, match=r"no-such-host\.invalid"):
        RemoteExecutor(transport=f"{scheme}://no-such-host.invalid:4730", connect_timeout=0.5)


@pytest.mark.parametrize(
    ("code", "error"),
    [(RejectCode.VERSION, VersionMismatchError), (RejectCode.AUTHENTICATION, AuthenticationError),
     (RejectCode.PROTOCOL, TransportError)],
)
def test_reject_frames_carry_a_code_not_prose_to_parse(code: RejectCode, error: type[Exception]) -> None:
    frame = reject(code, "VersionMismatchError: token")  # the text would fool a string-matching client
    assert frame.kind == Kind.REJECT and frame.a == code
    assert type(rejection(frame, "tcp://h:1")) is error


# --- one key resolver ------------------------------------------------------------------------------------


def test_empty_key_is_an_error_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REMOTE_EXECUTOR_KEY", raising=False)
    with pytest.raises(ValueError, match="empty"):
        RemoteExecutor(transport="memory", key="")
    with pytest.raises(ValueError, match="empty"):
        RemoteExecutor(transport="memory", key=b" \n")
    empty = tmp_path / "empty.key"
    empty.write_bytes(b"\n")
    with pytest.raises(ValueError, match="empty"):
        resolve_key(key_file=empty)
    result = subprocess.run([*CLI, "status", "tcp://127.0.0.1:9", "--key-file", str(empty)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "empty" in result.stderr


def test_key_argument_and_key_file_strip_alike(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    path.write_bytes(b"s3cret\n")
    path.chmod(0o600)
    assert resolve_key(key=path.read_bytes()) == resolve_key(key_file=path) == resolve_key(key="s3cret") == b"s3cret"
    ex = RemoteExecutor(transport="memory", key_file=path)
    ex.shutdown()


# --- one reconnecting client loop: an unexpected error fails every future ------------------------------------


@pytest.fixture(params=["tcp", "zmq"])
def standalone(request: pytest.FixtureRequest) -> Iterator[str]:
    server: Any = (TcpServer if request.param == "tcp" else ZmqServer)("127.0.0.1", 0, **FAST)
    server.start()
    workers = Supervisor(server.url, 1, worker_args=FAST_HEARTBEAT, name="backend-test")
    workers.start()
    try:
        yield server.url
    finally:
        workers.stop()
        server.stop()


def test_a_bug_on_the_io_thread_fails_every_future_instead_of_stranding_them(
    standalone: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with RemoteExecutor(transport=standalone, max_workers=1, **FAST) as ex:
        assert ex.submit(pow, 2, 3).result(timeout=30) == 8

        def broken_handle(self: ClientSession, frame: Frame) -> None:
            raise RuntimeError("a bug in frame handling")

        monkeypatch.setattr(ClientSession, "handle", broken_handle)
        futures = [ex.submit(time.sleep, 0.01) for _ in range(5)]
        for future in futures:
            with pytest.raises(BrokenRemoteExecutor, match="a bug in frame handling"):
                future.result(timeout=30)


# --- the worker command --------------------------------------------------------------------------------------


def test_worker_command_accepts_an_upper_case_scheme() -> None:
    server = TcpServer("127.0.0.1", 0, **FAST)
    server.start()
    url = server.url.replace("tcp://", "TCP://")
    proc = subprocess.Popen([*CLI, "worker", url, "--processes", "1", *FAST_HEARTBEAT],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with RemoteExecutor(transport=url, **FAST) as ex:
            assert ex.submit(pow, 3, 3).result(timeout=60) == 27
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
        server.stop()
    assert proc.returncode == 0, stderr.decode()
    assert b"ModuleNotFoundError" not in stderr


@pytest.fixture
def unreachable_url(request: pytest.FixtureRequest) -> str:
    return f"{request.param}://127.0.0.1:{closed_port()}"


@pytest.mark.parametrize("unreachable_url", ["tcp", "zmq", "gearman"], indirect=True)
def test_worker_without_a_job_server_exits_promptly_on_sigterm(unreachable_url: str) -> None:
    proc = subprocess.Popen([*CLI, "worker", unreachable_url, "--processes", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the child is trying to connect (the per-test timeout bounds this)
            if "connecting to" in line:
                break
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
        elapsed = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert elapsed < 10, f"took {elapsed:.1f}s to exit after SIGTERM"


def test_embedded_gearmand_is_one_local_cluster() -> None:
    """The embedded cluster is the same LocalCluster for every backend; for gearman its server is a gearmand."""
    with RemoteExecutor(max_workers=1, transport="gearman") as ex:
        cluster = ex.transport.cluster  # type: ignore[attr-defined]
        assert type(cluster).__name__ == "LocalCluster"
        assert isinstance(cluster.server.gearmand, GearmandProcess)
        assert ex.submit(pow, 2, 10).result(timeout=60) == 1024
