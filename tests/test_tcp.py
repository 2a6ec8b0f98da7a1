"""The tcp transport against a real job server and real worker processes: faults, keys, reconnection."""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from concurrent.futures import BrokenExecutor
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import remote_executor.jobserver.client as jobserver_client
from remote_executor import RemoteExecutor
from remote_executor.conformance.gate import Gate, wait_at_gate
from remote_executor.errors import (
    AuthenticationError,
    ServerUnavailableError,
    TransportError,
    VersionMismatchError,
    WorkerLostError,
)
from remote_executor.supervisor import Supervisor
from remote_executor.transports.tcp.server import TcpServer
from remote_executor.wire.frames import HEADER, MAGIC, VERSION, Frame, Kind, encode_bytes
from remote_executor.wire.messages import hello

from .conftest import FAST_HEARTBEAT, pid_alive, wait_for

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this test module

FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5}


def record_pid_then_wait(path: str, address: tuple[str, int], token: str) -> int:
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    wait_at_gate(address, token)
    return os.getpid()


def pids_in(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def crash() -> None:
    import ctypes

    ctypes.string_at(0)  # a segfault: the worker process dies mid-call


def test_remote_server_round_trip(tcp_server: TcpServer, start_workers: Callable[..., Supervisor]) -> None:
    start_workers(2)
    with RemoteExecutor(transport=tcp_server.url, **FAST) as ex:
        assert list(ex.map(pow, range(50), [2] * 50, chunksize=7)) == [i * i for i in range(50)]
        assert ex.submit(lambda: os.getpid()).result() != os.getpid()


@pytest.mark.parametrize("max_retries", [1, 3])
def test_sigkilled_worker_call_is_retried_on_another(
    tcp_server: TcpServer, start_workers: Callable[..., Supervisor], tmp_path: Path, max_retries: int
) -> None:
    start_workers(2)
    log = tmp_path / "pids"
    with Gate() as gate, RemoteExecutor(transport=tcp_server.url, max_retries=max_retries, **FAST) as ex:
        future = ex.submit(record_pid_then_wait, str(log), gate.address, "held")
        gate.wait_started(1)
        first = pids_in(log)[0]
        os.kill(first, signal.SIGKILL)
        gate.wait_started(2)  # resubmitted, and running again somewhere
        gate.release()
        second = future.result(timeout=30)
        assert second != first
        assert pids_in(log) == [first, second]


def test_sigkilled_worker_without_retries_fails_with_worker_lost(
    tcp_server: TcpServer, start_workers: Callable[..., Supervisor], tmp_path: Path
) -> None:
    start_workers(2)
    log = tmp_path / "pids"
    with Gate() as gate, RemoteExecutor(transport=tcp_server.url, max_retries=0, **FAST) as ex:
        doomed = ex.submit(record_pid_then_wait, str(log), gate.address, "held")
        gate.wait_started(1)
        os.kill(pids_in(log)[0], signal.SIGKILL)
        with pytest.raises(WorkerLostError) as info:
            doomed.result(timeout=30)
        assert info.value.workers and "test-worker" in info.value.workers[0]
        assert ex.submit(pow, 3, 3).result(timeout=30) == 27  # the executor goes on


def test_poison_call_fails_after_max_retries_and_workers_are_replaced(
    tcp_server: TcpServer, start_workers: Callable[..., Supervisor]
) -> None:
    supervisor = start_workers(2)
    with RemoteExecutor(transport=tcp_server.url, max_retries=2, **FAST) as ex:
        with pytest.raises(WorkerLostError) as info:
            ex.submit(crash).result(timeout=60)
        assert len(info.value.workers) == 3  # ran three times, lost three workers
        assert "3 time(s)" in str(info.value)
        assert list(ex.map(abs, [-1, -2, -3])) == [1, 2, 3]  # the fleet was restored
    wait_for(lambda: supervisor.restarts >= 3, what="three crashed workers to be replaced")


def test_sigstopped_worker_is_declared_lost_after_heartbeat_timeout(
    tcp_server: TcpServer, start_workers: Callable[..., Supervisor], tmp_path: Path
) -> None:
    start_workers(2)
    log = tmp_path / "pids"
    with Gate() as gate, RemoteExecutor(transport=tcp_server.url, max_retries=1, **FAST) as ex:
        future = ex.submit(record_pid_then_wait, str(log), gate.address, "held")
        gate.wait_started(1)
        frozen = pids_in(log)[0]
        os.kill(frozen, signal.SIGSTOP)  # no disconnect: only the missing heartbeats tell
        try:
            gate.wait_started(2, timeout=30)
            gate.release()
            assert future.result(timeout=30) != frozen
        finally:
            os.kill(frozen, signal.SIGCONT)


def test_server_restart_client_and_workers_reconnect(
    tcp_server: TcpServer, start_workers: Callable[..., Supervisor], tmp_path: Path
) -> None:
    start_workers(2)
    port = tcp_server.port
    log = tmp_path / "pids"
    with Gate() as gate, RemoteExecutor(transport=tcp_server.url, max_retries=2, **FAST) as ex:
        held = ex.submit(record_pid_then_wait, str(log), gate.address, "held")
        gate.wait_started(1)
        tcp_server.stop()
        restarted = TcpServer("127.0.0.1", port, **FAST)
        restarted.start()
        try:
            gate.release()  # the first run's result goes nowhere; the client resubmits the call
            assert held.result(timeout=60) in pids_in(log)
            assert [f.result(timeout=60) for f in [ex.submit(pow, 2, i) for i in range(20)]] == [
                2**i for i in range(20)
            ]
            wait_for(lambda: restarted.scheduler.capacity == 2, what="both workers to reconnect")
        finally:
            ex.shutdown()
            restarted.stop()


def test_client_gives_up_after_reconnect_timeout(
    tcp_server: TcpServer, start_workers: Callable[..., Supervisor]
) -> None:
    start_workers(1)
    with Gate() as gate:
        ex = RemoteExecutor(transport=tcp_server.url, reconnect_timeout=0.5, **FAST)
        held = ex.submit(wait_at_gate, gate.address, "held")
        gate.wait_started(1)
        tcp_server.stop()
        with pytest.raises(ServerUnavailableError, match="could not reconnect"):
            held.result(timeout=30)
        assert isinstance(held.exception(), BrokenExecutor)
        with pytest.raises(BrokenExecutor):
            ex.submit(pow, 2, 2)
        ex.shutdown()
        gate.release()


def test_keyed_cluster_round_trip_and_wrong_key_refused(tmp_path: Path) -> None:
    key = os.urandom(32)
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


def test_non_loopback_bind_needs_a_key_or_insecure() -> None:
    with pytest.raises(TransportError, match="without a key"):
        TcpServer("0.0.0.0", 0)


# --- malformed input: a clear log line, a closed connection, everyone else still served ----------------


def _bad_inputs() -> dict[str, bytes]:
    one_part = HEADER.pack(MAGIC, VERSION, Kind.HELLO, 1, 0, 0, 0)
    return {
        "garbage header": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(64),
        "oversized length": one_part + struct.pack("!Q", 1 << 62),
        "unknown type": HEADER.pack(MAGIC, VERSION, 200, 0, 0, 0, 0),
        "too many parts": HEADER.pack(MAGIC, VERSION, Kind.HELLO, 60000, 0, 0, 0),
        "truncated frame": encode_bytes(hello("client", {"executor_id": 1}))[:-5],
        "frame before hello": encode_bytes(Frame(Kind.SUBMIT, a=1, parts=[b"x"])),
    }


_EXPECTED_LOG = {
    "garbage header": "bad frame magic",
    "oversized length": "exceeds the limit",
    "unknown type": "unknown frame type",
    "too many parts": "more than the limit",
    "truncated frame": "in the middle of a frame",
    "frame before hello": "expected HELLO first",
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
    key = os.urandom(32)
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
    """What the server sent before closing (raises socket.timeout if it never closes)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
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


def test_cli_worker_drains_on_sigterm(tcp_server: TcpServer) -> None:
    cli = subprocess.Popen(
        [sys.executable, "-m", "remote_executor.cli", "worker", tcp_server.url, "--processes", "1",
         *FAST_HEARTBEAT],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    try:
        with Gate() as gate, RemoteExecutor(transport=tcp_server.url, **FAST) as ex:
            held = ex.submit(wait_at_gate, gate.address, "held", "finished")
            gate.wait_started(1)
            cli.send_signal(signal.SIGTERM)
            wait_for(lambda: tcp_server.scheduler.capacity == 0, what="the worker to announce its drain")
            gate.release()
            assert held.result(timeout=30) == "finished"
            assert cli.wait(timeout=30) == 0
    finally:
        cli.kill()
        cli.wait()
        assert cli.stdout is not None
        cli.stdout.close()


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
