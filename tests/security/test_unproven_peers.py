"""Before a peer has proved it holds the key, it gets small limits and no power to end anything.

- A job server keeps a connection's small limits until its HELLO verifies under the session keys: an OPEN
  proves nothing (it carries nothing fresh from the server, so a recorded one replays).
- A client or worker takes only small frames until the server's CHALLENGE has verified.
- Whatever answers at a job server's address with something our servers never send (another service, a
  forged CHALLENGE, an unsigned "wrong key" during a restart) cannot make a worker exit for good or a client
  give up: the worker retries, a client with several servers fails over.

Real job servers and worker processes on loopback; the impostor is a socket of this test.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from remote_executor import RemoteExecutor
from remote_executor.errors import ConnectionFailedError
from remote_executor.transports.tcp.server import TcpServer
from remote_executor.wire.frames import HEADER, KEYED, MAGIC, VERSION, Frame, Kind, encode_bytes
from remote_executor.wire.messages import hello, key_rejected
from remote_executor.wire.session import Mac, new_nonce

from ..conftest import FAST_HEARTBEAT, wait_for

KEY = b"the key of the unproven-peers tests"
SRC = str(Path(__file__).resolve().parents[2] / "src")


def _big_header(kind: Kind, size: int) -> bytes:
    """A keyed frame prefix announcing one part of ``size`` bytes (and a MAC nobody checks that far)."""
    return HEADER.pack(MAGIC, VERSION, kind, 1, KEYED, 0, 0) + struct.pack("!Q", size) + bytes(32)


class Impostor:
    """A listener on a job server's port that answers each connection's first bytes with ``answer`` (or
    closes), for the first ``times`` connections, then lets the port go."""

    def __init__(self, answer: Callable[[], bytes], times: int, port: int = 0) -> None:
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self.answered = 0
        self._answer, self._times = answer, times
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="impostor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while self.answered < self._times and not self.done.is_set():
                try:
                    conn, _ = self._listener.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(10)
                    conn.recv(4096)  # the peer's OPEN
                    conn.sendall(self._answer())
                    self.answered += 1
        finally:
            self._listener.close()
            self.done.set()

    def close(self) -> None:
        self.done.set()
        self._thread.join(timeout=10)


ANSWERS: dict[str, Callable[[], bytes]] = {
    "garbage": lambda: b"HTTP/1.1 400 Bad Request\r\n\r\n" + os.urandom(64),
    "forged CHALLENGE": lambda: encode_bytes(Frame(Kind.CHALLENGE, parts=[new_nonce()]), Mac(os.urandom(32))),
    "unsigned REJECT": lambda: encode_bytes(key_rejected()),
}


@pytest.fixture
def worker_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REMOTE_EXECUTOR_KEY", "REMOTE_EXECUTOR_KEY_HEX")}
    return {**env, "PYTHONPATH": SRC, "REMOTE_EXECUTOR_KEY_HEX": KEY.hex()}


@pytest.mark.parametrize("answer", list(ANSWERS))
def test_a_worker_outlasts_an_impostor_answering_during_a_restart(answer: str, worker_env: dict[str, str]) -> None:
    """The impostor answers the worker's first attempts; then the real server starts on that port and the
    same worker process attaches to it and runs calls."""
    impostor = Impostor(ANSWERS[answer], times=2)
    url = f"tcp://127.0.0.1:{impostor.port}"
    worker = subprocess.Popen([sys.executable, "-m", "remote_executor.worker", url, *FAST_HEARTBEAT],
                              env=worker_env, stderr=subprocess.PIPE, text=True)
    server: TcpServer | None = None
    try:
        impostor.done.wait(60)
        assert impostor.answered == 2 and worker.poll() is None, "the worker gave up on a forged answer"
        server = TcpServer("127.0.0.1", impostor.port, key=KEY, heartbeat_interval=0.2, heartbeat_timeout=1.5)
        server.start()
        wait_for(lambda: (server is not None and server.scheduler.capacity == 1) or worker.poll() is not None,
                 timeout=60, what="the worker to attach to the real server")
        assert worker.poll() is None, worker.communicate(timeout=10)[1]
        with RemoteExecutor(transport=server.url, key=KEY) as ex:
            assert ex.submit(pow, 2, 10).result(timeout=60) == 1024
    finally:
        impostor.close()
        worker.terminate()
        _, err = worker.communicate(timeout=60)
        if server is not None:
            server.stop()
    assert "Traceback" not in err


def test_a_worker_believes_a_refusal_that_lasts(worker_env: dict[str, str]) -> None:
    """The real "wrong key" answer, every time: after the grace period the worker exits 2 with the reason."""
    server = TcpServer("127.0.0.1", 0, key=b"another key", heartbeat_interval=0.2, heartbeat_timeout=1.5)
    server.start()
    try:
        done = subprocess.run([sys.executable, "-m", "remote_executor.worker", server.url, *FAST_HEARTBEAT],
                              env=worker_env, capture_output=True, text=True, timeout=120)
    finally:
        server.stop()
    assert done.returncode == 2, done.stderr
    assert "the job server rejected our key" in done.stderr


@pytest.fixture
def real_server() -> Iterator[TcpServer]:
    server = TcpServer("127.0.0.1", 0, key=KEY, heartbeat_interval=0.2, heartbeat_timeout=1.5)
    server.start()
    yield server
    server.stop()


def test_a_client_fails_over_past_an_impostor(real_server: TcpServer, worker_env: dict[str, str]) -> None:
    impostor = Impostor(ANSWERS["garbage"], times=100)
    workers = subprocess.Popen([sys.executable, "-m", "remote_executor.worker", real_server.url, *FAST_HEARTBEAT],
                               env=worker_env)
    try:
        url = f"tcp://127.0.0.1:{impostor.port},127.0.0.1:{real_server.port}"
        with RemoteExecutor(transport=url, key=KEY) as ex:
            assert ex.submit(pow, 3, 4).result(timeout=60) == 81
        assert impostor.answered >= 1
    finally:
        impostor.close()
        workers.terminate()
        workers.wait(timeout=60)


def test_a_client_takes_no_large_frame_before_the_server_proves_itself() -> None:
    """An impostor announcing a gigabyte CHALLENGE is refused at its header, not read or waited for."""
    impostor = Impostor(lambda: _big_header(Kind.CHALLENGE, 1 << 30) + bytes(1 << 16), times=1)
    try:
        with pytest.raises(ConnectionFailedError, match="exceeds the limit of 65536 bytes"):
            RemoteExecutor(transport=f"tcp://127.0.0.1:{impostor.port}", key=KEY, connect_timeout=30)
    finally:
        impostor.close()


def _recorded_open() -> bytes:
    """An OPEN as a real client sends it (made here with the key: the same bytes one sniffed would be)."""
    return encode_bytes(Frame(Kind.OPEN, parts=[new_nonce()]), Mac(KEY))


def test_a_replayed_open_does_not_lift_the_tcp_servers_limits(real_server: TcpServer,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="remote_executor")
    with socket.create_connection(("127.0.0.1", real_server.port), timeout=10) as attacker:
        attacker.sendall(_recorded_open())
        assert attacker.recv(4096)  # the CHALLENGE: the server cannot tell a replayed OPEN
        attacker.sendall(_big_header(Kind.HELLO, 1 << 30))
        wait_for(lambda: any("exceeds the limit of 65536 bytes" in r.getMessage() for r in caplog.records),
                 what="the server to refuse the frame at its header")
    with RemoteExecutor(transport=real_server.url, key=KEY, connect_timeout=30) as ex:
        assert len(ex.status().clients) == 1  # it serves on, and the attacker is nobody


@pytest.fixture
def zmq_target() -> Iterator[tuple[Any, Any]]:
    """A keyed zmq job server and a DEALER socket of an attacker connected to it."""
    import zmq

    from remote_executor.transports.zmq.server import ZmqServer

    server = ZmqServer("127.0.0.1", 0, key=KEY, heartbeat_interval=0.2, heartbeat_timeout=1.5)
    server.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{server.port}")
    try:
        yield server, sock
    finally:
        sock.close()
        ctx.term()
        server.stop()


def _refused_then_serves(server: Any, caplog: pytest.LogCaptureFixture, says: str, what: str) -> None:
    """The server logs ``says`` about the attacker, then serves a legitimate client (and only it)."""
    wait_for(lambda: any(says in r.getMessage() for r in caplog.records), what=what)
    with RemoteExecutor(transport=server.url, key=KEY, connect_timeout=30) as ex:
        assert len(ex.status().clients) == 1


def test_a_replayed_open_does_not_lift_the_zmq_servers_limits(zmq_target: tuple[Any, Any],
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="remote_executor")
    server, sock = zmq_target
    opening = _recorded_open()
    prefix = len(opening) - 32  # one 32-byte part (the nonce) after the prefix
    sock.send_multipart([opening[:prefix], opening[prefix:]])
    assert sock.poll(10_000), "no CHALLENGE"
    sock.recv_multipart()
    big = 256 * 1024
    sock.send_multipart([_big_header(Kind.HELLO, big), bytes(big)])
    _refused_then_serves(server, caplog, "more than the 65536 allowed", "the part refused before it is copied")


def test_a_zmq_message_of_countless_empty_parts_is_drained_and_refused(zmq_target: tuple[Any, Any],
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Two bytes per part on the wire: the server consumes the message without keeping it, then serves on."""
    import zmq

    caplog.set_level(logging.WARNING, logger="remote_executor")
    server, sock = zmq_target
    parts = 200_000
    for _ in range(parts - 1):
        sock.send(b"", zmq.SNDMORE)
    sock.send(b"")
    _refused_then_serves(server, caplog, f"message of {parts} parts", "the message drained and refused")


def test_a_frame_sent_with_the_open_is_refused_not_read_under_the_shared_key(
        real_server: TcpServer, caplog: pytest.LogCaptureFixture) -> None:
    """A frame in the same read as the OPEN would be checked with the shared key alone (the session keys
    do not exist yet): even signed with the key, a HELLO sent so gets no session, the connection is closed."""
    caplog.set_level(logging.WARNING, logger="remote_executor")
    early_hello = encode_bytes(hello("client", {"name": "early", "executor_id": 1, "max_retries": 0}, None), Mac(KEY))
    with socket.create_connection(("127.0.0.1", real_server.port), timeout=10) as peer:
        peer.sendall(_recorded_open() + early_hello)
        received = b""
        while chunk := peer.recv(65536):  # until the server closes (a session would send heartbeats for ever)
            received += chunk
        assert len(received) < 200, "more than a CHALLENGE came back"  # (a CHALLENGE, if it was sent first)
    assert any("a frame sent before the server's CHALLENGE" in r.getMessage() for r in caplog.records)
    with RemoteExecutor(transport=real_server.url, key=KEY, connect_timeout=30) as ex:
        assert len(ex.status().clients) == 1
