"""The tcp transport against a real job server and real worker processes: keys, versions, bad input, CLI.

The fault scenarios every remote transport shares (SIGKILL and SIGSTOP mid-call, poison call, server
restart, giving up on reconnection, drain on SIGTERM) run from ``conformance/test_faults_tcp.py``.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import remote_executor.jobserver.client as jobserver_client
from remote_executor import RemoteExecutor
from remote_executor.errors import (
    AuthenticationError,
    VersionMismatchError,
)
from remote_executor.security import resolve_key
from remote_executor.supervisor import Supervisor
from remote_executor.transports.tcp.server import TcpServer
from remote_executor.wire.frames import HEADER, KEYED, MAGIC, VERSION, Frame, Kind, encode_bytes
from remote_executor.wire.messages import hello

from .conftest import FAST_HEARTBEAT, pid_alive, random_key, wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module

FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5}


def test_remote_server_round_trip(tcp_server: TcpServer, start_workers: Callable[..., Supervisor]) -> None:
    start_workers(2)
    with RemoteExecutor(transport=tcp_server.url, **FAST) as ex:
        assert list(ex.map(pow, range(50), [2] * 50, chunksize=7)) == [i * i for i in range(50)]
        assert ex.submit(lambda: os.getpid()).result() != os.getpid()


def test_keyed_cluster_round_trip_and_wrong_key_refused(tmp_path: Path) -> None:
    key = random_key()
    server = TcpServer("127.0.0.1", 0, key=key, **FAST)
    server.start()
    supervisor = Supervisor(server.url, 1, env={"REMOTE_EXECUTOR_KEY_HEX": key.hex()}, worker_args=FAST_HEARTBEAT)
    supervisor.start()
    try:
        with RemoteExecutor(transport=server.url, key=key, **FAST) as ex:
            assert ex.submit(sum, [1, 2, 3]).result(timeout=30) == 6
        with pytest.raises(AuthenticationError, match="wrong key"):
            RemoteExecutor(transport=server.url, key=b"not the key", **FAST)
        with pytest.raises(AuthenticationError):
            RemoteExecutor(transport=server.url, **FAST)  # no key at all
    finally:
        supervisor.stop()
        server.stop()


def test_version_mismatch_is_a_clear_error(tcp_server: TcpServer, monkeypatch: pytest.MonkeyPatch) -> None:
    def old_python_hello(role: str, info: dict[str, Any], extra: Any = None) -> Frame:
        frame = hello(role, info, extra)
        frame.parts[0] = bytes(frame.parts[0]).replace(b'"python": "3.', b'"python": "2.')
        return frame

    monkeypatch.setattr(jobserver_client, "hello", old_python_hello)
    with pytest.raises(VersionMismatchError, match="version mismatch: python 2"):
        RemoteExecutor(transport=tcp_server.url)


# --- malformed input: a clear log line, a closed connection, everyone else still served ----------------


def _bad_inputs() -> dict[str, bytes]:
    key = resolve_key()  # the server's (the per-user key): these frames fail for what they are, not the HMAC
    one_part = HEADER.pack(MAGIC, VERSION, Kind.HELLO, 1, KEYED, 0, 0)
    return {
        "garbage header": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(64),
        "oversized length": one_part + struct.pack("!Q", 1 << 62) + bytes(32),  # and room for the MAC
        "unknown type": HEADER.pack(MAGIC, VERSION, 200, 0, 0, 0, 0),
        "too many parts": HEADER.pack(MAGIC, VERSION, Kind.HELLO, 60000, 0, 0, 0),
        "truncated frame": encode_bytes(hello("client", {"executor_id": 1}), key)[:-5],
        "frame before hello": encode_bytes(Frame(Kind.SUBMIT, a=1, parts=[b"x"]), key),
    }


_EXPECTED_LOG = {
    "garbage header": "bad frame magic",
    "oversized length": "exceeds the limit",
    "unknown type": "unknown frame type",
    "too many parts": "more than the limit",
    "truncated frame": "in the middle of a frame",
    "frame before hello": "expected OPEN",
}


@pytest.mark.parametrize("case", sorted(_EXPECTED_LOG))
def test_malformed_input_is_rejected_and_others_are_served(
    case: str, tcp_server: TcpServer, start_workers: Callable[..., Supervisor], caplog: pytest.LogCaptureFixture
) -> None:
    start_workers(1)
    with RemoteExecutor(transport=tcp_server.url, **FAST) as ex, caplog.at_level(logging.INFO):
        assert ex.submit(pow, 2, 5).result(timeout=30) == 32
        with socket.create_connection(("127.0.0.1", tcp_server.port), timeout=10) as rogue:
            rogue.sendall(_bad_inputs()[case])
            if case == "truncated frame":
                rogue.shutdown(socket.SHUT_WR)
            assert _read_until_closed(rogue) is not None
        wait_for(lambda: _EXPECTED_LOG[case] in caplog.text, what=f"the log line for {case}")
        assert ex.submit(pow, 2, 6).result(timeout=30) == 64


def test_bad_hmac_is_rejected_and_others_are_served(caplog: pytest.LogCaptureFixture) -> None:
    key = random_key()
    server = TcpServer("127.0.0.1", 0, key=key, **FAST)
    server.start()
    supervisor = Supervisor(server.url, 1, env={"REMOTE_EXECUTOR_KEY_HEX": key.hex()}, worker_args=FAST_HEARTBEAT)
    supervisor.start()
    try:
        with RemoteExecutor(transport=server.url, key=key, **FAST) as ex, caplog.at_level(logging.INFO):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as rogue:
                forged = encode_bytes(hello("client", {"executor_id": 9}), key=os.urandom(32))
                rogue.sendall(forged)
                _read_until_closed(rogue)
            wait_for(lambda: "HMAC does not verify" in caplog.text, what="the HMAC rejection")
            assert ex.submit(pow, 2, 7).result(timeout=30) == 128
    finally:
        supervisor.stop()
        server.stop()


def _read_until_closed(sock: socket.socket) -> bytes:
    """What the server sent before closing (raises socket.timeout if it never closes). A server that closes
    with our bytes still unread makes the kernel answer with a reset: that is closing too."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


# --- process hygiene ------------------------------------------------------------------------------------


def test_embedded_workers_exit_when_the_client_is_killed(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import sys
        from remote_executor import RemoteExecutor
        ex = RemoteExecutor(max_workers=2)
        assert ex.submit(pow, 2, 2).result() == 4
        print(*ex.transport.cluster.supervisor.pids(), flush=True)
        sys.stdin.read()
        """
    )
    client = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert client.stdout is not None
        pids = [int(p) for p in client.stdout.readline().split()]
        assert len(pids) == 2 and all(pid_alive(p) for p in pids)
        client.kill()
        client.wait()
        wait_for(lambda: not any(pid_alive(p) for p in pids), what="orphaned workers to exit")
    finally:
        client.kill()
        client.wait()
        assert client.stdin is not None and client.stdout is not None
        client.stdin.close()
        client.stdout.close()


def test_cli_status_and_ping(tcp_server: TcpServer, start_workers: Callable[..., Supervisor]) -> None:
    start_workers(2)
    wait_for(lambda: tcp_server.scheduler.capacity == 2, what="workers to attach")
    run = [sys.executable, "-m", "remote_executor.cli", "--log-level", "WARNING"]
    status = subprocess.run([*run, "status", tcp_server.url], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert '"capacity": 2' in status.stdout and status.stdout.count("test-worker") == 2
    ping = subprocess.run([*run, "ping", tcp_server.url], capture_output=True, text=True, timeout=60)
    assert ping.returncode == 0 and "answered in" in ping.stdout
    tcp_server.stop()
    down = subprocess.run([*run, "ping", tcp_server.url], capture_output=True, text=True, timeout=60)
    assert down.returncode == 1 and "refused" in down.stderr.lower()
